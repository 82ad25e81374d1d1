"""The host end of a guest's byte stream: one reader thread per fd collects
what the guest sends; `expect`, `take_through` and `read_line` wait on it,
`write` sends to the guest.

Serves the pytest plugin's socket ports and `GuestProcess`'s console pipes.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from typing import Callable

from microvmm.testing.errors import MicroVMTimeout



def _bytes_regex(pattern: str | bytes | re.Pattern) -> re.Pattern:
    """A regex over bytes (str patterns are matched as UTF-8)."""
    if isinstance(pattern, re.Pattern):
        if isinstance(pattern.pattern, bytes):
            return pattern
        return re.compile(pattern.pattern.encode(), pattern.flags & ~re.UNICODE)
    return re.compile(pattern.encode() if isinstance(pattern, str) else pattern)


class PortChannel:
    """The host end of one guest port or console pipe.

    Works on any pollable fd (a connected unix socket, a pipe; a pty master in
    tests). `check`, if given, is called while waiting and raises when waiting
    is pointless (the VM is gone). Offsets (`mark`, `slice`, `expect(start=)`)
    count from the first byte received as long as nothing was consumed with
    `take_through`.
    """

    def __init__(self, name: str, read_fd: int, write_fd: int | None = None,
                 check: Callable[[], None] | None = None, on_close: Callable[[], None] | None = None,
                 timeout_error: type[MicroVMTimeout] = MicroVMTimeout):
        self.name = name
        self._read_fd = read_fd
        self._write_fd = read_fd if write_fd is None else write_fd
        self._check = check
        self._on_close = on_close
        self._timeout_error = timeout_error
        self._data = bytearray()
        self._cursor = 0            # expect() without start searches from here
        self._received = 0          # bytes ever received (the buffer is trimmed)
        self._cond = threading.Condition()
        self._stopping = False
        self.eof = False
        for fd in {self._read_fd, self._write_fd}:
            os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._pump, name=f"microvm-port-{name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stopping:
            try:
                readable, _, _ = select.select([self._read_fd], [], [], 0.2)
            except (OSError, ValueError):  # fd closed under us: we are closing
                break
            if not readable:
                continue
            try:
                chunk = os.read(self._read_fd, 65536)
            except BlockingIOError:
                continue
            except OSError:  # EIO from a pty master whose slave is gone: end of data
                chunk = b""
            with self._cond:
                if not chunk:
                    self.eof = True
                    self._cond.notify_all()
                    return
                self._data += chunk
                self._received += len(chunk)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    # -- reading

    @property
    def data(self) -> bytes:
        """Everything received and not yet consumed by take_through()."""
        with self._cond:
            return bytes(self._data)

    @property
    def text(self) -> str:
        """`data` decoded (invalid UTF-8 replaced)."""
        return self.data.decode(errors="replace")

    def mark(self) -> int:
        """The offset the next byte will have (for `expect(start=)` and `slice`)."""
        with self._cond:
            return len(self._data)

    def slice(self, start: int, end: int) -> str:
        with self._cond:
            return self._data[start:end].decode(errors="replace")

    def _tail(self) -> str:
        """The end of what was received, for a timeout's message (called with the lock held)."""
        return f"last bytes received: {bytes(self._data[-500:])!r}"

    def _wait(self, found: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = found()
                if result is not None:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof:
                    why = "the port's host end was closed" if self.eof else f"nothing after {timeout:g} s"
                    raise self._timeout_error(f"port {self.name}: {why} waiting for {what}; {self._tail()}")
                self._cond.wait(min(remaining, 0.5))
                if self._check is not None:
                    self._cond.release()
                    try:
                        self._check()
                    finally:
                        self._cond.acquire()

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float = 60.0,
               start: int | None = None) -> re.Match:
        """Wait for `pattern` (a regex; str is matched as UTF-8) in what the guest
        sent after the previous match (or from offset `start`); return the match
        (over bytes)."""
        regex = _bytes_regex(pattern)

        def search() -> re.Match | None:
            match = regex.search(self._data, self._cursor if start is None else start)
            if match and start is None:
                self._cursor = match.end()
            return match
        return self._wait(search, timeout, f"{regex.pattern!r}")

    def take_through(self, marker: bytes, timeout: float) -> bytes:
        """Wait for `marker`; remove everything up to and including it from the
        buffer and return what came before it."""
        def search() -> bytes | None:
            index = self._data.find(marker)
            if index < 0:
                return None
            before = bytes(self._data[:index])
            del self._data[:index + len(marker)]
            self._cursor = max(0, self._cursor - index - len(marker))
            return before
        return self._wait(search, timeout, f"the end marker {marker!r}")

    def read_line(self, timeout: float) -> bytes:
        """The next whole line (without its newline), consumed."""
        return self.take_through(b"\n", timeout)

    # -- writing

    def write(self, data: bytes | str, timeout: float = 60.0) -> None:
        """Send all of `data` to the guest (the VMM passes it on once the guest reads)."""
        view = memoryview(data.encode() if isinstance(data, str) else data)
        deadline = time.monotonic() + timeout
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout_error(f"port {self.name}: could not send {len(view)} more bytes "
                                          f"within {timeout:g} s (the guest does not read)")
            _, writable, _ = select.select([], [self._write_fd], [], min(remaining, 0.5))
            if writable:
                try:
                    view = view[os.write(self._write_fd, view):]
                except BlockingIOError:
                    pass
            elif self._check is not None:
                self._check()

    def join(self, timeout: float) -> None:
        """Wait for the reader thread to end (it ends at end of data)."""
        self._thread.join(timeout)

    def close(self) -> None:
        self._stopping = True
        self._thread.join(5)
        if self._on_close is not None:
            self._on_close()
