"""A `microvmm run` child process booted for tests: its ports are unix socket
servers this side connects to, the default initramfs's agent runs commands
sent on microvmm.agent; `close` leaves no process, socket or file behind."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from microvmm.guest_contract import AGENT_PORT, COMMAND_STDERR_PORT, COMMAND_STDOUT_PORT, RESERVED_PORTS
from microvmm.testing.agent import DEFAULT_COMMAND_TIMEOUT, AgentClient, CommandResult
from microvmm.testing.channels import PortChannel
from microvmm.testing.errors import MicroVMError, MicroVMTimeout

logger = logging.getLogger(__name__)

# A boot takes about a minute on an emulating KVM and well under a second on
# hardware KVM; the default bound only stops a hung boot.
DEFAULT_BOOT_TIMEOUT = 600.0
_PORT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class VmSpec:
    """Everything that makes two VMs interchangeable (the factories' cache key)."""
    kernel: Path
    initrd: Path | None
    ports: tuple[str, ...] = ()
    mem: str = "64M"
    cmdline_append: str = ""
    extra_args: tuple[str, ...] = ()
    #: Boot with `--control`: the VM's port_* / resize / ctl calls.
    control: bool = False


def kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    return None


class MicroVM:
    """A booted guest: `run` commands, talk to its `port`s, read its console `log`."""

    def __init__(self, spec: VmSpec, log_dir: Path, name: str = "vm"):
        self.spec = spec
        self.name = name
        self.log_path = log_dir / f"{name}-console.log"
        self.vmm_log_path = log_dir / f"{name}-microvmm.log"
        # Socket paths must fit sun_path (108 bytes): a short directory of our own.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="microvm-"))
        self._ports: dict[str, PortChannel] = {}
        self._sockets: list[socket.socket] = []
        self._agent: AgentClient | None = None
        self._guest_paths: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.closed = False
        self.control_path = self._socket_dir / "control.sock"
        self._control = None

    # -- boot

    def command_line(self) -> list[str]:
        spec = self.spec
        args = [sys.executable, "-m", "microvmm", "run", "--kernel", str(spec.kernel),
                "--initrd", str(spec.initrd) if spec.initrd else "none",
                "--mem", spec.mem, "--serial", f"file:{self.log_path}"]
        for name, path in self._socket_paths().items():
            args += ["--console", f"socket:{name}={path}:server"]
        if spec.cmdline_append:
            args += ["--append", spec.cmdline_append]
        if spec.control:
            args += ["--control", str(self.control_path)]
        return args + list(spec.extra_args)

    def _socket_paths(self) -> dict[str, Path]:
        names = [AGENT_PORT, COMMAND_STDOUT_PORT, COMMAND_STDERR_PORT, *self.spec.ports]
        return {name: self._socket_dir / f"{index}.sock" for index, name in enumerate(names)}

    def boot(self, timeout: float = DEFAULT_BOOT_TIMEOUT) -> "MicroVM":
        for name in self.spec.ports:
            if not _PORT_NAME_RE.fullmatch(name) or name in RESERVED_PORTS:
                raise MicroVMError(f"bad port name {name!r}: letters, digits, '_.-', not one of "
                                   f"{sorted(RESERVED_PORTS)}")
        for path, what in ((self.spec.kernel, "kernel"), (self.spec.initrd, "initrd")):
            if path is not None and not path.is_file():
                raise MicroVMError(f"{what} {path} does not exist (`microvmm images build` builds the default "
                                   f"guest; or pass --microvmm-{what})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = self.command_line()
        logger.info("booting %s: %s", self.name, " ".join(args))
        with open(self.vmm_log_path, "wb") as vmm_log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=vmm_log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            for name, path in self._socket_paths().items():
                self._ports[name] = self._connect(name, path, deadline)
            self._agent = AgentClient(self._ports[AGENT_PORT], self._ports[COMMAND_STDOUT_PORT],
                                      self._ports[COMMAND_STDERR_PORT])
            try:
                self._agent.wait_ready(max(0.0, deadline - time.monotonic()))
            except MicroVMTimeout as err:
                raise MicroVMTimeout(f"{self.name} did not boot to its agent within {timeout:g} s "
                                     f"({err})\n{self.diagnostics()}") from None
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def _connect(self, name: str, path: Path, deadline: float) -> PortChannel:
        while True:
            self.check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise MicroVMTimeout(f"{self.name}: socket port {name} ({path}) not there in time\n"
                                         f"{self.diagnostics()}") from None
                time.sleep(0.05)
                continue
            self._sockets.append(sock)
            return PortChannel(name, sock.fileno(), check=self.check_alive,
                               on_close=lambda: _close_socket(sock))

    # -- state

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.exit_code = self.proc.returncode
            raise MicroVMError(f"{self.name}: microvmm exited with status {self.exit_code}\n"
                               f"{self.diagnostics()}")

    @property
    def log(self) -> str:
        """The serial console's output so far."""
        return _read_text(self.log_path)

    @property
    def vmm_output(self) -> str:
        """microvmm's own stdout/stderr (start-up notes, its summary, reports)."""
        return _read_text(self.vmm_log_path)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def diagnostics(self, lines: int = 30) -> str:
        console = "\n".join(self.log.splitlines()[-lines:])
        return (f"--- last console lines ({self.log_path}):\n{console}\n"
                f"--- microvmm output ({self.vmm_log_path}):\n{self.vmm_output[-3000:]}")

    @property
    def healthy(self) -> bool:
        return self.alive and not self.closed and self._agent is not None and not self._agent.broken

    # -- use

    def run(self, command: str, timeout: float = DEFAULT_COMMAND_TIMEOUT, text: bool = False) -> CommandResult:
        """Run a shell command in the guest (sh -c, stdin /dev/null); wait for it.

        Returns (status, stdout, stderr), the output byte-exact (decoded as
        UTF-8 with text=True). After a timeout the VM runs no more commands
        (the command may still be running in the guest).
        """
        if self._agent is None or self.closed:
            raise MicroVMError(f"{self.name} is not running")
        result = self._agent.run(command, timeout)
        if text:
            return CommandResult(result.status, result.stdout.decode(errors="replace"),
                                 result.stderr.decode(errors="replace"))
        return result

    # -- the control socket (VMs booted with control=True; microvmm/control/)

    def ctl(self, command: str, *args: str | int, timeout: float = 30.0):
        """Send a control command; its result (ControlReplyError on an error reply)."""
        from microvmm.control.client import ControlClient
        if not self.spec.control:
            raise MicroVMError(f"{self.name} was booted without control=True")
        self.check_alive()
        if self._control is None:
            self._control = ControlClient(str(self.control_path), timeout=timeout)
        return self._control.call(command, *args)

    def ports(self) -> list[dict]:
        return self.ctl("ports")

    def add_port(self, spec: str) -> dict:
        return self.ctl("add-port", spec)

    def remove_port(self, name: str) -> dict:
        return self.ctl("remove-port", name)

    def open_port(self, name: str) -> dict:
        return self.ctl("open", name)

    def close_port(self, name: str) -> dict:
        return self.ctl("close", name)

    def resize(self, name: str, cols: int, rows: int) -> dict:
        return self.ctl("resize", name, cols, rows)

    def send(self, name: str, data: str) -> dict:
        return self.ctl("send", name, data)

    def stats(self) -> dict:
        return self.ctl("stats")

    def dump(self) -> str:
        return self.ctl("dump")

    def stop(self) -> str:
        return self.ctl("stop")

    def torture(self, seed: int, events: int = 200):
        """`ctl torture`: the seeded event schedule; its TortureSummary (microvmm/control/torture.py)."""
        from microvmm.control.torture import run_torture
        self.ctl("help")  # connected, and the VM alive
        return run_torture(self._control, seed, events, str(self._socket_dir))

    def port(self, name: str) -> PortChannel:
        """The host end of the port `name` given in `ports=[...]`."""
        if name not in self.spec.ports:
            raise KeyError(f"{self.name} has no port {name!r} (its ports: {list(self.spec.ports)})")
        return self._ports[name]

    def vport(self, name: str) -> str:
        """The guest's device for the port `name`, e.g. '/dev/vport0p3'."""
        if name not in self._guest_paths:
            status, out, err = self.run(
                f"for d in /sys/class/virtio-ports/*; do "
                f"[ \"$(cat $d/name)\" = '{name}' ] && echo /dev/${{d##*/}}; done; true", text=True)
            path = out.strip()
            if status != 0 or not re.fullmatch(r"/dev/vport\d+p\d+", path):
                raise MicroVMError(f"{self.name}: the guest has no port named {name!r} ({out!r} {err!r})")
            self._guest_paths[name] = path
        return self._guest_paths[name]

    # -- end

    def poweroff(self, timeout: float = 120.0) -> int:
        """Power the guest off through its agent and wait for microvmm to end."""
        if self.alive and self._agent is not None and not self.closed:
            self._agent.send_poweroff()
            try:
                self.exit_code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise MicroVMTimeout(f"{self.name} did not power off within {timeout:g} s\n"
                                     f"{self.diagnostics()}") from None
        self.close()
        return self.exit_code

    def close(self, graceful: bool = True) -> None:
        """End the VM (power off when graceful and possible, else signals) and
        release everything: no process, socket or socket file stays behind."""
        if self.closed:
            return
        try:
            if graceful and self.alive and self._agent is not None and not self._agent.broken:
                try:
                    self._agent.send_poweroff()
                    self.exit_code = self.proc.wait(60)
                except (MicroVMError, OSError, subprocess.TimeoutExpired) as err:
                    logger.warning("%s: no clean power-off (%s); killing microvmm", self.name, err)
            self._kill()
        finally:
            self.closed = True
            for channel in self._ports.values():
                channel.close()
            if self._control is not None:
                self._control.close()
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.exit_code = self.proc.wait()
        # microvmm's session: nothing of it may outlive it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "MicroVM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running" if self.alive else "stopped"
        return f"<MicroVM {self.name} {state} ports={list(self.spec.ports)}>"


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
