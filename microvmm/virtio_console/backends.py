"""Host-side ends of console ports: stdio, tty, pty, file and unix sockets.

Contract (what the device relies on):

* A backend opens its resources in its constructor, so configuration errors
  (missing tty, absent socket server, existing non-socket file) surface as a
  `BackendError` naming the path before the VM starts.
* `attach(loop, listener)` starts event-driven operation on the I/O thread.
  From then on every backend method is called on the loop thread only, and the
  backend calls the listener on the loop thread only.
* Nothing blocks. `write(data)` returns how many bytes the sink took: possibly
  fewer, or 0 when it would block or no peer is connected. The caller keeps the
  rest; a backend never drops data it was given but did not count as written.
* `write_vectored(buffers)` is `write` of the buffers' concatenation in one
  call (writev / sendmsg where the sink allows it): same return value and the
  same promise about what was not counted. At most `MAX_IOV` buffers per call.
* `read(max_bytes)` returns available input, or b"" when there is none right
  now (end of input is handled inside the backend: it stops watching the fd).
* Readiness is interest-based rather than fd-based, because a backend's fd
  changes when a socket peer comes and goes: the device says
  `set_read_interest(True)` when the guest has receive buffers and
  `set_write_interest(True)` while it has unwritten data; the backend watches
  whichever fd is current and calls `listener.backend_readable()` /
  `backend_writable()`.
* `connected` says whether someone is at the other end (socket peer present,
  pty slave opened by a reader; stdio/tty/file always). Changes are reported by
  `listener.backend_connection_changed(connected)`, deferred through the loop so
  the listener is never re-entered from inside a backend call.
* Terminal backends report their size (`terminal_size()`); a pty also notices
  size changes made on its slave side and reports `backend_resized(size)`.
* `restore()` puts terminals back as they were (termios, blocking mode). It is
  idempotent, registered with atexit, and safe to call from a signal handler
  path; `close()` restores too, and never raises.
* An fd that fails in a way no peer causes (EBADF: closed under the VMM by a
  bug elsewhere) is logged once as an error and never used again, since its
  number may already belong to another file: the port stays disconnected
  (`fault` says why) and keeps the guest's output; a socket port drops only
  that connection and accepts or reconnects as usual.

The pty backend announces its slave path as ACRN does, "virt-console backend
redirected to /dev/pts/N", on stderr (the stream is a parameter): stdout may
carry a stdio port's data and the announcement must not be mixed into it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
import sys
import termios
import time
import tty
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, TextIO

from microvmm.terminal import RawTerminal
from microvmm.virtio_console.spec import BackendKind, PortSpec, SocketMode

if TYPE_CHECKING:
    from microvmm.eventloop import EventLoop, TimerHandle

logger = logging.getLogger(__name__)

#: How often backends check things the kernel cannot signal through epoll
#: (a pty reader appearing, a socket peer's hangup, pty size changes).
DEFAULT_MONITOR_INTERVAL = 0.2
#: Period of socket client reconnect attempts.
DEFAULT_RECONNECT_INTERVAL = 1.0
#: Regular files cannot be polled (epoll says EPERM); retry them on a timer.
_UNPOLLABLE_RETRY = 0.02
#: Most buffers a `write_vectored` call takes (Linux's IOV_MAX / UIO_MAXIOV).
MAX_IOV = 1024
#: errnos that mean "this fd is no longer ours", not "the peer went away".
_FD_GONE = (errno.EBADF, errno.ENOTSOCK, errno.ENOTTY)


class BackendError(Exception):
    """A backend could not be opened or failed fatally."""


class BackendListener(Protocol):
    """What a backend reports to its device (always on the I/O thread)."""

    def backend_readable(self) -> None: ...

    def backend_writable(self) -> None: ...

    def backend_connection_changed(self, connected: bool) -> None: ...

    def backend_resized(self, size: "TerminalSize") -> None: ...


@dataclass(frozen=True)
class TerminalSize:
    cols: int
    rows: int


def read_terminal_size(fd: int) -> TerminalSize | None:
    """TIOCGWINSZ of a terminal fd; None if it is not a terminal or size is unset."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8))
    except OSError:
        return None
    rows, cols, _, _ = struct.unpack("HHHH", packed)
    if rows == 0 and cols == 0:
        return None
    return TerminalSize(cols, rows)


