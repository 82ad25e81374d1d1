"""The host side of the guest agent's protocol (guest/README.md, "Running
commands"): requests on the port microvmm.agent, replies there, each
command's output on microvmm.stdout / microvmm.stderr up to an end marker."""

from __future__ import annotations

import re
import secrets
import threading
import time
from typing import NamedTuple

from microvmm.testing.channels import PortChannel
from microvmm.testing.errors import AgentError, MicroVMTimeout

AGENT_PROTOCOL = "1"
DEFAULT_COMMAND_TIMEOUT = 120.0


def end_marker(nonce: str) -> bytes:
    """What the agent writes on both output ports after each command (guest/README.md)."""
    return b"\n\x1eMVMEND:" + nonce.encode() + b"\x1e\n"


def encode_request(request_id: int, nonce: str, command: str | bytes) -> bytes:
    """One request for the agent: `<id> <nonce>\n<command>\0` (guest/README.md)."""
    raw = command.encode() if isinstance(command, str) else command
    if b"\0" in raw:
        raise ValueError("a shell command cannot contain a NUL byte")
    if not re.fullmatch(r"[0-9A-Za-z]+", nonce):
        raise ValueError(f"bad nonce {nonce!r}")
    return f"{request_id} {nonce}\n".encode() + raw + b"\0"


class CommandResult(NamedTuple):
    """A command's exit status and its output, byte-exact (str when run with text=True)."""
    status: int
    stdout: bytes | str
    stderr: bytes | str


class AgentClient:
    """Runs commands through the guest agent (microvmm/guestbuild/guest/initramfs/sbin/microvmm-agent)."""

    def __init__(self, agent: PortChannel, stdout: PortChannel, stderr: PortChannel):
        self.agent = agent
        self.stdout = stdout
        self.stderr = stderr
        self._next_id = 1
        self._lock = threading.Lock()
        self.broken: str | None = None  # why no further command can be run

    def wait_ready(self, timeout: float) -> None:
        line = self._next_line(timeout, "the agent's ready line")
        if line.startswith("error "):
            raise AgentError(f"guest agent: {line[6:]}")
        if line != f"ready {AGENT_PROTOCOL}":
            raise AgentError(f"guest agent: expected 'ready {AGENT_PROTOCOL}', got {line!r}")

    def _next_line(self, timeout: float, what: str) -> str:
        try:
            return self.agent.read_line(timeout).decode(errors="replace").rstrip("\r")
        except MicroVMTimeout as err:
            raise MicroVMTimeout(f"no {what}: {err}") from None

    def run(self, command: str, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> CommandResult:
        with self._lock:
            if self.broken:
                raise AgentError(f"the guest agent is not usable: {self.broken}")
            request_id, self._next_id = self._next_id, self._next_id + 1
            nonce = secrets.token_hex(8)
            deadline = time.monotonic() + timeout
            self.agent.write(encode_request(request_id, nonce, command), timeout)
            try:
                while True:
                    line = self._next_line(max(0.0, deadline - time.monotonic()),
                                           f"reply to command {command!r} within {timeout:g} s")
                    if line == f"ready {AGENT_PROTOCOL}":
                        continue  # an announcement after a reconnection, not our reply
                    break
                reply_id, _, rest = line.partition(" ")
                if reply_id != str(request_id):
                    raise AgentError(f"guest agent: reply {line!r} to request {request_id}")
                if rest.startswith("error "):
                    raise AgentError(f"guest agent refused {command!r}: {rest[6:]}")
                if not rest.isdigit():
                    raise AgentError(f"guest agent: bad reply {line!r}")
                marker = end_marker(nonce)
                stdout = self.stdout.take_through(marker, max(1.0, deadline - time.monotonic()))
                stderr = self.stderr.take_through(marker, max(1.0, deadline - time.monotonic()))
            except MicroVMTimeout as err:
                # The command may still run; its output would be taken for the next one's.
                self.broken = f"command {command!r} did not finish within {timeout:g} s"
                raise MicroVMTimeout(str(err)) from None
            except AgentError as err:
                self.broken = str(err)
                raise
            return CommandResult(int(rest), stdout, stderr)

    def send_poweroff(self) -> None:
        """Ask the guest to power off; no reply comes (the VM ends)."""
        with self._lock:
            request_id, self._next_id = self._next_id, self._next_id + 1
            self.broken = "the VM is powering off"
            # /sbin/poweroff itself (sync, poweroff -f), not the applet, which
            # signals PID 1 and has it exec /sbin/poweroff: one process less.
            self.agent.write(encode_request(request_id, secrets.token_hex(8), "exec /sbin/poweroff"), 10)
