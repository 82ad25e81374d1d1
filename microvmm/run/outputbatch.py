"""Console bytes that arrive one at a time, handed on in runs.

A 16550A transmits one byte per THR write, i.e. one vCPU exit per byte; the
boot log is ~30 KB. Writing each byte to the terminal or log file (and feeding
it to the run monitor) on its own costs a syscall and a Python call chain per
byte on the vCPU thread, time the guest waits for. OutputBatcher collects the
bytes and delivers them at a newline, at `limit` bytes, or `delay` seconds
after the first byte of an unfinished run, so a prompt or an echoed key still
shows at once to a human.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

DEFAULT_LIMIT = 4096
#: Longest a byte without a newline waits: well under what a typist notices.
DEFAULT_DELAY_S = 0.005


class Scheduler(Protocol):
    def call_later(self, delay: float, callback: Callable[[], None]) -> object: ...


class OutputBatcher:
    """Thread-safe: write() from any vCPU thread, the delayed flush runs on the scheduler's thread."""

    def __init__(self, deliver: Callable[[bytes], None], scheduler: Scheduler | None,
                 limit: int = DEFAULT_LIMIT, delay: float = DEFAULT_DELAY_S) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1 byte")
        self._deliver = deliver
        self._scheduler = scheduler  # None: deliver every write at once (no loop to flush later)
        self._limit = limit
        self._delay = delay
        self._pending = bytearray()
        self._flush_scheduled = False
        # Held while delivering too, so that runs leave in the order they came.
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._pending += data
            if self._scheduler is None or b"\n" in data or len(self._pending) >= self._limit:
                self._deliver_locked()
                return
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._scheduler.call_later(self._delay, self._timer_flush)

    def flush(self) -> None:
        with self._lock:
            self._deliver_locked()

    def _timer_flush(self) -> None:
        with self._lock:
            self._flush_scheduled = False
            self._deliver_locked()

    def _deliver_locked(self) -> None:
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self._deliver(data)
