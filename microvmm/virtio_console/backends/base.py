"""The backend base class: the watch machinery every port backend shares, and
the fd helpers. The contract it implements is in the package's docstring
(microvmm/virtio_console/backends/__init__.py)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import termios
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from microvmm.virtio_console.spec import BackendKind

if TYPE_CHECKING:
    from microvmm.eventloop import EventLoop, TimerHandle

logger = logging.getLogger("microvmm.virtio_console.backends")

DEFAULT_MONITOR_INTERVAL = 0.2
#: Period of socket client reconnect attempts.
DEFAULT_RECONNECT_INTERVAL = 1.0
#: Regular files cannot be polled (epoll says EPERM); retry them on a timer.
_UNPOLLABLE_RETRY = 0.02
#: Most buffers a `write_vectored` call takes (Linux's IOV_MAX / UIO_MAXIOV).
MAX_IOV = 1024
#: errnos that mean "this fd is no longer ours", not "the peer went away".
FD_GONE = (errno.EBADF, errno.ENOTSOCK, errno.ENOTTY)


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

    def write(self, data: bytes | memoryview) -> int:
        """Non-blocking write; returns the number of bytes taken (maybe 0)."""
        return self.write_vectored((data,))

    @abstractmethod
    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        """Non-blocking write of the buffers in order; the number of bytes taken.

        The one write primitive every backend implements (`write` is this
        with one buffer): one writev / sendmsg where the sink allows it.
        """

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


def writev_fd(fd: int, buffers: Sequence[bytes | memoryview]) -> int:
    """os.writev that reports 'would block' as 0 bytes."""
    try:
        return os.writev(fd, buffers)
    except (BlockingIOError, InterruptedError):
        return 0


def read_fd(fd: int, max_bytes: int) -> bytes | None:
    """A non-blocking read: b"" when nothing is there now, None at end of
    input (or an error that ends it)."""
    try:
        data = os.read(fd, max_bytes)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        return None
    return data or None
