"""Unix stream socket backends: a server that serves one peer at a time and a
client that reconnects."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
import struct
import termios
import time
from typing import Sequence

from microvmm.virtio_console.backends.base import (DEFAULT_MONITOR_INTERVAL, DEFAULT_RECONNECT_INTERVAL, FD_GONE,
                                                   BackendError, PortBackend, logger)
from microvmm.virtio_console.spec import BackendKind

class _SocketBackend(PortBackend):
    """Shared data path of unix stream socket ports: one peer connection at a time."""

    kind = BackendKind.SOCKET

    def __init__(self, name: str, path: str, monitor_interval: float):
        super().__init__(name, monitor_interval)
        self.path = path
        self._conn: socket.socket | None = None

    def _input_fd(self) -> int | None:
        return self._conn.fileno() if self._conn is not None else None

    def _output_fd(self) -> int | None:
        return self._input_fd()

    def _wants_monitor(self) -> bool:
        return True

    def _adopt(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self._conn = conn
        self._set_connected(True)

    def _drop_peer(self, error: OSError | None = None) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if error is not None and error.errno in FD_GONE:
            # Not ours any more: closing the number could close someone else's file.
            logger.error("console port %s: connection on %s failed: %s; dropped it "
                         "(was its fd closed under the VMM?)", self.name, self.path, error.strerror)
            conn.detach()
        self._set_connected(False)
        conn.close()
        self._peer_gone()

    def _watch_failed(self, fd: int, exc: OSError) -> None:
        if self._conn is not None and self._conn.fileno() == fd:
            # called from inside _update_watches: finish that first
            self._loop.call_soon_threadsafe(lambda: self._drop_peer(exc) if self._conn is not None
                                            and self._conn.fileno() == fd else None)
        else:
            super()._watch_failed(fd, exc)

    def _peer_gone(self) -> None:
        pass

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        if self._conn is None:
            return 0
        try:
            return self._conn.sendmsg(buffers, (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._drop_peer(exc)
            return 0

    def read(self, max_bytes: int) -> bytes:
        if self._conn is None:
            return b""
        try:
            data = self._conn.recv(max_bytes)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            self._drop_peer(exc)
            return b""
        if not data:
            self._drop_peer()
        return data

    def _monitor(self) -> None:
        # Notice a hangup even while nobody reads (the guest posted no buffers):
        # a closed peer with no unread data left is gone.
        if self._conn is None:
            return
        poller = select.poll()
        poller.register(self._conn, select.POLLIN | select.POLLRDHUP)
        revents = dict(poller.poll(0)).get(self._conn.fileno(), 0)
        if revents & select.POLLNVAL:
            self._drop_peer(OSError(errno.EBADF, os.strerror(errno.EBADF)))
        elif revents & (select.POLLHUP | select.POLLERR):
            if not revents & select.POLLIN or self._pending_input() == 0:
                self._drop_peer()
        elif revents & select.POLLRDHUP and self._pending_input() == 0:
            self._drop_peer()

    def _pending_input(self) -> int:
        assert self._conn is not None
        try:
            return struct.unpack("i", fcntl.ioctl(self._conn.fileno(), termios.FIONREAD, bytes(4)))[0]
        except OSError:
            return 0

    def _release(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _remove_stale_socket(path: str) -> None:
    """Remove a leftover socket file nobody listens on; refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise BackendError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Non-blocking: a live server whose backlog is full would block a connect forever.
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        logger.info("removed stale socket %s", path)
        return
    except BlockingIOError:
        pass  # EAGAIN: the backlog is full, so somebody listens
    except OSError as exc:
        raise BackendError(f"cannot probe existing socket {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    raise BackendError(f"{path}: another process is listening on this socket")


class SocketServerBackend(_SocketBackend):
    """Listens on a unix socket (mode 0600) and serves one peer at a time.

    While a peer is connected the listening socket is not watched, so a second
    client waits in the backlog until the first one leaves.
    """

    def __init__(self, name: str, path: str, monitor_interval: float = DEFAULT_MONITOR_INTERVAL):
        super().__init__(name, path, monitor_interval)
        _remove_stale_socket(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux creates the socket file with the socket inode's mode (less
            # umask): private from the start, not only after the chmod below.
            os.fchmod(listener.fileno(), 0o600)
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(1)
        except OSError as exc:
            listener.close()
            raise BackendError(f"socket port {name}: cannot listen on {path}: {exc.strerror}") from exc
        listener.setblocking(False)
        self._listener_sock = listener
        self._inode = os.stat(path).st_ino
        self._accepting = False

    def _on_attach(self) -> None:
        self._accept_peers(True)

    def _accept_peers(self, enabled: bool) -> None:
        if self._loop is None or enabled == self._accepting or self.closed:
            return
        self._accepting = enabled
        if enabled:
            self._loop.add_reader(self._listener_sock.fileno(), self._accept)
        else:
            self._loop.remove_reader(self._listener_sock.fileno())

    def _accept(self) -> None:
        try:
            conn, _ = self._listener_sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._accept_peers(False)
        self._adopt(conn)

    def _peer_gone(self) -> None:
        self._accept_peers(True)

    def _release(self) -> None:
        super()._release()
        if self._accepting and self._loop is not None:
            self._loop.remove_reader(self._listener_sock.fileno())
            self._accepting = False
        self._listener_sock.close()
        try:
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


class SocketClientBackend(_SocketBackend):
    """Connects to a listening unix socket; reconnects in the background if it goes."""

    def __init__(self, name: str, path: str, monitor_interval: float = DEFAULT_MONITOR_INTERVAL,
                 reconnect_interval: float = DEFAULT_RECONNECT_INTERVAL):
        super().__init__(name, path, monitor_interval)
        self.reconnect_interval = reconnect_interval
        self._next_attempt = 0.0
        try:
            conn = self._connect()
        except BlockingIOError as exc:
            raise BackendError(f"socket port {name}: cannot connect to {path}: the server is not "
                               "accepting connections (its backlog is full)") from exc
        except OSError as exc:
            raise BackendError(f"socket port {name}: cannot connect to {path}: {exc.strerror}"
                               " (is the server running?)") from exc
        self._conn = conn
        conn.setblocking(False)
        self._connected = True

    def _connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A unix connect completes at once or fails with EAGAIN (the server's
        # backlog is full): never block the constructor or the I/O thread.
        conn.setblocking(False)
        try:
            conn.connect(self.path)
        except OSError:
            conn.close()
            raise
        return conn

    def _monitor(self) -> None:
        if self._conn is not None:
            super()._monitor()
            return
        now = time.monotonic()
        if now < self._next_attempt:
            return
        self._next_attempt = now + self.reconnect_interval
        try:
            conn = self._connect()
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                logger.warning("socket port %s: reconnect to %s: %s", self.name, self.path, exc.strerror)
            return
        logger.info("socket port %s: reconnected to %s", self.name, self.path)
        self._adopt(conn)

    def _peer_gone(self) -> None:
        self._next_attempt = time.monotonic() + self.reconnect_interval

