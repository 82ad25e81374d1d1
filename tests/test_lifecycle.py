"""How a real `microvmm run` process ends: signals, terminal, socket files, processes.

Each test starts the VMM on the real KVM and ends it a moment after the guest
has started booting (a full boot takes about a minute on an emulating host and
is not needed here). What is checked is what a user or a CI job sees: the exit
status 128+N (microvmm/run/exitcodes.py), the terminal put back exactly as it was,
no socket file left, no process left, and a second VMM that cannot take a
running one's socket away.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from microvmm.run.exitcodes import signal_exit_code
from tests.e2e_support import GUEST_TEST_TIMEOUT, IMAGES, require_images, require_kvm, socket_path_in

# A guest boot and its commands; nothing may hang the run.
pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

#: A signal must end the VMM this fast (teardown joins threads, restores the terminal).
EXIT_WITHIN = 5.0
#: How long the VMM may take to create its devices and start the vCPUs.
START_WITHIN = 60.0
#: How long the guest runs before the signal: the kernel is booting.
RUN_BEFORE_SIGNAL = 1.5
HELP_LINE = "Ctrl-A x: quit microvmm"
PTY_LINE = re.compile(r"^virt-console backend redirected to (/dev/pts/\d+)$", re.MULTILINE)


@pytest.fixture(autouse=True)
def _needs_kvm_and_images():
    require_kvm()
    require_images()


class _Collector:
    """Reads an fd to its end on a thread (a pipe, or a pty master)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.data = bytearray()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: a pty whose slave side is gone
                return
            if not chunk:
                return
            with self.lock:
                self.data += chunk

    @property
    def text(self) -> str:
        with self.lock:
            return self.data.decode(errors="replace")

    def wait_for(self, pattern: str | re.Pattern, timeout: float) -> re.Match:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.text)
            if match:
                return match
            time.sleep(0.02)
        raise AssertionError(f"no {regex.pattern!r} within {timeout:g} s; got:\n{self.text[-3000:]}")


class Vmm:
    """A `microvmm run` of the default guest in its own session (process group)."""

    def __init__(self, *args: str, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL):
        self.args = [sys.executable, "-m", "microvmm", "run", "--kernel", str(IMAGES / "vmlinux"),
                     "--initrd", str(IMAGES / "initramfs.cpio"), "--timeout", "300", *args]
        self.proc = subprocess.Popen(self.args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.stderr = _Collector(self.proc.stderr.fileno())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"microvmm still running after {timeout:g} s; stderr:\n"
                                 f"{self.stderr.text[-3000:]}") from None
        self.stderr.thread.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.proc.stderr.close()


