"""Console backends with real files, ptys, pipes and unix sockets."""

from __future__ import annotations

import fcntl
import gc
import io
import os
import re
import socket
import stat
import struct
import termios
import threading

import pytest

from microvmm.eventloop import EventLoop
from microvmm.virtio_console.backends import (
    BackendError, FileBackend, PtyBackend, SocketClientBackend, SocketServerBackend,
    StdioBackend, TerminalSize, TtyBackend, create_backend,
)
from microvmm.virtio_console.spec import parse_port_spec
from tests.console_helpers import run_on_loop, wait_for

FAST = 0.01  # monitor interval for tests


class Recorder:
    """A listener that behaves like the device: reads when readable, records state."""

    def __init__(self, loop: EventLoop, backend):
        self.loop = loop
        self.backend = backend
        self.received = bytearray()
        self.connection_events: list[bool] = []
        self.sizes: list[TerminalSize] = []
        self.writable_calls = 0
        self.lock = threading.Lock()
        self.pending = b""
        self.auto_read = True

    def backend_readable(self) -> None:
        if not self.auto_read:
            return
        data = self.backend.read(4096)
        with self.lock:
            self.received += data

    def backend_writable(self) -> None:
        self.writable_calls += 1
        self.flush()

    def backend_connection_changed(self, connected: bool) -> None:
        with self.lock:
            self.connection_events.append(connected)
        if connected:
            self.flush()

    def backend_resized(self, size: TerminalSize) -> None:
        self.sizes.append(size)

    # device-like output with backpressure: keep what was not taken, retry later
    def send(self, data: bytes) -> None:
        self.pending += data
        self.flush()

    def flush(self) -> None:
        while self.pending:
            taken = self.backend.write(self.pending)
            if taken == 0:
                break
            self.pending = self.pending[taken:]
        self.backend.set_write_interest(bool(self.pending))

    def got(self) -> bytes:
        with self.lock:
            return bytes(self.received)


def attach(loop, backend, read=True) -> Recorder:
    recorder = Recorder(loop, backend)

    def setup():
        backend.attach(loop, recorder)
        backend.set_read_interest(read)
    run_on_loop(loop, setup)
    return recorder


def close(loop, backend):
    run_on_loop(loop, backend.close)


def read_exact(fd_or_sock, count: int, timeout: float = 5.0) -> bytes:
    data = bytearray()

    def more():
        try:
            chunk = fd_or_sock.recv(65536) if isinstance(fd_or_sock, socket.socket) else os.read(fd_or_sock, 65536)
        except BlockingIOError:
            return len(data) >= count
        data.extend(chunk)
        return len(data) >= count
    assert wait_for(more, timeout), f"got {len(data)} of {count} bytes"
    return bytes(data)


# ---------------------------------------------------------------- file


def test_file_appends_with_private_mode(loop, tmp_path):
    path = tmp_path / "out.log"
    path.write_bytes(b"old\n")
    os.chmod(path, 0o600)
    backend = FileBackend("log", str(path))
    recorder = attach(loop, backend)
    assert not backend.has_input and backend.connected
    run_on_loop(loop, lambda: recorder.send(b"line one\r\n\x00\xff"))
    close(loop, backend)
    assert path.read_bytes() == b"old\nline one\r\n\x00\xff"


