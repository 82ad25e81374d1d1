"""The serial console's host side: the COM1 UART's output to a port backend
(the same host I/O stack as the console ports: stdio, pty, unix socket,
file, tty) and the backend's input into the UART's receive FIFO.

The UART has no flow control towards the host: its bytes are kept here until
the backend takes them, up to OUTPUT_BACKLOG (the newest kept) — a pty nobody
reads yet, or a socket with no peer, shows the recent past when one comes.
Host input moves into the UART only as far as its FIFO has room; the rest
waits for its `rx_ready` callback (`feed`), and the backend is not read
meanwhile (no loss, no busy loop).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from microvmm.eventloop import EventLoop
    from microvmm.virtio_console.backends import PortBackend, TerminalSize
    from microvmm.vmconfig import SerialConfig

logger = logging.getLogger(__name__)

#: Most output bytes kept for a backend that does not take them (yet).
OUTPUT_BACKLOG = 256 << 10
#: At the end, how long the last output may take to leave (a reader that
#: takes nothing for that long is not waited for).
FINAL_DRAIN_SECONDS = 5.0
#: Writes per drain at most, so that a fast sink cannot hold the I/O thread.
_WRITES_PER_DRAIN = 256
_READ_CHUNK = 4096


class SerialConsoleError(Exception):
    """The --serial backend could not be opened."""


class SerialConsole:
    """The host end of COM1 for one run. `open()` before the guest runs (a
    user's path fails there), `start()` on the I/O thread's loop, `output()`
    from any thread, `close()` at the end (the terminal is restored).

    `on_escape(commands)`: the Ctrl-A commands typed at an interactive
    `--serial stdio` terminal ("quit", "help").
    """

    def __init__(self, config: "SerialConfig", command_run: bool,
                 on_escape: Callable[[list[str]], None]):
        self.config = config
        # A `-- CMD` run's stdout and stderr are the command's: the serial
        # line is only watched (and logged), not shown.
        self.kind = "off" if config.kind == "stdio" and command_run else config.kind
        self._on_escape = on_escape
        self.backend: PortBackend | None = None
        self._loop: EventLoop | None = None
        self._enqueue: Callable[[bytes], int] | None = None
        self._lock = threading.Lock()
        self._out = bytearray()
        self._drain_posted = False
        self._dropped = 0
        self._pending_in = bytearray()
        self._at_line_start = True
        self._closed = False
        self._interactive = False

    # -- lifecycle --------------------------------------------------------------

    def open(self) -> None:
        """The backends a user names by path (file, pty, socket, tty), opened
        while nothing runs yet; stdio waits for start() (no terminal change,
        and no backend imports, before the first KVM_RUN)."""
        if self.kind in ("off", "stdio"):
            return
        from microvmm.virtio_console.backends import (BackendError, FileBackend, PtyBackend,
                                                      SocketClientBackend, SocketServerBackend, TtyBackend)
        path = str(self.config.path) if self.config.path is not None else ""
        try:
            if self.kind == "file":
                self.backend = FileBackend("serial", path)
            elif self.kind == "pty":
                self.backend = PtyBackend("serial", what="serial console")
            elif self.kind == "tty":
                self.backend = TtyBackend("serial", path)
            elif self.config.socket_mode == "server":
                self.backend = SocketServerBackend("serial", path)
            else:
                self.backend = SocketClientBackend("serial", path)
        except BackendError as err:
            raise SerialConsoleError(f"--serial {self.config.text}: {err}") from err

    def start(self, loop: "EventLoop", enqueue_input: Callable[[bytes], int]) -> None:
        """Before the loop runs: attach the backend; `enqueue_input` is the
        UART's (returns how many bytes it took)."""
        if self.kind == "off":
            return
        if self.kind == "stdio":
            self.backend = self._open_stdio()
            if self.backend is None:
                return
        self._loop, self._enqueue = loop, enqueue_input
        self.backend.attach(loop, self)
        if self.backend.has_input:
            self.backend.set_read_interest(True)
        with self._lock:
            self._post_drain_locked()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is left (briefly), close the backend, restore the
        terminal; on the loop thread if it runs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        backend, loop = self.backend, self._loop
        if backend is None:
            return
        done = threading.Event()

        def finish() -> None:
            try:
                deadline = time.monotonic() + FINAL_DRAIN_SECONDS
                while self._out and backend.connected and time.monotonic() < deadline:
                    if not self._write_some():
                        time.sleep(0.005)
                backend.close()
            finally:
                done.set()
        if loop is not None and loop.running and not loop.in_loop_thread():
            loop.call_soon_threadsafe(finish)
            if not done.wait(timeout):
                logger.error("the serial console's backend did not close within %s s", timeout)
                backend.restore()
        else:
            finish()

    # -- what the rest of the VMM asks ---------------------------------------

    @property
    def raw_terminal(self) -> bool:
        """The VMM's terminal is in raw mode for the guest (messages need \\r\\n)."""
        return self._interactive and not self._closed

    @property
    def unfinished_stdout_line(self) -> bool:
        """The guest's last line on the VMM's stdout is unfinished (a prompt)."""
        return self.kind == "stdio" and not self._at_line_start

    def kernel_log_writer(self) -> Callable[[bytes], None] | None:
        """Where the kernel's own log (its port) is shown: where the serial
        line goes, but on stderr for `--serial stdio`, so that stdout carries
        only what guest user space prints; nowhere for `-- CMD` runs on the
        terminal (stdout and stderr are the command's). --log always has it."""
        if self.kind == "off":
            return None
        if self.kind == "stdio":
            return _StderrWriter().write
        return self.output

    # -- data ------------------------------------------------------------------------

    def output(self, data: bytes) -> None:
        """Bytes the guest sent (any thread)."""
        if self.kind == "off" or not data:
            return
        with self._lock:
            self._at_line_start = data.endswith(b"\n")
            self._out += data
            excess = len(self._out) - OUTPUT_BACKLOG
            if excess > 0:
                del self._out[:excess]
                self._note_dropped(excess)
            self._post_drain_locked()

    def feed(self) -> None:
        """Move pending host input into the UART (on the loop thread; also the
        UART's rx_ready): as much as its FIFO takes, then read the backend again."""
        pending = self._pending_in
        if pending and self._enqueue is not None:
            taken = self._enqueue(bytes(pending))
            del pending[:taken]
        if not pending and self.backend is not None and self.backend.has_input and not self._closed:
            self.backend.set_read_interest(True)

    # -- BackendListener (loop thread) ---------------------------------------------

    def backend_readable(self) -> None:
        if self._pending_in:
            self.backend.set_read_interest(False)  # resumed by feed() once the UART drains
            return
        data = self.backend.read(_READ_CHUNK)
        if data:
            self._pending_in += data
            self.feed()

    def backend_writable(self) -> None:
        self._drain()

    def backend_connection_changed(self, connected: bool) -> None:
        if connected:
            self._drain()

    def backend_resized(self, size: "TerminalSize") -> None:
        pass  # a UART has no way to tell the guest

    # -- machinery -------------------------------------------------------------------

    def _open_stdio(self) -> "PortBackend | None":
        from microvmm.virtio_console.backends import BackendError, StdioBackend
        try:
            os.fstat(sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            return None  # no stdout at all: nothing to show the guest's output on
        stdin = sys.stdin.fileno() if sys.stdin else -1
        try:
            os.fstat(stdin)
        except OSError:
            stdin = None  # no stdin at all (CI): the guest simply gets no input
        try:
            # The fds' O_NONBLOCK flag stays as the shell left it; the VMM's
            # own messages share this terminal: keep \n -> \r\n on output.
            backend = StdioBackend("serial", stdin_fd=stdin, stdout_fd=sys.stdout.fileno(),
                                   nonblocking=False, cooked_output=True)
        except BackendError as err:
            logger.warning("serial console: %s", err)
            return None
        self._interactive = backend.interactive
        if backend.interactive:
            from microvmm.host.terminal import ESCAPE_HELP, EscapeFilter
            escape = EscapeFilter()

            def filter_escapes(data: bytes) -> bytes:
                data, commands = escape.feed(data)
                if commands:
                    self._on_escape(commands)
                return data
            backend.input_filter = filter_escapes
            print(f"microvmm: {ESCAPE_HELP}\r", file=sys.stderr)
        return backend

    def _post_drain_locked(self) -> None:
        if self._out and self._loop is not None and not self._drain_posted and not self._closed:
            self._drain_posted = True
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            self._drain_posted = False
        if self.backend is None or self._closed:
            return
        for _ in range(_WRITES_PER_DRAIN):  # until the sink would block (a write is PIPE_BUF at most)
            if not self._write_some():
                break
        with self._lock:
            self.backend.set_write_interest(bool(self._out) and self.backend.connected)

    def _write_some(self) -> int:
        """One write of the kept bytes; how many the backend took."""
        with self._lock:
            data = bytes(self._out)
        written = self.backend.write(data) if data and self.backend.connected else 0
        if written:
            with self._lock:
                del self._out[:written]
        return written

    def _note_dropped(self, count: int) -> None:
        if self._dropped == 0 and self.backend is not None and self.backend.connected:
            logger.warning("serial console: the host side does not keep up; the oldest output is dropped")
        self._dropped += count


class _StderrWriter:
    """Blocking writes to the VMM's stderr (the kernel's log beside a `--serial
    stdio` console): never dropped, a full terminal waited for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                try:
                    written = os.write(sys.stderr.fileno(), view)
                except BlockingIOError:
                    time.sleep(0.001)
                    continue
                except OSError:
                    return  # the reader went away (closed pipe): nothing to deliver to
                view = view[written:]