@dataclass
class _Watch:
    fd: int
    timer: "TimerHandle | None" = None  # set when the fd is polled on a timer


class PortBackend(ABC):
    kind: BackendKind
    #: False for output-only backends (file).
    has_input: bool = True

    def __init__(self, name: str, monitor_interval: float = DEFAULT_MONITOR_INTERVAL):
        self.name = name
        self.monitor_interval = monitor_interval
        self._loop: EventLoop | None = None
        self._listener: BackendListener | None = None
        self._connected = False
        self._want_read = False
        self._want_write = False
        self._read_watch: _Watch | None = None
        self._write_watch: _Watch | None = None
        self._monitor_timer: TimerHandle | None = None
        self.input_eof = False
        self.closed = False
        #: Why the port's fd became unusable (see `_fd_failed`), or None.
        self.fault: str | None = None

    # -- lifecycle ------------------------------------------------------------

    def attach(self, loop: "EventLoop", listener: BackendListener) -> None:
        self._loop = loop
        self._listener = listener
        self._on_attach()
        self._update_watches()
        if self._wants_monitor():
            self._monitor_timer = loop.call_later(0, self._monitor_tick)

    def close(self) -> None:
        """Stop watching, release fds and restore terminals; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._update_watches()
        if self._monitor_timer is not None:
            self._monitor_timer.cancel()
        try:
            self.restore()
            self._release()
        except OSError as exc:
            # e.g. an fd already closed under us: the rest of teardown must go on
            logger.warning("console port %s: closing: %s", self.name, exc.strerror)

    def restore(self) -> None:
        """Restore terminal state changed by this backend (idempotent)."""

    # -- data -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected and not self.closed and self.fault is None

    @abstractmethod
    def write(self, data: bytes | memoryview) -> int:
        """Non-blocking write; returns the number of bytes taken (maybe 0)."""

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        """Non-blocking write of the buffers in order; the number of bytes taken.

        This default writes them one by one, stopping at the first short write;
        fd and socket backends override it with one writev / sendmsg.
        """
        total = 0
        for buffer in buffers:
            written = self.write(buffer)
            total += written
            if written < len(buffer):
                break
        return total

    def read(self, max_bytes: int) -> bytes:
        """Non-blocking read; b"" when nothing is available now."""
        return b""

    def terminal_size(self) -> TerminalSize | None:
        return None

    def set_read_interest(self, wanted: bool) -> None:
        self._want_read = wanted
        self._update_watches()

    def set_write_interest(self, wanted: bool) -> None:
        self._want_write = wanted
        self._update_watches()

    # -- hooks for subclasses ---------------------------------------------------

    def _input_fd(self) -> int | None:
        return None

    def _output_fd(self) -> int | None:
        return None

    def _on_attach(self) -> None:
        pass

    def _release(self) -> None:
        pass

    def _wants_monitor(self) -> bool:
        return False

    def _monitor(self) -> None:
        """Periodic check (pty reader presence, socket hangup, reconnects)."""

    # -- machinery ----------------------------------------------------------------

    def _set_connected(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        logger.info("console port %s: %s", self.name, "connected" if connected else "disconnected")
        self._update_watches()
        if self._loop is not None and not self.closed:
            self._loop.call_soon_threadsafe(lambda: self._deliver_connection(connected))

    def _deliver_connection(self, connected: bool) -> None:
        if self._listener is not None and not self.closed:
            self._listener.backend_connection_changed(connected)

    def _fd_failed(self, what: str, exc: OSError) -> None:
        """The port's own fd is unusable: say so once, then leave it alone for good."""
        if self.fault is None:
            self.fault = f"{what}: {exc.strerror}"
            logger.error("console port %s: %s failed: %s; the port is disconnected from now on "
                         "(was its fd closed under the VMM?)", self.name, what, exc.strerror)
            self._update_watches()
            if self._loop is not None and not self.closed:
                self._loop.call_soon_threadsafe(lambda: self._deliver_connection(False))

    def _mark_input_eof(self) -> None:
        if not self.input_eof:
            logger.info("console port %s: end of input", self.name)
            self.input_eof = True
            self._update_watches()

    def _update_watches(self) -> None:
        if self._loop is None:
            return
        active = self.connected
        read_fd = self._input_fd() if self._want_read and active and not self.input_eof else None
        write_fd = self._output_fd() if self._want_write and active else None
        self._read_watch = self._rewatch(self._read_watch, read_fd, reader=True)
        self._write_watch = self._rewatch(self._write_watch, write_fd, reader=False)

    def _rewatch(self, current: _Watch | None, fd: int | None, reader: bool) -> _Watch | None:
        assert self._loop is not None
        if current is not None and current.fd == fd:
            return current
        if current is not None:
            if current.timer is not None:
                current.timer.cancel()
            elif reader:
                self._loop.remove_reader(current.fd)
            else:
                self._loop.remove_writer(current.fd)
        if fd is None:
            return None
        watch = _Watch(fd)
        callback = self._fire_readable if reader else self._fire_writable
        try:
            if reader:
                self._loop.add_reader(fd, callback)
            else:
                self._loop.add_writer(fd, callback)
        except PermissionError:
            # A regular file: always ready as far as the kernel is concerned.
            watch.timer = self._loop.call_later(0, lambda: self._unpollable_tick(watch, reader))
        except OSError as exc:
            self._watch_failed(fd, exc)
            return None
        return watch

    def _watch_failed(self, fd: int, exc: OSError) -> None:
        """epoll refused an fd (EBADF): the fd is gone."""
        self._fd_failed(f"watching fd {fd}", exc)

    def _unpollable_tick(self, watch: _Watch, reader: bool) -> None:
        if watch is not (self._read_watch if reader else self._write_watch):
            return
        (self._fire_readable if reader else self._fire_writable)()
        if watch is (self._read_watch if reader else self._write_watch) and self._loop is not None:
            watch.timer = self._loop.call_later(_UNPOLLABLE_RETRY, lambda: self._unpollable_tick(watch, reader))

    def _fire_readable(self) -> None:
        if self._listener is not None and not self.closed:
            self._listener.backend_readable()

    def _fire_writable(self) -> None:
        if self._listener is not None and not self.closed:
            self._listener.backend_writable()

    def _monitor_tick(self) -> None:
        if self.closed or self._loop is None:
            return
        try:
            self._monitor()
        finally:
            if not self.closed:
                self._monitor_timer = self._loop.call_later(self.monitor_interval, self._monitor_tick)