def group_members(pgid: int) -> list[int]:
    """pids whose process group is pgid (from /proc/PID/stat)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ...
            members.append(int(entry))
    return members


def wait_running(vmm: Vmm, timeout: float = START_WITHIN) -> None:
    """Until the VMM catches SIGTERM and SIGHUP (/proc/PID/status SigCgt): it installs
    those handlers when setup is over and the vCPUs start."""
    wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert vmm.proc.poll() is None, f"the VMM ended during setup:\n{vmm.stderr.text}"
        with open(f"/proc/{vmm.pid}/status") as handle:
            caught = next(int(line.split()[1], 16) for line in handle if line.startswith("SigCgt:"))
        if caught & wanted == wanted:
            return
        time.sleep(0.01)
    raise AssertionError(f"the VMM did not start within {timeout:g} s:\n{vmm.stderr.text}")


def assert_gone(vmm: Vmm) -> None:
    """The VMM was reaped and nothing of its process group lives on."""
    assert vmm.proc.poll() is not None
    assert not os.path.exists(f"/proc/{vmm.pid}"), "the VMM process still exists"
    with pytest.raises(ProcessLookupError):
        os.killpg(vmm.pid, 0)
    assert group_members(vmm.pid) == []


@pytest.fixture
def short_tmp(tmp_path_factory) -> Path:
    # unix socket paths are limited to 108 bytes: a short directory of our own
    return tmp_path_factory.mktemp("lc")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda s: signal.Signals(s).name)
def test_signal_ends_vmm_cleanly(signum, short_tmp):
    """Serial on a terminal we own (raw mode), a socket server port: signal N ->
    status 128+N within seconds, terminal restored, socket file removed, no processes."""
    sock_path = socket_path_in(short_tmp, "s.sock")
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        output = _Collector(master)  # drain guest output: a full terminal must not matter here
        vmm = Vmm("--serial", "stdio", "--console", f"socket:s={sock_path}:server", stdin=slave, stdout=slave)
        try:
            # the help line is printed once raw mode is on and the handlers are installed
            vmm.stderr.wait_for(re.escape(HELP_LINE), START_WITHIN)
            wait_running(vmm)
            assert termios.tcgetattr(slave) != before, "the VMM did not put the terminal in raw mode"
            assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
            assert group_members(vmm.pid) == [vmm.pid], "the VMM must not start other processes"
            time.sleep(RUN_BEFORE_SIGNAL)
            assert vmm.proc.poll() is None, f"the VMM ended early:\n{vmm.stderr.text}"
            sent = time.monotonic()
            os.kill(vmm.pid, signum)
            code = vmm.wait(EXIT_WITHIN + 10)
            took = time.monotonic() - sent
        finally:
            vmm.kill()
        assert code == signal_exit_code(signum) == 128 + signum, vmm.stderr.text
        assert took < EXIT_WITHIN, f"exit took {took:.1f} s"
        name = signal.Signals(signum).name
        assert f"microvmm: stopped by {name}" in vmm.stderr.text
        assert termios.tcgetattr(slave) == before, "terminal attributes not restored"
        assert os.get_blocking(slave)
        assert not os.path.lexists(sock_path), "socket server file left behind"
        assert_gone(vmm)
        assert "Traceback" not in vmm.stderr.text
    finally:
        os.close(slave)
        os.close(master)
    output.thread.join(5)


def test_stdio_console_port_terminal_and_blocking_mode_restored(short_tmp):
    """A @stdio console port sets raw mode and O_NONBLOCK on the shared terminal:
    both are put back when a signal ends the VMM."""
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        output = _Collector(master)
        vmm = Vmm("--serial", f"file:{short_tmp / 'serial.log'}", "--console", "@stdio:con",
                  stdin=slave, stdout=slave)
        try:
            deadline = time.monotonic() + START_WITHIN
            while termios.tcgetattr(slave) == before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert termios.tcgetattr(slave) != before, "the stdio port did not put the terminal in raw mode"
            wait_running(vmm)
            assert not os.get_blocking(slave)  # the VMM's O_NONBLOCK, seen through the shared description
            time.sleep(RUN_BEFORE_SIGNAL)
            os.kill(vmm.pid, signal.SIGTERM)
            code = vmm.wait(EXIT_WITHIN + 10)
        finally:
            vmm.kill()
        assert code == 128 + signal.SIGTERM, vmm.stderr.text
        assert termios.tcgetattr(slave) == before
        assert os.get_blocking(slave), "O_NONBLOCK left on the terminal"
        assert_gone(vmm)
    finally:
        os.close(slave)
        os.close(master)
    output.thread.join(5)


def test_second_vmm_cannot_take_a_running_servers_socket(short_tmp):
    sock_path = socket_path_in(short_tmp, "s.sock")
    first = Vmm("--serial", "off", "--console", f"socket:s={sock_path}:server")
    try:
        deadline = time.monotonic() + START_WITHIN
        while not os.path.lexists(sock_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        wait_running(first)
        inode = os.lstat(sock_path).st_ino
        serial_log = short_tmp / "second-serial.log"
        second = subprocess.run(
            [sys.executable, "-m", "microvmm", "run", "--kernel", str(IMAGES / "vmlinux"),
             "--initrd", str(IMAGES / "initramfs.cpio"), "--serial", f"file:{serial_log}",
             "--console", f"socket:s={sock_path}:server"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        errors = [line for line in second.stderr.splitlines() if "error" in line]
        assert len(errors) == 1, second.stderr
        assert errors[0].startswith("microvmm: error: ") and str(sock_path) in errors[0], errors
        assert "Traceback" not in second.stderr
        # the guest never ran: not one byte on its serial port, no stop summary
        assert not serial_log.exists() or serial_log.stat().st_size == 0
        assert "stopped" not in second.stderr
        # the first VMM's socket is untouched and still serves
        assert os.lstat(sock_path).st_ino == inode
        assert first.proc.poll() is None
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.settimeout(5)
        peer.connect(str(sock_path))
        peer.close()
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(EXIT_WITHIN + 10) == 128 + signal.SIGTERM
    finally:
        first.kill()
    assert not os.path.lexists(sock_path)
    assert_gone(first)


def test_pty_port_announcement_is_exact(short_tmp):
    vmm = Vmm("--serial", "off", "--console", "pty:p0")
    try:
        match = vmm.stderr.wait_for(PTY_LINE, START_WITHIN)
        wait_running(vmm)
        path = match.group(1)
        assert stat.S_ISCHR(os.stat(path).st_mode)
        lines = [line for line in vmm.stderr.text.splitlines() if "redirected" in line]
        assert lines == [f"virt-console backend redirected to {path}"]
        os.kill(vmm.pid, signal.SIGTERM)
        assert vmm.wait(EXIT_WITHIN + 10) == 128 + signal.SIGTERM
    finally:
        vmm.kill()
    assert_gone(vmm)
    assert not os.path.exists(path) or not _pty_in_use(path)


def _pty_in_use(path: str) -> bool:
    """Whether a pts device is still open by its master (opening it fails with EIO once freed)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_signal_during_setup_still_cleans_up(signum, short_tmp):
    """A signal that arrives while the VMM is still building the VM (right after the
    socket file appears) must end it the same way: 128+N, no file left."""
    sock_path = socket_path_in(short_tmp, "s.sock")
    vmm = Vmm("--serial", "off", "--console", f"socket:s={sock_path}:server")
    try:
        deadline = time.monotonic() + START_WITHIN
        while not os.path.lexists(sock_path) and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(vmm.pid, signum)
        code = vmm.wait(EXIT_WITHIN + 10)
    finally:
        vmm.kill()
        leftover = os.path.lexists(sock_path)
        if leftover:
            os.unlink(sock_path)
    assert code == 128 + signum, vmm.stderr.text
    assert not leftover, "socket server file left behind by a signal during setup"
