"""Host-side faults under a running console device (no KVM: the fake driver of
tests/test_console_device.py drives the real device and transport).

The rule every test checks: guest output a backend did not take is kept, in
order, and delivered exactly once when the backend can take it again; a fault
is logged clearly and never kills the device, the I/O thread or other ports.

Rule for socket peers that leave: bytes the kernel accepted for a peer belong
to that peer (they are lost with it, as with any stream socket); bytes the
kernel had not accepted go to the next peer, in order, exactly once.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from microvmm.eventloop import EventLoop
from microvmm.virtio_console.backends import StdioBackend
from microvmm.virtio_console.device import VirtioConsole
from microvmm.virtio_console.spec import parse_port_spec
from tests.console_helpers import wait_for
from tests.test_console_device import Env, make_env, recv_exact  # noqa: F401  (make_env: fixture)

CHUNK = 4096


def ready(env: Env, port: int, open_port: bool = True) -> None:
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: port in guest.names)
    if open_port:
        guest.open_port(port)


def read_available(fd: int, count: int, timeout: float = 10.0) -> bytes:
    """Read exactly count bytes from a non-blocking fd (pty slave)."""
    data = bytearray()

    def more() -> bool:
        try:
            data.extend(os.read(fd, 65536))
        except BlockingIOError:
            pass
        return len(data) >= count
    assert wait_for(more, timeout), f"got {len(data)} of {count} bytes"
    return bytes(data)


def assert_nothing_more(fd_or_sock, wait: float = 0.3) -> None:
    time.sleep(wait)
    try:
        extra = fd_or_sock.recv(65536) if isinstance(fd_or_sock, socket.socket) else os.read(fd_or_sock, 65536)
    except (BlockingIOError, socket.timeout):
        return
    assert extra == b"", f"unexpected extra bytes: {extra[:64]!r}"


def open_slave(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


# ------------------------------------------------------------------ pty reader goes and comes back


@pytest.mark.parametrize("spec", ["pty:data", "@pty:con"], ids=["serial-port", "console-port"])
def test_pty_reader_closes_and_reopens_mid_stream(make_env, spec):
    env = make_env(["file:log={tmp}/log.txt", spec])
    ready(env, 1)
    backend = env.device.ports[1].backend
    slave = open_slave(backend.path)
    assert env.guest.until(lambda: env.guest.host_open.get(1) is True)
    first = os.urandom(3000)
    env.guest.write(1, first)
    assert read_available(slave, len(first)) == first

    os.close(slave)  # the reader goes away
    assert env.guest.until(lambda: env.guest.host_open.get(1) is False)
    while_away = [os.urandom(CHUNK) for _ in range(20)]  # more than a pty buffer holds
    for chunk in while_away:
        env.guest.write(1, chunk)
    time.sleep(0.3)
    env.guest.pump()
    assert env.device.stats()[1].dropped_bytes == 0

    slave = open_slave(backend.path)  # the reader comes back
    assert env.guest.until(lambda: env.guest.host_open.get(1) is True)
    after = os.urandom(2000)
    away = b"".join(while_away)
    got = bytearray()

    def collect() -> bool:
        env.guest.pump()
        try:
            got.extend(os.read(slave, 65536))
        except BlockingIOError:
            pass
        return len(got) >= len(away)
    assert wait_for(collect, 10), f"got {len(got)} of {len(away)} bytes written while no reader was there"
    assert bytes(got) == away, "bytes written while no reader was there: lost, reordered or duplicated"
    env.guest.write(1, after)
    assert read_available(slave, len(after)) == after
    assert_nothing_more(slave)
    stats = env.device.stats()[1]
    assert stats.to_host_bytes == len(first) + len(away) + len(after)
    assert stats.dropped_bytes == 0 and stats.buffered_bytes == 0
    os.close(slave)


def test_pty_reader_closing_right_after_a_write_loses_nothing_unread(make_env):
    """The reader closes before the monitor notices: writes in that window must not
    vanish into a pty nobody has open."""
    env = make_env(["pty:data"])
    ready(env, 0)
    backend = env.device.ports[0].backend
    slave = open_slave(backend.path)
    assert env.guest.until(lambda: env.guest.host_open.get(0) is True)
    os.close(slave)
    # no wait for the monitor's tick: the guest writes at once
    payload = os.urandom(1000)
    env.guest.write(0, payload)
    time.sleep(0.05)
    slave = open_slave(backend.path)
    got = bytearray()

    def collect() -> bool:
        env.guest.pump()
        try:
            got.extend(os.read(slave, 65536))
        except BlockingIOError:
            pass
        return len(got) >= len(payload)
    assert wait_for(collect, 5), f"got {len(got)} of {len(payload)} bytes"
    assert bytes(got) == payload
    os.close(slave)


# ------------------------------------------------------------------ socket peers


def test_socket_server_peer_leaves_mid_write_remainder_goes_to_next_peer(make_env):
    env = make_env(["socket:data={tmp}/data.sock:server"])
    ready(env, 0)
    guest = env.guest
    first = env.connect("data.sock")
    assert guest.until(lambda: guest.host_open.get(0) is True)
    payload = os.urandom(4 << 20)  # far more than socket buffers hold
    sent = 0
    while guest.tx_room(0) and sent < len(payload):
        guest.write(0, payload[sent:sent + CHUNK])
        sent += CHUNK
    # the first peer reads a little, then leaves with the rest unread
    got_first = recv_exact(first, 10000)
    first.close()
    assert guest.until(lambda: guest.host_open.get(0) is False)
    second = env.connect("data.sock")
    assert guest.until(lambda: guest.host_open.get(0) is True)
    received = bytearray()

    def reader() -> None:
        second.settimeout(20)
        while True:
            try:
                data = second.recv(1 << 16)
            except socket.timeout:
                return
            if not data:
                return
            received.extend(data)
            if received.endswith(payload[-64:]):
                return
    thread = threading.Thread(target=reader)
    thread.start()
    while sent < len(payload):
        guest.pump()
        while guest.tx_room(0) and sent < len(payload):
            guest.write(0, payload[sent:sent + CHUNK])
            sent += CHUNK
        time.sleep(0.001)
    thread.join(30)
    assert got_first == payload[:len(got_first)]
    # the second peer gets a suffix: what the kernel had not accepted for the first
    assert received, "nothing went to the new peer"
    start = len(payload) - len(received)
    assert start >= len(got_first), "bytes delivered twice"
    assert bytes(received) == payload[start:], "the new peer's bytes are not the in-order remainder"
    stats = env.device.stats()[0]
    assert stats.to_host_bytes == len(payload) and stats.dropped_bytes == 0
    assert not env.needs_reset()
    second.close()


def _listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(10)
    return server


def test_socket_client_server_restarts_client_reconnects_and_delivers(tmp_path):
    path = tmp_path / "srv.sock"
    server = _listen(path)
    env = Env(tmp_path, [f"socket:link={path}:client"])
    try:
        conn, _ = server.accept()
        ready(env, 0)
        guest = env.guest
        assert guest.until(lambda: guest.host_open.get(0) is True)
        guest.write(0, b"before restart")
        assert recv_exact(conn, 14) == b"before restart"

        conn.close()  # the server process goes away entirely...
        server.close()
        path.unlink()
        assert guest.until(lambda: guest.host_open.get(0) is False)
        guest.write(0, b"written while the server was down")
        time.sleep(0.3)
        guest.pump()

        server = _listen(path)  # ...and a new one starts at the same path
        conn, _ = server.accept()  # the client reconnects on its own
        assert guest.until(lambda: guest.host_open.get(0) is True, timeout=10)
        assert recv_exact(conn, 33) == b"written while the server was down"
        conn.sendall(b"hello again")
        assert guest.until(lambda: bytes(guest.received[0]) == b"hello again")
        conn.settimeout(0.3)
        assert_nothing_more(conn)
        conn.close()
    finally:
        server.close()
        env.close()


# ------------------------------------------------------------------ file sink full


def test_file_port_on_dev_full_logs_once_and_keeps_going(make_env, caplog):
    env = make_env(["file:full=/dev/full", "socket:other={tmp}/o.sock:server"])
    ready(env, 0)
    ready_other = env.guest.until(lambda: 1 in env.guest.names)
    assert ready_other
    with caplog.at_level(logging.ERROR, logger="microvmm.virtio_console.backends"):
        env.guest.write(0, b"nowhere to go")
        time.sleep(0.5)  # ~25 retries on the file timer
        env.guest.pump()
    errors = [r.getMessage() for r in caplog.records if "full" in r.getMessage()]
    assert len(errors) == 1, errors  # once, not per retry
    assert "/dev/full" in errors[0] and "No space left on device" in errors[0]
    assert env.device.stats()[0].buffered_bytes == 13  # kept, not dropped
    assert not env.needs_reset()
    # the rest of the device is unaffected
    peer = env.connect("o.sock")
    env.guest.open_port(1)
    assert env.guest.until(lambda: env.guest.host_open.get(1) is True)
    env.guest.write(1, b"other port works")
    assert recv_exact(peer, 16) == b"other port works"
    peer.close()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tiny", str(mountpoint)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_file_port_disk_full_then_space_freed_delivers_everything_once(tiny_tmpfs, make_env, caplog):
    # (tiny_tmpfs first: torn down last, after make_env has closed the file)
    filler = tiny_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: the file system is full
    finally:
        os.close(fd)
    log_path = tiny_tmpfs / "guest.log"
    env = make_env([f"file:log={log_path}"])
    ready(env, 0)
    payload = os.urandom(30000)
    with caplog.at_level(logging.ERROR, logger="microvmm.virtio_console.backends"):
        for offset in range(0, len(payload), CHUNK):
            env.guest.write(0, payload[offset:offset + CHUNK])
        assert wait_for(lambda: any("No space left" in r.getMessage() for r in caplog.records))
    errors = [r.getMessage() for r in caplog.records if "No space left" in r.getMessage()]
    assert len(errors) == 1 and str(log_path) in errors[0], errors
    assert not env.needs_reset()
    filler.unlink()  # space comes back: the kept bytes follow, once, in order
    assert wait_for(lambda: log_path.read_bytes() == payload, 10), \
        f"{len(log_path.read_bytes())} of {len(payload)} bytes in the file"
    assert env.guest.until(lambda: env.guest.tx_room(0) == 64)
    stats = env.device.stats()[0]
    assert stats.to_host_bytes == len(payload) and stats.buffered_bytes == 0


# ------------------------------------------------------------------ stdio end of input


def test_stdio_port_stdin_eof_keeps_output_and_does_not_spin(tmp_path):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    loop = EventLoop()
    loop.start()
    backend = StdioBackend("con", stdin_fd=in_r, stdout_fd=out_w)
    reads = []
    real_read = backend.read

    def counting_read(max_bytes: int) -> bytes:
        reads.append(max_bytes)
        return real_read(max_bytes)
    backend.read = counting_read
    device = VirtioConsole([(parse_port_spec("@stdio:con"), backend)], loop)
    env = _EnvAround(tmp_path, device, loop)
    try:
        ready(env, 0)
        guest = env.guest
        assert guest.until(lambda: guest.host_open.get(0) is True)
        os.write(in_w, b"last line\n")
        os.close(in_w)
        in_w = None
        assert guest.until(lambda: bytes(guest.received[0]) == b"last line\n")
        assert wait_for(lambda: backend.input_eof)
        settled = len(reads)
        time.sleep(0.3)
        assert len(reads) - settled <= 1, "the backend keeps reading a stdin at EOF (busy loop)"
        assert backend.connected and guest.host_open.get(0) is True  # output still goes out
        guest.write(0, b"still talking")
        assert _read_fd(out_r, 13) == b"still talking"
        assert not env.needs_reset()
    finally:
        device.close()
        loop.close()
        for fd in (in_r, in_w, out_r, out_w):
            if fd is not None:
                os.close(fd)


class _EnvAround(Env):
    """Env's fake guest over a device the test built itself."""

    def __init__(self, tmp_path, device, loop):
        import io

        from microvmm.memory import GuestMemory
        from microvmm.pci.bus import PciBus
        from microvmm.virtio.pci_legacy import VirtioPciLegacy
        from tests.test_console_device import RAM, SLOT, FakeConsoleGuest
        from microvmm.testing.fakes.virtio_driver import FakeIntxLine, FakeLegacyPciDriver, FakeMsiController, GuestAllocator
        self.tmp = tmp_path
        self.loop = loop
        self.announce = io.StringIO()
        self.device = device
        self.memory = GuestMemory([(0, RAM)])
        self.bus = PciBus()
        self.intx, self.msi = FakeIntxLine(), FakeMsiController()
        self.transport = VirtioPciLegacy(device, self.memory, intx=self.intx, msi=self.msi)
        self.bus.add_device(self.transport, SLOT)
        self.driver = FakeLegacyPciDriver(self.bus, self.memory, GuestAllocator(self.memory, 0x10000, RAM),
                                          device_id=0x1003, transport=self.transport)
        self.driver.enable()
        self.guest = FakeConsoleGuest(self.driver)