def _writev_fd(fd: int, buffers: Sequence[bytes | memoryview]) -> int:
    """os.writev that reports 'would block' as 0 bytes."""
    try:
        return os.writev(fd, buffers)
    except (BlockingIOError, InterruptedError):
        return 0


class FileBackend(PortBackend):
    """Output-only: appends guest output to a file (created 0600, never via a symlink)."""

    kind = BackendKind.FILE
    has_input = False

    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP and os.path.islink(path):
                raise BackendError(f"file port {name}: {path} is a symbolic link; "
                                   "refusing to follow it (give the real path)") from exc
            raise BackendError(f"file port {name}: cannot open {path}: {exc.strerror}") from exc
        self._connected = True
        self._write_error: int | None = None

    def _output_fd(self) -> int | None:
        return self._fd

    def write(self, data: bytes | memoryview) -> int:
        return self.write_vectored((data,))

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        try:
            written = _writev_fd(self._fd, buffers)
        except OSError as exc:
            if exc.errno in _FD_GONE:
                self._fd_failed(f"writing {self.path}", exc)
                return 0
            # ENOSPC, EFBIG, EIO: keep the data and retry later (write interest).
            if exc.errno != self._write_error:
                logger.error("file port %s: writing %s failed: %s", self.name, self.path, exc.strerror)
                self._write_error = exc.errno
            return 0
        self._write_error = None
        return written

    def _release(self) -> None:
        os.close(self._fd)


