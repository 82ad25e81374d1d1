"""The VMM's single backend I/O thread.

One thread multiplexes every host-side file descriptor (terminals, ptys,
sockets, ioeventfds) with `selectors` (epoll on Linux) and runs timers and
callbacks posted from other threads. Callbacks take no arguments; an exception
in one is logged with its traceback and the loop carries on.

Registration (`add_reader` & co.) may be called from any thread: the epoll set
is updated directly under a lock (epoll_ctl is thread-safe and a running
epoll_wait sees new registrations), and callbacks are looked up at dispatch
time, so a callback removed by another thread is not called afterwards.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from microvmm.host.osthread import set_os_thread_name

logger = logging.getLogger(__name__)

Callback = Callable[[], None]

#: Longest time select() sleeps with nothing scheduled; only bounds how late
#: a stop() sent without a wakeup (never the case here) would be noticed.
_MAX_SLEEP = 1.0


class EventLoopError(Exception):
    """The event loop was used after close() or started twice."""


@dataclass(order=True)
class TimerHandle:
    """A pending call_later(); cancel() makes it a no-op."""

    when: float
    seq: int
    callback: Callback = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """A selector loop on its own non-daemon thread named "microvmm-io"."""

    def __init__(self, thread_name: str = "microvmm-io"):
        self._thread_name = thread_name
        self._selector = selectors.DefaultSelector()
        self._wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wakeup_fd, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._ready: deque[Callback] = deque()
        self._timers: list[TimerHandle] = []
        self._timer_seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False

    # -- registration -------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._set_interest(fd, self._readers, callback)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._set_interest(fd, self._writers, callback)

    def remove_reader(self, fd: int) -> bool:
        return self._clear_interest(fd, self._readers)

    def remove_writer(self, fd: int) -> bool:
        return self._clear_interest(fd, self._writers)

    def _events_for(self, fd: int) -> int:
        events = 0
        if fd in self._readers:
            events |= selectors.EVENT_READ
        if fd in self._writers:
            events |= selectors.EVENT_WRITE
        return events

    def _apply(self, fd: int, before: int) -> None:
        after = self._events_for(fd)
        if after == before:
            return
        if not before:
            self._selector.register(fd, after)
        elif not after:
            self._selector.unregister(fd)
        else:
            self._selector.modify(fd, after)

    def _set_interest(self, fd: int, table: dict[int, Callback], callback: Callback) -> None:
        if fd < 0:
            raise ValueError(f"invalid file descriptor {fd}")
        with self._lock:
            self._check_open()
            before = self._events_for(fd)
            previous = table.get(fd)
            table[fd] = callback
            try:
                self._apply(fd, before)
            except Exception:
                # Keep the tables in step with the selector (e.g. a regular
                # file, which epoll refuses with EPERM).
                if previous is None:
                    del table[fd]
                else:
                    table[fd] = previous
                raise

    def _clear_interest(self, fd: int, table: dict[int, Callback]) -> bool:
        with self._lock:
            if self._closed or fd not in table:
                return False
            before = self._events_for(fd)
            del table[fd]
            try:
                self._apply(fd, before)
            except (OSError, ValueError, KeyError):
                # The fd was closed before being removed; the kernel already
                # dropped it from the epoll set, so only forget it here.
                try:
                    self._selector.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
            return True

    # -- callbacks and timers -------------------------------------------------

    def call_soon_threadsafe(self, callback: Callback) -> None:
        with self._lock:
            self._check_open()
            self._ready.append(callback)
        self._wakeup()

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        with self._lock:
            self._check_open()
            handle = TimerHandle(time.monotonic() + max(0.0, delay), next(self._timer_seq), callback)
            heapq.heappush(self._timers, handle)
        self._wakeup()
        return handle

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _wakeup(self) -> None:
        try:
            os.eventfd_write(self._wakeup_fd, 1)
        except (BlockingIOError, OSError):
            pass  # counter saturated or closed: a wakeup is pending or moot

    def _check_open(self) -> None:
        if self._closed:
            raise EventLoopError("event loop is closed")

    # -- running --------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._check_open()
            if self._thread is not None:
                raise EventLoopError("event loop already started")
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=False)
            self._named = threading.Event()
        self._thread.start()
        # The thread names itself (an open of /proc/thread-self/comm for
        # writing) before start() returns: a seccomp filter installed right
        # after would refuse that open, or kill the process in KILL mode.
        self._named.wait(5.0)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the loop thread and wait for it (unless called from it)."""
        thread = self._thread
        self._stopping = True
        if thread is None:
            return
        self._wakeup()
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.error("event loop thread did not stop within %s s", timeout)
                return
            self._thread = None

    def close(self) -> None:
        """Stop the loop and release its fds; safe to call more than once."""
        if self._closed:
            return
        self.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._readers.clear()
            self._writers.clear()
            self._ready.clear()
            self._timers.clear()
        self._selector.close()
        os.close(self._wakeup_fd)

    def _next_timeout(self) -> float:
        with self._lock:
            if self._ready:
                return 0.0
            while self._timers and self._timers[0].cancelled:
                heapq.heappop(self._timers)
            if not self._timers:
                return _MAX_SLEEP
            return min(_MAX_SLEEP, max(0.0, self._timers[0].when - time.monotonic()))

    def _run(self) -> None:
        set_os_thread_name("io")
        self._named.set()
        logger.debug("event loop started")
        while not self._stopping:
            try:
                events = self._selector.select(self._next_timeout())
            except OSError:
                logger.exception("select failed")
                time.sleep(0.01)
                continue
            for key, mask in events:
                if key.fd == self._wakeup_fd:
                    try:
                        os.eventfd_read(self._wakeup_fd)
                    except BlockingIOError:
                        pass
                    continue
                if mask & selectors.EVENT_READ:
                    self._dispatch(self._readers, key.fd)
                if mask & selectors.EVENT_WRITE:
                    self._dispatch(self._writers, key.fd)
            self._run_due()
        logger.debug("event loop stopped")

    def _dispatch(self, table: dict[int, Callback], fd: int) -> None:
        with self._lock:
            callback = table.get(fd)
        if callback is not None:
            self._invoke(callback)

    def _run_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due: list[Callback] = list(self._ready)
            self._ready.clear()
            while self._timers and (self._timers[0].cancelled or self._timers[0].when <= now):
                handle = heapq.heappop(self._timers)
                if not handle.cancelled:
                    due.append(handle.callback)
        for callback in due:
            self._invoke(callback)

    @staticmethod
    def _invoke(callback: Callback) -> None:
        try:
            callback()
        except Exception:
            logger.exception("event loop callback %r failed", callback)
