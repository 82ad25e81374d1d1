"""The serial console's host side (run/serial_console.py) on each --serial
backend, without a guest: a fake UART with a small receive FIFO stands for
COM1. Output kept until a reader comes, input fed only as the FIFO drains,
nothing left behind (socket files, fd flags, the pty)."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from microvmm.eventloop import EventLoop
from microvmm.run.serial_console import SerialConsole, SerialConsoleError
from microvmm.vmconfig import SerialConfig
from tests.console_helpers import wait_for
from tests.e2e_support import read_exact

REPO = Path(__file__).resolve().parent.parent


class FakeUart:
    """A receive FIFO of `room` bytes the test drains like a guest reading."""

    def __init__(self, room: int = 4):
        self.room = room
        self.fifo = bytearray()
        self.received = bytearray()
        self.lock = threading.Lock()

    def enqueue_input(self, data: bytes) -> int:
        with self.lock:
            taken = data[:self.room - len(self.fifo)]
            self.fifo += taken
            return len(taken)

    def guest_reads(self, loop: EventLoop, console: SerialConsole) -> None:
        with self.lock:
            self.received += self.fifo
            self.fifo.clear()
        loop.call_soon_threadsafe(console.feed)  # the UART's rx_ready


def started(config: SerialConfig, uart: FakeUart, command_run: bool = False,
            escapes: list | None = None) -> tuple[SerialConsole, EventLoop]:
    """As the VMM does it: open before the guest runs, start before the loop."""
    console = SerialConsole(config, command_run, (escapes if escapes is not None else []).extend)
    console.open()
    loop = EventLoop()
    console.output(b"early boot line\r\n")  # the guest printed before the I/O thread ran
    console.start(loop, uart.enqueue_input)
    loop.start()
    return console, loop


def type_and_collect(loop, console, uart: FakeUart, send, text: bytes) -> bytes:
    send(text)
    assert wait_for(lambda: (uart.guest_reads(loop, console), len(uart.received) >= len(text))[1], 10)
    return bytes(uart.received)


@pytest.mark.parametrize("text, expected", [
    ("stdio", SerialConfig("stdio")), ("off", SerialConfig("off")), ("pty", SerialConfig("pty")),
    ("file:boot.log", SerialConfig("file", Path("boot.log"))),
    ("tty:/dev/pts/7", SerialConfig("tty", Path("/dev/pts/7"))),
    ("socket:/tmp/a:b.sock:server", SerialConfig("socket", Path("/tmp/a:b.sock"), "server")),
    ("socket:s.sock:client", SerialConfig("socket", Path("s.sock"), "client")),
])
def test_serial_specs_parse(text, expected):
    parsed = SerialConfig.parse(text)
    assert parsed == expected and parsed.text == text


@pytest.mark.parametrize("spec", ["socket:/tmp/x.sock", "socket::server", "file:", "pty:/dev/x", "com1", "tcp:1:2"])
def test_a_bad_serial_spec_is_one_error_line_and_exit_2_before_anything_starts(tmp_path, spec):
    (tmp_path / "vmlinux").write_bytes(b"not looked at: the options are checked first\n")
    result = subprocess.run([sys.executable, "-m", "microvmm", "run", "--kernel", "vmlinux", "--initrd", "none",
                             "--serial", spec], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--serial" in lines[0] and repr(spec) in lines[0], result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["vmlinux"]


def test_socket_server_serial_keeps_output_for_its_peer_and_feeds_input_as_the_fifo_drains(tmp_path):
    path = tmp_path / "serial.sock"
    uart = FakeUart()
    console, loop = started(SerialConfig("socket", path, "server"), uart)
    try:
        assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
        peer = socket.socket(socket.AF_UNIX)
        peer.connect(str(path))
        peer.settimeout(10)
        assert read_exact(peer.fileno(), 17, 10, "serial") == b"early boot line\r\n"
        console.output(b"login: ")
        assert read_exact(peer.fileno(), 7, 10, "serial") == b"login: "
        typed = bytes(range(256)) * 4  # every byte value, far more than the FIFO holds
        assert type_and_collect(loop, console, uart, peer.sendall, typed) == typed
        peer.close()
    finally:
        console.close()
        loop.close()
    assert not path.exists(), "the socket file was left behind"


def test_socket_client_serial_connects_to_a_listener(tmp_path):
    path = tmp_path / "listen.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    uart = FakeUart()
    console, loop = started(SerialConfig("socket", path, "client"), uart)
    try:
        conn, _ = server.accept()
        assert read_exact(conn.fileno(), 17, 10, "serial") == b"early boot line\r\n"
        assert type_and_collect(loop, console, uart, conn.sendall, b"uname -a\n") == b"uname -a\n"
        conn.close()
    finally:
        console.close()
        loop.close()
        server.close()


def test_socket_client_serial_without_a_server_fails_before_the_guest_runs(tmp_path):
    console = SerialConsole(SerialConfig("socket", tmp_path / "absent.sock", "client"), False, print)
    with pytest.raises(SerialConsoleError, match=r"--serial socket:.*absent\.sock:client: .*cannot connect"):
        console.open()


def test_pty_serial_keeps_output_until_a_reader_opens_it_and_takes_typed_input(capfd):
    uart = FakeUart()
    console, loop = started(SerialConfig("pty"), uart)
    master_fd = console.backend._master
    try:
        announced = capfd.readouterr().err
        path = announced.split("serial console redirected to ")[1].split()[0]
        assert path.startswith("/dev/pts/")
        slave = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            assert read_exact(slave, 17, 10, "pty") == b"early boot line\r\n"
            console.output(b"# ")
            assert read_exact(slave, 2, 10, "pty") == b"# "
            assert type_and_collect(loop, console, uart, lambda data: os.write(slave, data),
                                    b"echo hi\r") == b"echo hi\r"
        finally:
            os.close(slave)
    finally:
        console.close()
        loop.close()
    with pytest.raises(OSError):
        os.fstat(master_fd)  # the pty is gone with the run


def test_file_serial_gets_the_output_and_the_kernel_log(tmp_path):
    path = tmp_path / "serial.log"
    uart = FakeUart()
    console, loop = started(SerialConfig("file", path), uart)
    try:
        console.output(b"user space\n")
        console.kernel_log_writer()(b"[    1.0] kernel line\n")
    finally:
        console.close()
        loop.close()
    assert path.read_bytes() == b"early boot line\r\nuser space\n[    1.0] kernel line\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_file_serial_refuses_a_symlink(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "target")
    console = SerialConsole(SerialConfig("file", tmp_path / "link"), False, print)
    with pytest.raises(SerialConsoleError, match="symbolic link"):
        console.open()
    assert not (tmp_path / "target").exists()


def test_stdio_serial_on_pipes_leaves_the_fd_flags_alone(monkeypatch):
    """The VMM's stdout and stdin as pipes (CI): output and input pass, and the
    shared O_NONBLOCK flag is never set (the VMM's own messages use these files)."""
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    stdin, stdout = os.fdopen(in_read, "rb", buffering=0), os.fdopen(out_write, "wb", buffering=0)
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    flags = {fd: fcntl.fcntl(fd, fcntl.F_GETFL) for fd in (in_read, out_write)}
    uart = FakeUart()
    console, loop = started(SerialConfig("stdio"), uart)
    try:
        assert read_exact(out_read, 17, 10, "stdout") == b"early boot line\r\n"
        assert {fd: fcntl.fcntl(fd, fcntl.F_GETFL) for fd in flags} == flags
        assert type_and_collect(loop, console, uart, lambda data: os.write(in_write, data),
                                b"ls /\n" * 20) == b"ls /\n" * 20
        console.output(b"# ")
        assert read_exact(out_read, 2, 10, "stdout") == b"# "
        assert console.unfinished_stdout_line and not console.raw_terminal
    finally:
        console.close()
        loop.close()
        for fd in (in_write, out_read):
            os.close(fd)
        stdin.close()
        stdout.close()


def test_a_command_run_shows_no_serial_line_on_its_stdout():
    console = SerialConsole(SerialConfig("stdio"), True, print)
    console.open()
    assert console.kind == "off" and console.kernel_log_writer() is None
    console.output(b"not shown\n")
    assert not console.unfinished_stdout_line
    console.close()


def test_tty_serial_uses_an_existing_terminal_in_raw_mode_and_restores_it():
    import termios
    master, slave = os.openpty()
    path = os.ttyname(slave)
    before = termios.tcgetattr(slave)
    uart = FakeUart()
    console, loop = started(SerialConfig("tty", Path(path)), uart)
    try:
        assert termios.tcgetattr(slave) != before  # raw while the guest runs
        assert read_exact(master, 17, 10, "tty") == b"early boot line\r\n"  # no \n -> \r\r\n: raw
        assert type_and_collect(loop, console, uart, lambda data: os.write(master, data), b"ls\r") == b"ls\r"
    finally:
        console.close()
        loop.close()
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)