class FdSinkBackend(PortBackend):
    """Output-only to an fd the VMM inherited (its stdout or stderr).

    The fd's O_NONBLOCK flag is shared with whoever else holds it (the user's
    shell), so it is never set; instead a write happens only when poll says
    the fd is writable and takes at most PIPE_BUF bytes, which a writable pipe
    accepts without blocking.
    """

    kind = BackendKind.FILE
    has_input = False
    _CHUNK = select.PIPE_BUF

    def __init__(self, name: str, fd: int):
        super().__init__(name)
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)
        self._connected = True

    def _output_fd(self) -> int | None:
        return self.fd

    def write(self, data: bytes | memoryview) -> int:
        ready = self._poll.poll(0)
        if not ready:
            return 0
        if ready[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            # The reader is gone: nobody will ever take these bytes.
            self._set_connected(False)
            return 0
        try:
            return os.write(self.fd, data[:self._CHUNK])
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            logger.error("port %s: writing to fd %d failed: %s", self.name, self.fd, exc.strerror)
            self._set_connected(False)
            return 0


class CaptureBackend(PortBackend):
    """Output-only into memory, bounded (e.g. a command's exit status)."""

    kind = BackendKind.FILE
    has_input = False

    def __init__(self, name: str, limit: int = 4096):
        super().__init__(name)
        self.limit = limit
        self.data = bytearray()
        self._connected = True

    def write(self, data: bytes | memoryview) -> int:
        self.data += bytes(data[:max(0, self.limit - len(self.data))])
        return len(data)  # beyond the limit the rest is not ours to keep


class CallbackBackend(PortBackend):
    """Output-only to a function that takes every byte (the kernel-log port:
    the VMM shows and watches it). Never refuses: a console port's driver
    busy-waits until its buffer is used."""

    kind = BackendKind.FILE
    has_input = False

    def __init__(self, name: str, deliver: Callable[[bytes], None]):
        super().__init__(name)
        self._deliver = deliver
        self._connected = True

    def write(self, data: bytes | memoryview) -> int:
        self._deliver(bytes(data))
        return len(data)


class StdioBackend(PortBackend):
    """The VMM's own stdin/stdout: raw mode if stdin is a terminal; pipes work too.

    `input_filter` (e.g. the Ctrl-A escape handler) sees input before the guest.
    """

    kind = BackendKind.STDIO

    def __init__(self, name: str, stdin_fd: int = 0, stdout_fd: int = 1, raw: bool = True,
                 input_filter: Callable[[bytes], bytes] | None = None):
        super().__init__(name)
        self._in = stdin_fd
        self._out = stdout_fd
        self.input_filter = input_filter
        self._raw = RawTerminal(stdin_fd)
        self._restored = False
        self._saved_blocking: dict[int, bool] = {}
        for fd in (stdin_fd, stdout_fd):
            try:
                self._saved_blocking[fd] = os.get_blocking(fd)
            except OSError as exc:
                raise BackendError(f"stdio port {name}: fd {fd} is not usable: {exc.strerror}") from exc
        if raw:
            self._raw.enter()
        atexit.register(self.restore)
        # O_NONBLOCK is a property of the open file description, which the
        # shell shares: restore() puts the original mode back.
        for fd in self._saved_blocking:
            os.set_blocking(fd, False)
        self._connected = True

    def _input_fd(self) -> int | None:
        return self._in

    def _output_fd(self) -> int | None:
        return self._out

    def write(self, data: bytes | memoryview) -> int:
        return self.write_vectored((data,))

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        try:
            return _writev_fd(self._out, buffers)
        except OSError as exc:
            logger.warning("stdio port %s: output closed: %s", self.name, exc.strerror)
            self._set_connected(False)
            return 0

    def read(self, max_bytes: int) -> bytes:
        try:
            data = os.read(self._in, max_bytes)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            data = b""
        if not data:
            self._mark_input_eof()
            return b""
        return self.input_filter(data) if self.input_filter else data

    def terminal_size(self) -> TerminalSize | None:
        return read_terminal_size(self._out) or read_terminal_size(self._in)

    def restore(self) -> None:
        self._raw.restore()
        if self._restored:
            return
        self._restored = True
        for fd, blocking in self._saved_blocking.items():
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass

    def _release(self) -> None:
        atexit.unregister(self.restore)


class TtyBackend(PortBackend):
    """An existing terminal device (e.g. another /dev/pts/N), in raw mode."""

    kind = BackendKind.TTY

    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"tty port {name}: cannot open {path}: {exc.strerror}") from exc
        if not os.isatty(self._fd):
            os.close(self._fd)
            raise BackendError(f"tty port {name}: {path} is not a terminal")
        self._raw = RawTerminal(self._fd)
        self._raw.enter()
        self._connected = True

    def _input_fd(self) -> int | None:
        return self._fd

    def _output_fd(self) -> int | None:
        return self._fd

    def write(self, data: bytes | memoryview) -> int:
        return self.write_vectored((data,))

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        try:
            return _writev_fd(self._fd, buffers)
        except OSError as exc:
            logger.warning("tty port %s: %s: %s", self.name, self.path, exc.strerror)
            self._set_connected(False)
            return 0

    def read(self, max_bytes: int) -> bytes:
        try:
            data = os.read(self._fd, max_bytes)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            data = b""
        if not data:
            self._mark_input_eof()
        return data

    def terminal_size(self) -> TerminalSize | None:
        return read_terminal_size(self._fd)

    def restore(self) -> None:
        self._raw.restore()

    def _release(self) -> None:
        os.close(self._fd)


