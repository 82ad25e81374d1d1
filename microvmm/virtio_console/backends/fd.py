"""Backends on one file descriptor the VMM opens or inherits: a file, stdout or
stderr, memory, a callback, the VMM's stdio, a tty and a new pty."""

from __future__ import annotations

import atexit
import errno
import os
import select
import sys
import termios
import tty
from typing import Callable, Sequence, TextIO

from microvmm.host.terminal import RawTerminal
from microvmm.virtio_console.backends.base import (DEFAULT_MONITOR_INTERVAL, FD_GONE, BackendError, PortBackend,
                                                   TerminalSize, logger, read_fd, read_terminal_size, writev_fd)
from microvmm.virtio_console.spec import BackendKind

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

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        try:
            written = writev_fd(self._fd, buffers)
        except OSError as exc:
            if exc.errno in FD_GONE:
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


def _leading_bytes(buffers: Sequence[bytes | memoryview], limit: int) -> bytes:
    """The first `limit` bytes of the buffers' concatenation."""
    out = bytearray()
    for buffer in buffers:
        out += buffer[:limit - len(out)]
        if len(out) >= limit:
            break
    return bytes(out)


class _PollGatedWriter:
    """Writes to an fd whose O_NONBLOCK flag is shared with whoever else holds
    it (the user's shell: the VMM's stdout or stderr), so it is never set;
    instead a write happens only when poll says the fd is writable and takes
    at most PIPE_BUF bytes, which a writable pipe accepts without blocking."""

    CHUNK = select.PIPE_BUF

    def __init__(self, fd: int):
        self.fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int | None:
        """Bytes written (maybe 0); None when the reader is gone for good."""
        ready = self._poll.poll(0)
        if not ready:
            return 0
        if ready[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            return None  # the reader is gone: nobody will ever take these bytes
        try:
            return os.write(self.fd, _leading_bytes(buffers, self.CHUNK))
        except (BlockingIOError, InterruptedError):
            return 0


class FdSinkBackend(PortBackend):
    """Output-only to an fd the VMM inherited (its stdout or stderr), without
    touching its O_NONBLOCK flag (see _PollGatedWriter)."""

    kind = BackendKind.FILE
    has_input = False
    _CHUNK = _PollGatedWriter.CHUNK

    def __init__(self, name: str, fd: int):
        super().__init__(name)
        self.fd = fd
        self._writer = _PollGatedWriter(fd)
        self._connected = True

    def _output_fd(self) -> int | None:
        return self.fd

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        try:
            written = self._writer.write_vectored(buffers)
        except OSError as exc:
            logger.error("port %s: writing to fd %d failed: %s", self.name, self.fd, exc.strerror)
            written = None
        if written is None:
            self._set_connected(False)
            return 0
        return written


class CaptureBackend(PortBackend):
    """Output-only into memory, bounded (e.g. a command's exit status)."""

    kind = BackendKind.FILE
    has_input = False

    def __init__(self, name: str, limit: int = 4096):
        super().__init__(name)
        self.limit = limit
        self.data = bytearray()
        self._connected = True

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        self.data += _leading_bytes(buffers, max(0, self.limit - len(self.data)))
        return sum(len(buffer) for buffer in buffers)  # beyond the limit the rest is not ours to keep


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

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        data = b"".join(buffers)
        self._deliver(data)
        return len(data)


class _TerminalFdBackend(PortBackend):
    """Input from one fd, output to another (the same for a tty), the input
    side in raw mode when it is a terminal. Stdio and tty ports are this."""

    def __init__(self, name: str, in_fd: int | None, out_fd: int, raw: RawTerminal | None,
                 input_filter: Callable[[bytes], bytes] | None = None):
        super().__init__(name)
        self._in = in_fd
        self._out = out_fd
        self._raw = raw
        self.input_filter = input_filter
        self.has_input = in_fd is not None

    def _input_fd(self) -> int | None:
        return self._in

    def _output_fd(self) -> int | None:
        return self._out

    def _what(self) -> str:
        return f"{self.kind.value} port {self.name}"

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        try:
            return writev_fd(self._out, buffers)
        except OSError as exc:
            logger.warning("%s: output closed: %s", self._what(), exc.strerror)
            self._set_connected(False)
            return 0

    def read(self, max_bytes: int) -> bytes:
        if self._in is None:
            return b""
        data = read_fd(self._in, max_bytes)
        if data is None:
            self._mark_input_eof()
            return b""
        return self.input_filter(data) if self.input_filter and data else data

    def terminal_size(self) -> TerminalSize | None:
        sizes = (read_terminal_size(fd) for fd in (self._out, self._in) if fd is not None)
        return next((size for size in sizes if size is not None), None)

    def restore(self) -> None:
        if self._raw is not None:
            self._raw.restore()


class StdioBackend(_TerminalFdBackend):
    """The VMM's own stdin/stdout: raw mode if stdin is a terminal; pipes work too.

    `input_filter` (e.g. the Ctrl-A escape handler) sees input before the guest.
    `stdin_fd=None`: output only (no usable stdin). `nonblocking=False` leaves
    the fds' shared O_NONBLOCK flag alone (the serial console, whose terminal
    the VMM's own messages share): input is read only when epoll says it is
    there, output written as _PollGatedWriter does. `cooked_output` keeps
    \n -> \r\n on a raw terminal's output (RawTerminal).
    """

    kind = BackendKind.STDIO

    def __init__(self, name: str, stdin_fd: int | None = 0, stdout_fd: int = 1, raw: bool = True,
                 input_filter: Callable[[bytes], bytes] | None = None, nonblocking: bool = True,
                 cooked_output: bool = False):
        fds = tuple(fd for fd in (stdin_fd, stdout_fd) if fd is not None)
        super().__init__(name, stdin_fd, stdout_fd,
                         RawTerminal(stdin_fd, cooked_output) if stdin_fd is not None else None, input_filter)
        self._restored = False
        self._saved_blocking: dict[int, bool] = {}
        self._gated = None if nonblocking else _PollGatedWriter(stdout_fd)
        for fd in fds:
            try:
                self._saved_blocking[fd] = os.get_blocking(fd)
            except OSError as exc:
                raise BackendError(f"stdio port {name}: fd {fd} is not usable: {exc.strerror}") from exc
        #: stdin is a terminal now in raw mode (the escape key makes sense).
        self.interactive = bool(raw and self._raw is not None and self._raw.enter())
        atexit.register(self.restore)
        if nonblocking:
            # O_NONBLOCK is a property of the open file description, which the
            # shell shares: restore() puts the original mode back.
            for fd in self._saved_blocking:
                os.set_blocking(fd, False)
        else:
            self._saved_blocking.clear()  # nothing changed, nothing to put back
        self._connected = True

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        if self._gated is None:
            return super().write_vectored(buffers)
        try:
            written = self._gated.write_vectored(buffers)
        except OSError as exc:
            logger.warning("%s: output closed: %s", self._what(), exc.strerror)
            written = None
        if written is None:
            self._set_connected(False)
            return 0
        return written

    def restore(self) -> None:
        super().restore()
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


class TtyBackend(_TerminalFdBackend):
    """An existing terminal device (e.g. another /dev/pts/N), in raw mode."""

    kind = BackendKind.TTY

    def __init__(self, name: str, path: str):
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"tty port {name}: cannot open {path}: {exc.strerror}") from exc
        if not os.isatty(fd):
            os.close(fd)
            raise BackendError(f"tty port {name}: {path} is not a terminal")
        super().__init__(name, fd, fd, RawTerminal(fd))
        self._fd = fd
        self._raw.enter()
        self._connected = True

    def _what(self) -> str:
        return f"tty port {self.name}: {self.path}"

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
                 monitor_interval: float = DEFAULT_MONITOR_INTERVAL, what: str = "virt-console backend"):
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
        print(f"{what} redirected to {self.path}", file=stream, flush=True)

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

    def write_vectored(self, buffers: Sequence[bytes | memoryview]) -> int:
        if not self.connected:
            return 0
        try:
            return writev_fd(self._master, buffers)
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
        if exc.errno in FD_GONE:
            self._fd_failed(f"pty master of {self.path}", exc)
        else:
            self._set_connected(False)  # EIO: the reader closed the slave

    def terminal_size(self) -> TerminalSize | None:
        return read_terminal_size(self._master)

    def _release(self) -> None:
        os.close(self._master)