def test_file_created_0600(loop, tmp_path):
    path = tmp_path / "new.log"
    old = os.umask(0)
    try:
        backend = FileBackend("log", str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    backend.close()


def test_file_refuses_symlink(tmp_path):
    target = tmp_path / "target"
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(BackendError, match=re.escape(str(link))):
        FileBackend("log", str(link))
    assert not target.exists()


def test_file_bad_directory_names_path(tmp_path):
    with pytest.raises(BackendError, match="nodir"):
        FileBackend("log", str(tmp_path / "nodir" / "f"))


# ---------------------------------------------------------------- pty


def open_slave(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


def test_pty_announces_path_and_tracks_reader(loop):
    announce = io.StringIO()
    backend = PtyBackend("p0", announce=announce, monitor_interval=FAST)
    assert announce.getvalue() == f"virt-console backend redirected to {backend.path}\n"
    assert re.fullmatch(r"/dev/pts/\d+", backend.path)
    recorder = attach(loop, backend)
    threading.Event().wait(0.05)  # several monitor ticks with no reader
    assert not backend.connected and recorder.connection_events == []
    # Output while nobody reads is refused, not lost.
    assert run_on_loop(loop, lambda: backend.write(b"early")) == 0

    slave = open_slave(backend.path)
    assert wait_for(lambda: recorder.connection_events == [True])
    # Raw mode was set on the slave: no echo, no canonical mode, no CR/LF mangling.
    lflag = termios.tcgetattr(slave)[3]
    assert not lflag & (termios.ECHO | termios.ICANON)
    run_on_loop(loop, lambda: recorder.send(b"hello\nworld"))
    assert read_exact(slave, 11) == b"hello\nworld"
    os.write(slave, b"typed\r")
    assert wait_for(lambda: recorder.got() == b"typed\r")

    os.close(slave)
    assert wait_for(lambda: recorder.connection_events == [True, False])
    slave = open_slave(backend.path)
    assert wait_for(lambda: recorder.connection_events == [True, False, True])
    os.close(slave)
    close(loop, backend)


def test_pty_reports_size_changes(loop):
    backend = PtyBackend("p0", announce=io.StringIO(), monitor_interval=FAST)
    recorder = attach(loop, backend)
    slave = open_slave(backend.path)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    assert wait_for(lambda: TerminalSize(111, 33) in recorder.sizes)
    assert backend.terminal_size() == TerminalSize(111, 33)
    os.close(slave)
    close(loop, backend)


def test_pty_backpressure_delivers_everything_once(loop):
    backend = PtyBackend("p0", announce=io.StringIO(), monitor_interval=FAST)
    recorder = attach(loop, backend)
    slave = open_slave(backend.path)
    assert wait_for(lambda: backend.connected)
    payload = bytes(range(256)) * 800  # far more than the pty buffer holds
    run_on_loop(loop, lambda: recorder.send(payload))
    assert recorder.pending  # the pty filled up: the rest is kept
    assert read_exact(slave, len(payload)) == payload
    assert recorder.writable_calls > 0
    os.close(slave)
    close(loop, backend)


# ---------------------------------------------------------------- tty


def test_tty_backend_raw_and_restored(loop):
    master, slave = os.openpty()
    path = os.ttyname(slave)
    termios.tcsetattr(slave, termios.TCSANOW, _cooked(termios.tcgetattr(slave)))
    before = termios.tcgetattr(slave)
    backend = TtyBackend("t", path)
    assert not termios.tcgetattr(slave)[3] & termios.ECHO
    recorder = attach(loop, backend)
    run_on_loop(loop, lambda: recorder.send(b"out\n"))
    assert read_exact(master, 4) == b"out\n"
    os.write(master, b"in")
    assert wait_for(lambda: recorder.got() == b"in")
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    assert backend.terminal_size() == TerminalSize(120, 40)
    close(loop, backend)
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)


def _cooked(attrs):
    attrs = list(attrs)
    attrs[3] |= termios.ECHO | termios.ICANON
    return attrs


def test_tty_backend_rejects_non_terminal(tmp_path):
    path = tmp_path / "plain"
    path.write_bytes(b"")
    with pytest.raises(BackendError, match="not a terminal"):
        TtyBackend("t", str(path))
    with pytest.raises(BackendError, match="/nonexistent/tty"):
        TtyBackend("t", "/nonexistent/tty")


# ---------------------------------------------------------------- stdio


def test_stdio_with_pipes_and_restore(loop):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    backend = StdioBackend("s", stdin_fd=in_r, stdout_fd=out_w,
                           input_filter=lambda data: data.replace(b"\x01", b""))
    assert not os.get_blocking(in_r) and not os.get_blocking(out_w)
    recorder = attach(loop, backend)
    run_on_loop(loop, lambda: recorder.send(b"guest says hi"))
    assert read_exact(out_r, 13) == b"guest says hi"
    os.write(in_w, b"ke\x01ys")
    assert wait_for(lambda: recorder.got() == b"keys")
    os.close(in_w)  # end of input: the backend stops watching, output still works
    assert wait_for(lambda: backend.input_eof)
    assert backend.connected
    close(loop, backend)
    assert os.get_blocking(in_r) and os.get_blocking(out_w)
    for fd in (in_r, out_r, out_w):
        os.close(fd)


def test_stdio_restore_puts_terminal_back():
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    backend = StdioBackend("s", stdin_fd=slave, stdout_fd=slave)
    assert termios.tcgetattr(slave) != before
    backend.restore()
    backend.restore()
    assert termios.tcgetattr(slave) == before
    assert os.get_blocking(slave)
    backend.close()
    os.close(master)
    os.close(slave)


def test_stdio_output_to_regular_file(loop, tmp_path):
    path = tmp_path / "stdout"
    out_fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    in_r, in_w = os.pipe()
    backend = StdioBackend("s", stdin_fd=in_r, stdout_fd=out_fd)
    recorder = attach(loop, backend)
    run_on_loop(loop, lambda: recorder.send(b"x" * 100000))
    assert wait_for(lambda: not recorder.pending)
    close(loop, backend)
    assert path.read_bytes() == b"x" * 100000
    for fd in (out_fd, in_r, in_w):
        os.close(fd)


# ---------------------------------------------------------------- sockets


def test_socket_server_serves_one_peer_at_a_time(loop, tmp_path):
    path = str(tmp_path / "con.sock")
    backend = SocketServerBackend("s", path, monitor_interval=FAST)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    recorder = attach(loop, backend)
    assert not backend.connected

    first = socket.socket(socket.AF_UNIX)
    first.connect(path)
    assert wait_for(lambda: recorder.connection_events == [True])
    first.sendall(b"from peer 1")
    assert wait_for(lambda: recorder.got() == b"from peer 1")
    run_on_loop(loop, lambda: recorder.send(b"to peer 1"))
    assert read_exact(first, 9) == b"to peer 1"

    second = socket.socket(socket.AF_UNIX)
    second.connect(path)  # waits in the backlog
    second.sendall(b"from peer 2")
    first.close()
    assert wait_for(lambda: recorder.connection_events == [True, False, True])
    assert wait_for(lambda: recorder.got() == b"from peer 1from peer 2")
    run_on_loop(loop, lambda: recorder.send(b"to peer 2"))
    assert read_exact(second, 9) == b"to peer 2"
    second.close()
    assert wait_for(lambda: recorder.connection_events == [True, False, True, False])
    close(loop, backend)
    assert not os.path.exists(path)


def test_socket_server_notices_hangup_without_reading(loop, tmp_path):
    path = str(tmp_path / "con.sock")
    backend = SocketServerBackend("s", path, monitor_interval=FAST)
    recorder = attach(loop, backend, read=False)
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(path)
    assert wait_for(lambda: recorder.connection_events == [True])
    peer.close()
    assert wait_for(lambda: recorder.connection_events == [True, False])
    close(loop, backend)


def test_socket_server_keeps_unread_input_of_departed_peer(loop, tmp_path):
    path = str(tmp_path / "con.sock")
    backend = SocketServerBackend("s", path, monitor_interval=FAST)
    recorder = attach(loop, backend, read=False)
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(path)
    assert wait_for(lambda: backend.connected)
    peer.sendall(b"last words")
    peer.close()
    threading.Event().wait(0.1)
    assert backend.connected  # unread data keeps the connection until read
    run_on_loop(loop, lambda: backend.set_read_interest(True))
    assert wait_for(lambda: recorder.got() == b"last words")
    assert wait_for(lambda: recorder.connection_events == [True, False])
    close(loop, backend)


def test_socket_server_removes_stale_socket_only(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    backend = SocketServerBackend("s", path)
    with pytest.raises(BackendError, match="listening"):
        SocketServerBackend("t", path)  # a live server is never displaced
    backend.close()
    assert not os.path.exists(path)

    regular = tmp_path / "regular"
    regular.write_bytes(b"precious")
    with pytest.raises(BackendError, match="not a socket"):
        SocketServerBackend("s", str(regular))
    assert regular.read_bytes() == b"precious"


def test_socket_client_absent_server_names_path(tmp_path):
    path = str(tmp_path / "absent.sock")
    with pytest.raises(BackendError, match=re.escape(path)):
        SocketClientBackend("c", path)


def test_socket_client_data_and_reconnect(loop, tmp_path):
    path = str(tmp_path / "srv.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    backend = SocketClientBackend("c", path, monitor_interval=FAST, reconnect_interval=FAST)
    conn, _ = server.accept()
    recorder = attach(loop, backend)
    assert backend.connected
    run_on_loop(loop, lambda: recorder.send(b"hello server"))
    assert read_exact(conn, 12) == b"hello server"
    conn.sendall(b"hello client")
    assert wait_for(lambda: recorder.got() == b"hello client")
    conn.close()
    assert wait_for(lambda: recorder.connection_events == [False])
    conn, _ = server.accept()  # the backend reconnects in the background
    assert wait_for(lambda: recorder.connection_events == [False, True])
    run_on_loop(loop, lambda: recorder.send(b"again"))
    assert read_exact(conn, 5) == b"again"
    conn.close()
    server.close()
    close(loop, backend)


def test_socket_backpressure_no_loss_no_duplication(loop, tmp_path):
    path = str(tmp_path / "bp.sock")
    backend = SocketServerBackend("s", path, monitor_interval=FAST)
    recorder = attach(loop, backend)
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(path)
    assert wait_for(lambda: backend.connected)
    payload = os.urandom(3 * 1024 * 1024)
    run_on_loop(loop, lambda: recorder.send(payload))
    assert recorder.pending, "a non-reading peer must push back"
    threading.Event().wait(0.05)
    pending_before = len(recorder.pending)
    assert pending_before > 0
    peer.setblocking(False)
    assert read_exact(peer, len(payload), timeout=20) == payload
    assert recorder.writable_calls > 0
    assert not recorder.pending
    peer.close()
    close(loop, backend)


def test_create_backend_from_spec(tmp_path):
    backend = create_backend(parse_port_spec(f"file:f={tmp_path}/x"))
    assert isinstance(backend, FileBackend)
    backend.close()
    announce = io.StringIO()
    pty_backend = create_backend(parse_port_spec("@pty:p"), announce=announce)
    assert isinstance(pty_backend, PtyBackend) and pty_backend.path in announce.getvalue()
    pty_backend.close()
    server = create_backend(parse_port_spec(f"socket:s={tmp_path}/s:server"))
    client = create_backend(parse_port_spec(f"socket:c={tmp_path}/s:client"))
    assert isinstance(server, SocketServerBackend) and isinstance(client, SocketClientBackend)
    client.close()
    server.close()


def test_close_releases_fds(loop, tmp_path):
    gc.collect()  # earlier tests' garbage closes its fds now, not during this test
    before = set(os.listdir("/proc/self/fd"))
    backends = [
        FileBackend("f", str(tmp_path / "f")),
        PtyBackend("p", announce=io.StringIO(), monitor_interval=FAST),
        SocketServerBackend("s", str(tmp_path / "s")),
    ]
    for backend in backends:
        attach(loop, backend)
    for backend in backends:
        close(loop, backend)
        close(loop, backend)
    # Nothing these backends opened is left open (an fd of `before` that
    # something else closed meanwhile is not this test's business).
    assert set(os.listdir("/proc/self/fd")) - before == set()


def test_a_pty_that_cannot_be_made_is_a_backend_error(monkeypatch):
    """No /dev/ptmx (the real-KVM lane's L1 had none): one error naming the port, no traceback."""
    def no_ptmx():
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "openpty", no_ptmx)
    with pytest.raises(BackendError, match="port p0: cannot create a pty: No such file or directory"):
        create_backend(parse_port_spec("@pty:p0"))
