"""Backends' write_vectored: one writev/sendmsg for many buffers, short writes counted exactly."""

from __future__ import annotations

import io
import os
import socket

import pytest

from microvmm.virtio_console.backends import (
    CaptureBackend, FdSinkBackend, FileBackend, PtyBackend, SocketServerBackend,
)
from tests.console_helpers import run_on_loop, wait_for
from tests.test_backends import Recorder, read_exact

BUFFERS = [b"first ", memoryview(b"second "), b"", b"third\n"]
JOINED = b"first second third\n"


def attach(loop, backend) -> Recorder:
    recorder = Recorder(loop, backend)
    run_on_loop(loop, lambda: backend.attach(loop, recorder))
    return recorder


def connected_server(loop, tmp_path) -> tuple[SocketServerBackend, socket.socket]:
    """A listening socket backend on the loop, and the peer connected to it."""
    path = str(tmp_path / "s.sock")
    backend = SocketServerBackend("s", path, monitor_interval=0.01)
    attach(loop, backend)
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(path)
    assert wait_for(lambda: backend.connected)
    return backend, peer


def test_socket_sends_all_buffers_in_one_sendmsg(loop, tmp_path):
    backend, peer = connected_server(loop, tmp_path)
    calls = []
    conn = backend._conn
    real_sendmsg = conn.sendmsg

    class Spy:  # socket methods are read-only: wrap the connection object
        def __getattr__(self, name):
            return getattr(conn, name)

        def sendmsg(self, buffers, *args):
            calls.append(len(buffers))
            return real_sendmsg(buffers, *args)
    backend._conn = Spy()
    assert run_on_loop(loop, lambda: backend.write_vectored(BUFFERS)) == len(JOINED)
    assert calls == [len(BUFFERS)]
    assert read_exact(peer, len(JOINED)) == JOINED
    backend._conn = conn
    peer.close()
    run_on_loop(loop, backend.close)


def test_socket_short_write_counts_exactly_what_the_peer_gets(loop, tmp_path):
    backend, peer = connected_server(loop, tmp_path)
    chunk = 64 * 1024
    buffers = [os.urandom(chunk) for _ in range(64)]  # 4 MiB: more than the socket holds
    taken = run_on_loop(loop, lambda: backend.write_vectored(buffers))
    assert 0 < taken < chunk * 64
    assert run_on_loop(loop, lambda: backend.write_vectored(buffers)) == 0, "full: would block"
    assert read_exact(peer, taken) == b"".join(buffers)[:taken]
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(1)  # nothing beyond what was counted
    peer.close()
    run_on_loop(loop, backend.close)


def test_socket_without_peer_takes_nothing(loop, tmp_path):
    backend = SocketServerBackend("s", str(tmp_path / "s.sock"), monitor_interval=0.01)
    attach(loop, backend)
    assert run_on_loop(loop, lambda: backend.write_vectored(BUFFERS)) == 0
    run_on_loop(loop, backend.close)


def test_file_writev_appends_in_order(loop, tmp_path):
    path = tmp_path / "log.txt"
    backend = FileBackend("f", str(path))
    attach(loop, backend)
    assert run_on_loop(loop, lambda: backend.write_vectored(BUFFERS)) == len(JOINED)
    assert run_on_loop(loop, lambda: backend.write(b"more")) == 4
    run_on_loop(loop, backend.close)
    assert path.read_bytes() == JOINED + b"more"


def test_pty_writev_reaches_the_slave(loop):
    backend = PtyBackend("p", announce=io.StringIO(), monitor_interval=0.01)
    attach(loop, backend)
    slave = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
    try:
        assert wait_for(lambda: backend.connected)
        assert run_on_loop(loop, lambda: backend.write_vectored(BUFFERS)) == len(JOINED)
        assert read_exact(slave, len(JOINED)) == JOINED
    finally:
        os.close(slave)
        run_on_loop(loop, backend.close)


def test_default_write_vectored_stops_at_the_first_short_write(loop):
    reader, writer = os.pipe()
    try:
        backend = FdSinkBackend("out", writer)  # takes at most PIPE_BUF per write
        attach(loop, backend)
        big = os.urandom(3 * 4096)
        taken = run_on_loop(loop, lambda: backend.write_vectored([big, b"never"]))
        assert taken == FdSinkBackend._CHUNK
        assert os.read(reader, 1 << 16) == big[:taken]
        capture = CaptureBackend("c", limit=8)
        assert capture.write_vectored(BUFFERS) == len(JOINED)
        assert bytes(capture.data) == JOINED[:8]
        run_on_loop(loop, backend.close)
    finally:
        os.close(reader)
        os.close(writer)