class PtyBackend(PortBackend):
    """A new pseudo-terminal; the user attaches to its slave with screen/minicom.

    Connected while some process has the slave open: Linux reports POLLHUP on a
    pty master while no slave fd is open, and we keep none open ourselves (the
    slave is opened once, to set raw mode, and closed).
    """

    kind = BackendKind.PTY

    def __init__(self, name: str, announce: TextIO | None = None,
                 monitor_interval: float = DEFAULT_MONITOR_INTERVAL):
        super().__init__(name, monitor_interval)
        try:
            master, slave = os.openpty()
        except OSError as err:  # no /dev/ptmx (a container, a minimal root): one clear line
            raise BackendError(f"port {name}: cannot create a pty: {err.strerror}") from err
        try:
            self.path = os.ttyname(slave)
            tty.setraw(slave, termios.TCSANOW)
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self._master = master
        self._size = self.terminal_size()
        stream = sys.stderr if announce is None else announce
        print(f"virt-console backend redirected to {self.path}", file=stream, flush=True)

    def _input_fd(self) -> int | None:
        return self._master

    def _output_fd(self) -> int | None:
        return self._master

    def _wants_monitor(self) -> bool:
        return True

    def _monitor(self) -> None:
        if self.fault is not None:
            return
        poller = select.poll()
        poller.register(self._master, select.POLLIN)
        revents = dict(poller.poll(0)).get(self._master, 0)
        if revents & select.POLLNVAL:
            self._fd_failed(f"pty master of {self.path}", OSError(errno.EBADF, os.strerror(errno.EBADF)))
            return
        self._set_connected(not revents & select.POLLHUP)
        size = self.terminal_size()
        if size != self._size:
            self._size = size
            if size is not None and self._listener is not None:
                self._listener.backend_resized(size)

    def write(self, data: bytes | memoryview) -> int:
        return self.write_vectored((data,))

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        if not self.connected:
            return 0
        try:
            return _writev_fd(self._master, buffers)
        except OSError as exc:
            self._pty_error(exc)
            return 0

    def read(self, max_bytes: int) -> bytes:
        try:
            return os.read(self._master, max_bytes)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            self._pty_error(exc)
            return b""

    def _pty_error(self, exc: OSError) -> None:
        if exc.errno in _FD_GONE:
            self._fd_failed(f"pty master of {self.path}", exc)
        else:
            self._set_connected(False)  # EIO: the reader closed the slave

    def terminal_size(self) -> TerminalSize | None:
        return read_terminal_size(self._master)

    def _release(self) -> None:
        os.close(self._master)


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
        if error is not None and error.errno in _FD_GONE:
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

    def write(self, data: bytes | memoryview) -> int:
        if self._conn is None:
            return 0
        try:
            return self._conn.send(data, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._drop_peer(exc)
            return 0

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


def create_backend(spec: PortSpec, announce: TextIO | None = None,
                   input_filter: Callable[[bytes], bytes] | None = None) -> PortBackend:
    """Open the backend a port spec names (raises BackendError)."""
    kind = spec.backend
    if kind is BackendKind.STDIO:
        return StdioBackend(spec.name, input_filter=input_filter)
    if kind is BackendKind.PTY:
        return PtyBackend(spec.name, announce=announce)
    assert spec.path is not None  # the spec parser guarantees it
    if kind is BackendKind.TTY:
        return TtyBackend(spec.name, spec.path)
    if kind is BackendKind.FILE:
        return FileBackend(spec.name, spec.path)
    if spec.socket_mode is SocketMode.SERVER:
        return SocketServerBackend(spec.name, spec.path)
    return SocketClientBackend(spec.name, spec.path)
