"""Drive a `microvmm run` process whose console is on pipes: boot, expect
output, run shell commands on the guest console, and stop it without leaving
anything behind.

Used by the project's end-to-end tests and benchmarks; usable by anyone who
wants to script a guest from pytest or a CI job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from microvmm.guest_contract import BOOT_MARKER, PROMPT
from microvmm.testing.channels import PortChannel
from microvmm.testing.errors import GuestTimeout


class ConsoleStream(PortChannel):
    """microvmm's stdout or stderr: `expect` searches from offset `start` (0:
    everything received), matches consume nothing."""

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float = 60.0, start: int = 0) -> re.Match:
        return super().expect(pattern, timeout, start)

    def _tail(self) -> str:
        return "last output:\n" + self._data[-2000:].decode(errors="replace")


class GuestProcess:
    """A `microvmm run` child whose console (serial or an @stdio port) is on pipes."""

    def __init__(self, *run_args: str, env: dict | None = None, cwd: str | os.PathLike | None = None):
        self.args = [sys.executable, "-m", "microvmm", "run", *run_args]
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=cwd, start_new_session=True)
        self.stdout = ConsoleStream("stdout", self.proc.stdout.fileno(), timeout_error=GuestTimeout)
        self.stderr = ConsoleStream("stderr", self.proc.stderr.fileno(), timeout_error=GuestTimeout)
        self._command_seq = 0

    def expect(self, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match:
        return self.stdout.expect(pattern, timeout, start)

    def send(self, data: str | bytes) -> None:
        self.proc.stdin.write(data.encode() if isinstance(data, str) else data)
        self.proc.stdin.flush()

    def wait_for_shell(self, timeout: float = 600.0) -> None:
        self.expect(re.escape(BOOT_MARKER), timeout)
        self.expect(re.escape(PROMPT), 120)
        # Without echo, busybox's line editor reads plain lines: no echoed
        # command lines or cursor queries mixed into command output.
        start = self.stdout.mark()
        self.send("stty -echo\n")
        self.expect(re.escape(PROMPT), 60, start)

    def run(self, command: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run a shell command on the guest console; (exit status, its output)."""
        self._command_seq += 1
        tag = f"MVM{self._command_seq}"
        # The command's output lies between two markers the shell prints: a
        # mark taken on our side could fall in the middle of a prompt still
        # arriving from the previous command. Should the command line be
        # echoed, it shows `"<tag>";` and "$?" literally: only the real output
        # of the echos matches the patterns.
        start = self.stdout.mark()
        deadline = time.monotonic() + timeout
        self.send(f"echo \"<{tag}>\"; {command}; echo \"<{tag}:$?>\"\n")
        begin = self.expect(rf"<{tag}>\r?\n", timeout, start)
        match = self.expect(rf"<{tag}:(\d+)>", max(deadline - time.monotonic(), 0.0), begin.end())
        text = self.stdout.slice(begin.end(), match.start()).replace("\r\n", "\n")
        return int(match.group(1)), text

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"microvmm still running after {timeout:g} s; last output:\n"
                               f"{self.stdout.text[-2000:]}\nstderr:\n{self.stderr.text[-2000:]}") from None
        self.stdout.join(5)
        self.stderr.join(5)
        return code

    def kill(self) -> None:
        """End the VMM (SIGTERM, then SIGKILL) and close the pipes."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        for stream in (self.stdout, self.stderr):
            stream.join(2)   # the rest of the output, up to end of data
            stream.close()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass

    def __enter__(self) -> "GuestProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def default_images() -> Path:
    """Where `microvmm run` takes its default kernel and initramfs from."""
    from microvmm.images import default_images_dir
    return default_images_dir()