def _read_fd(fd: int, count: int, timeout: float = 5.0) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < count and time.monotonic() < deadline:
        data += os.read(fd, count - len(data))
    return bytes(data)


# ------------------------------------------------------------------ an fd closed under the VMM


@pytest.mark.parametrize("which", ["pty", "socket-peer", "file"])
def test_backend_fd_closed_under_the_device(make_env, caplog, which):
    """Someone closes a backend's fd behind its back (a bug elsewhere in the process):
    the device, the I/O thread and the other ports survive, and the error is logged."""
    env = make_env(["pty:p", "socket:s={tmp}/s.sock:server", "file:f={tmp}/f.log",
                    "socket:ok={tmp}/ok.sock:server"])
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: len(guest.names) == 4)
    for port in range(4):
        guest.open_port(port)
    slave = open_slave(env.device.ports[0].backend.path)
    peer = env.connect("s.sock")
    ok_peer = env.connect("ok.sock")
    assert guest.until(lambda: guest.host_open.get(0) and guest.host_open.get(1) and guest.host_open.get(3))
    index = {"pty": 0, "socket-peer": 1, "file": 2}[which]
    backend = env.device.ports[index].backend
    fd = {"pty": lambda: backend._master, "socket-peer": lambda: backend._conn.fileno(),
          "file": lambda: backend._fd}[which]()
    with caplog.at_level(logging.WARNING):
        os.close(fd)
        guest.write(index, b"into a closed fd")
        time.sleep(0.5)
        guest.pump()
        assert env.loop.running, "the I/O thread died"
        assert not env.needs_reset()
        guest.write(3, b"others still work")
        assert recv_exact(ok_peer, 17) == b"others still work"
        ok_peer.sendall(b"and input too")
        assert guest.until(lambda: bytes(guest.received.get(3, b"")) == b"and input too")
    opens = [value for event, value in guest.events(index) if event.name == "PORT_OPEN"]
    if which != "file":  # the guest heard once that the port went away, and no flapping
        assert opens == [1, 0], opens
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # one clear line, no traceback per retry
    assert "Bad file descriptor" in errors[0] and "closed under the VMM" in errors[0], errors
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    assert env.device.stats()[index].dropped_bytes == 0
    for closer in (lambda: os.close(slave), peer.close, ok_peer.close):
        try:
            closer()
        except OSError:
            pass
