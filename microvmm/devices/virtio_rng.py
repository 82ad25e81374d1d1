"""virtio-rng (virtio entropy device, id 4): `--device virtio-rng[,max-bytes=N,period=MS]`.

One request queue. The driver posts device-writable buffers; the device fills
each with bytes from the host's getrandom(2) and returns it with the number
written. Linux binds it as a hw_random source (/dev/hwrng,
/sys/class/misc/hw_random/rng_current = virtio_rng.N).

Rate limit: at most `max-bytes` bytes every `period` milliseconds (period
1000 when only max-bytes is given). A request is filled whole; one that does
not fit in what is left of the budget waits in the ring until the next
period: the guest's read blocks, never gets zero bytes (which Linux's hwrng
reader would just ask again for) nor part of its buffer. A request larger
than max-bytes gets max-bytes at the start of a period.

Bad guest input (a buffer the device can read, a chain with no writable
byte, a malformed chain) puts the device in NEEDS_RESET, logged once.

Threading: every queue operation runs on the event loop thread under the
lock; kicks from elsewhere are posted there. A generation number drops work
posted before a reset.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from microvmm.virtio.device import VirtioDevice, VirtioDeviceType

if TYPE_CHECKING:
    from microvmm.devmgr.registry import DeviceContext, HostContext
    from microvmm.eventloop import EventLoop, TimerHandle
    from microvmm.memory import GuestMemory
    from microvmm.virtio.queue import VirtQueue

logger = logging.getLogger(__name__)

REQUEST_QUEUE = 0
DEFAULT_QUEUE_SIZE = 64
#: Most bytes put into one request: bounds one getrandom call and the work a
#: single huge guest buffer can cause.
MAX_REQUEST_BYTES = 64 * 1024
DEFAULT_PERIOD_MS = 1000
MAX_PERIOD_MS = 3_600_000
MAX_RATE_BYTES = 1 << 30


@dataclass(frozen=True)
class RngOptions:
    """`max_bytes` per `period_ms` milliseconds; None: no limit."""

    max_bytes: int | None = None
    period_ms: int = DEFAULT_PERIOD_MS


def _integer(token: str, value: str, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise ValueError(f"{token!r}: expected an integer from {low} to {high}")
    return int(value)


def parse_options(text: str) -> RngOptions:
    """`max-bytes=N[,period=MS]` or nothing."""
    values: dict[str, int] = {}
    for token in text.split(",") if text else []:
        key, sep, value = token.partition("=")
        if key == "max-bytes" and sep and key not in values:
            values[key] = _integer(token, value, 1, MAX_RATE_BYTES)
        elif key == "period" and sep and key not in values:
            values[key] = _integer(token, value, 1, MAX_PERIOD_MS)
        else:
            raise ValueError(f"{token!r}: expected max-bytes=N or period=MS (each at most once)")
    if "period" in values and "max-bytes" not in values:
        raise ValueError("period=MS needs max-bytes=N")
    return RngOptions(values.get("max-bytes"), values.get("period", DEFAULT_PERIOD_MS))


def open_host(options: RngOptions, context: "HostContext") -> RngOptions:
    return options  # getrandom(2) needs nothing opened


def create_device(options: RngOptions, context: "DeviceContext") -> "VirtioRng":
    device = VirtioRng(context.loop, options, queue_size=context.queue_size)
    context.closers.append(device.close)
    return device


class VirtioRng(VirtioDevice):
    device_type = VirtioDeviceType.ENTROPY

    def __init__(self, loop: "EventLoop", options: RngOptions = RngOptions(),
                 queue_size: int = DEFAULT_QUEUE_SIZE,
                 entropy: Callable[[int], bytes] = os.getrandom,
                 clock: Callable[[], float] = time.monotonic):
        self.queue_max_sizes = (queue_size,)
        self._loop = loop
        self._options = options
        self._entropy = entropy
        self._clock = clock
        self._lock = threading.RLock()
        self._queue: VirtQueue | None = None
        self._signal_queue: Callable[[int], None] = lambda index: None
        self._fail: Callable[[str], None] = lambda reason: None
        self._generation = 0
        self._period_start = clock()
        self._period_used = 0
        self._refill: TimerHandle | None = None
        #: Bytes handed to the guest (statistics, tests).
        self.bytes_delivered = 0

    # ---- VirtioDevice -----------------------------------------------------------

    def device_features(self) -> int:
        return 0

    def read_config(self, offset: int, size: int) -> int:
        return 0  # no device config

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass

    def activate(self, memory: "GuestMemory", queues: list["VirtQueue"], driver_features: int,
                 signal_queue: Callable[[int], None], signal_config: Callable[[], None],
                 fail: Callable[[str], None]) -> None:
        with self._lock:
            self._queue = queues[REQUEST_QUEUE]
            self._signal_queue, self._fail = signal_queue, fail
            self._generation += 1
            self._post(self._fill)

    def reset(self) -> None:
        with self._lock:
            self._queue = None
            self._generation += 1
            self._cancel_refill()

    def queue_notify(self, index: int) -> None:
        if index != REQUEST_QUEUE:
            return
        if self._loop.in_loop_thread():
            with self._lock:
                self._fill()
        else:
            with self._lock:
                self._post(self._fill)

    def close(self) -> None:
        with self._lock:
            self._queue = None
            self._generation += 1
            self._cancel_refill()

    # ---- loop thread ------------------------------------------------------------------

    def _post(self, work: Callable[[], None], delay: float | None = None) -> "TimerHandle | None":
        """Run `work` on the loop under the lock unless a reset came first (caller holds the lock)."""
        generation = self._generation

        def run() -> None:
            with self._lock:
                if generation == self._generation:
                    work()
        if delay is None:
            self._loop.call_soon_threadsafe(run)
            return None
        return self._loop.call_later(delay, run)

    def _cancel_refill(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None

    def _budget(self) -> int:
        """Bytes the rate limit allows now (starting a new period when one is over)."""
        if self._options.max_bytes is None:
            return MAX_REQUEST_BYTES
        now = self._clock()
        period = self._options.period_ms / 1000
        if now - self._period_start >= period - 1e-9:  # (the refill timer fires at the period's end)
            self._period_start = now
            self._period_used = 0
        return self._options.max_bytes - self._period_used

    def _fill(self) -> None:
        from microvmm.memory import GuestMemoryError
        from microvmm.virtio.queue import VirtQueueError
        queue = self._queue
        if queue is None:
            return
        try:
            used = self._fill_requests(queue)
        except (VirtQueueError, GuestMemoryError) as exc:
            self._queue = None
            self._generation += 1
            self._cancel_refill()
            self._fail(str(exc))
            return
        if used and queue.needs_notification():
            self._signal_queue(REQUEST_QUEUE)

    def _fill_requests(self, queue: "VirtQueue") -> bool:
        from microvmm.virtio.queue import VirtQueueError
        used = False
        while True:
            budget = self._budget()
            if budget <= 0:
                if queue.has_available():
                    self._wait_for_budget()
                return used
            chain = queue.pop()
            if chain is None:
                return used
            if chain.readable:
                raise VirtQueueError(f"request {chain.head} has a device-readable buffer")
            room = chain.writable_len
            if room == 0:
                raise VirtQueueError(f"request {chain.head} has no writable byte")
            want = min(room, MAX_REQUEST_BYTES)
            if want > budget and budget < (self._options.max_bytes or 0):
                # Whole requests only: Linux 6.1's driver stalled for good after
                # a partly filled request here (max-bytes=1000: hung; 1024,
                # whole 64-byte requests: fine). Only a request larger than
                # max-bytes itself gets max-bytes, at the start of a period.
                queue.undo_pop()
                self._wait_for_budget()
                return used
            data = self._entropy(min(want, budget))
            written = chain.write(data)
            queue.add_used(chain.head, written)
            self._period_used += written
            self.bytes_delivered += written
            used = True

    def _wait_for_budget(self) -> None:
        if self._refill is not None:
            return
        delay = max(0.0, self._period_start + self._options.period_ms / 1000 - self._clock())

        def refill() -> None:
            self._refill = None
            self._fill()
        self._refill = self._post(refill, delay)
