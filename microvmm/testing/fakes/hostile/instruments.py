"""The hostile-guest harness's instruments: where decisions come from
(choosers), guest memory that audits every access, a hand-run event loop, a
scripted backend, a bus that records escaping exceptions; the case constants."""

from __future__ import annotations

import random
import struct
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from microvmm.memory import GuestMemory, GuestMemoryError
from microvmm.pci.bus import PciBus
from microvmm.testing.fakes.virtio_driver import FakeLegacyPciDriver
from microvmm.virtio_console.backends import PortBackend, TerminalSize
from microvmm.virtio_console.device import ConsoleFeature
from microvmm.virtio_console.spec import BackendKind


PAGE = 4096
#: Guest RAM: two regions with a gap between them (like RAM below/above a PCI hole).
REGIONS = ((0x0, 16 * PAGE), (0x20000, 16 * PAGE))
GAP = (REGIONS[0][0] + REGIONS[0][1], REGIONS[1][0])
RAM_END = REGIONS[1][0] + REGIONS[1][1]
SLOT = 5
F_SIZE = 1 << ConsoleFeature.SIZE
F_MULTIPORT = 1 << ConsoleFeature.MULTIPORT
F_EMERG = 1 << ConsoleFeature.EMERG_WRITE
CTRL = struct.Struct("<IHH")
DESC = struct.Struct("<QIHH")
#: Host-side control messages waiting for guest buffers; more means a guest is
#: making the host queue without bound.
CONTROL_BACKLOG_BOUND = 4096
#: Loop callbacks per drain before we call it a livelock.
LOOP_BUDGET = 20000

REG_QUEUE_PFN, REG_QUEUE_SEL, REG_QUEUE_NOTIFY, REG_STATUS = 8, 14, 16, 18


# ---------------------------------------------------------------------------
# Choosers: where every decision of a case comes from


class Chooser:
    """Source of decisions; subclasses draw from random.Random or hypothesis."""

    def int(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.int(0, len(options) - 1)]

    def chance(self, percent: int) -> bool:
        return self.int(0, 99) < percent

    def bytes(self, n: int) -> bytes:
        return random.Random(self.int(0, 2**32 - 1)).randbytes(n)


class RandomChooser(Chooser):
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class HypothesisChooser(Chooser):
    def __init__(self, data: Any):
        from hypothesis import strategies as st
        self._data = data
        self._st = st

    def int(self, lo: int, hi: int) -> int:
        return self._data.draw(self._st.integers(lo, hi))

    def bytes(self, n: int) -> bytes:
        if n <= 64:
            return self._data.draw(self._st.binary(min_size=n, max_size=n))
        return super().bytes(n)  # bulk data from a drawn seed (hypothesis buffers are small)


# ---------------------------------------------------------------------------
# Instruments


class AuditedGuestMemory(GuestMemory):
    """GuestMemory that checks every view against the regions (independently of
    GuestMemory's own check) and records accesses, refusals and violations."""

    def __init__(self, layout: Sequence[tuple[int, int]]):
        super().__init__(list(layout))
        self._bounds = tuple((r.guest_addr, r.end) for r in self.regions)
        self.accesses = 0
        self.refused = 0
        self.violations: list[str] = []

    def inside(self, gpa: int, length: int) -> bool:
        if gpa < 0 or length < 0:
            return False
        for start, end in self._bounds:
            if start <= gpa and gpa + length <= end:
                return True
        return False

    def view(self, gpa: int, length: int) -> memoryview:
        self.accesses += 1
        try:
            view = super().view(gpa, length)
        except GuestMemoryError:
            self.refused += 1
            raise
        except Exception as exc:  # anything else is a checking bug, not a refusal
            self.violations.append(f"view({gpa!r}, {length!r}) raised {exc!r} instead of GuestMemoryError")
            raise
        if not self.inside(gpa, length) or len(view) != length:
            self.violations.append(f"view({gpa:#x}, {length:#x}) outside guest RAM succeeded "
                                   f"({len(view)} bytes)")
        return view


class ManualLoop:
    """Synchronous stand-in for EventLoop: callbacks run when the harness drains
    it, in order, on the calling thread (which counts as the loop thread
    meanwhile). Like EventLoop an exception does not stop the loop, but here it
    is recorded: any callback exception is an invariant violation."""

    def __init__(self) -> None:
        self._ready: deque[Callable[[], None]] = deque()
        self._in_loop = False
        self.errors: list[str] = []
        self.executed = 0

    # the EventLoop API the device and backends use
    running = False  # VirtioConsole.close() then closes inline

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._ready.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        raise AssertionError("the scripted backends never need timers")

    def in_loop_thread(self) -> bool:
        return self._in_loop

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        raise AssertionError("the scripted backends have no fds")

    add_writer = add_reader

    def remove_reader(self, fd: int) -> bool:
        return False

    remove_writer = remove_reader

    # harness side
    @property
    def pending(self) -> int:
        return len(self._ready)

    def run(self, limit: int = LOOP_BUDGET) -> bool:
        """Run up to `limit` callbacks (including ones they post); True if idle after."""
        count = 0
        self._in_loop = True
        try:
            while self._ready and count < limit:
                callback = self._ready.popleft()
                count += 1
                self.executed += 1
                try:
                    callback()
                except Exception:
                    self.errors.append("event-loop callback raised:\n" + traceback.format_exc())
        finally:
            self._in_loop = False
        return not self._ready

    def run_in_loop(self, function: Callable[[], None]) -> None:
        """Post `function` and drain: e.g. an ioeventfd kick handled on the loop thread."""
        self.call_soon_threadsafe(function)
        self.run()


class ScriptedBackend(PortBackend):
    """In-memory backend with input and output, level-triggered like epoll.

    Host-side events (`feed`, `set_capacity`, `set_connected_now`) must run on
    the loop thread, as real backend events do."""

    kind = BackendKind.PTY
    has_input = True

    def __init__(self, name: str, console: bool):
        super().__init__(name)
        self.input = bytearray()
        self.output = bytearray()
        self.capacity: int | None = None  # bytes it takes before blocking; None: unlimited
        self.size = TerminalSize(80, 25) if console else None
        self._connected = True

    def write_vectored(self, buffers) -> int:
        data = b"".join(buffers)
        taken = len(data) if self.capacity is None else min(len(data), self.capacity)
        if self.capacity is not None:
            self.capacity -= taken
        self.output += data[:taken]
        if len(self.output) > 1 << 16:
            del self.output[:-(1 << 15)]  # keep a tail: checks look at the newest bytes
        return taken

    def read(self, max_bytes: int) -> bytes:
        data = bytes(self.input[:max_bytes])
        del self.input[:max_bytes]
        return data

    def terminal_size(self) -> TerminalSize | None:
        return self.size

    def set_read_interest(self, wanted: bool) -> None:
        super().set_read_interest(wanted)
        if wanted and self.input and self.connected and self._loop is not None:
            self._loop.call_soon_threadsafe(self._fire_if_readable)

    def set_write_interest(self, wanted: bool) -> None:
        super().set_write_interest(wanted)
        if wanted and self.connected and self.capacity != 0 and self._loop is not None:
            self._loop.call_soon_threadsafe(self._fire_if_writable)

    def _fire_if_readable(self) -> None:
        if self._want_read and self.input and self.connected:
            self._fire_readable()

    def _fire_if_writable(self) -> None:
        if self._want_write and self.connected and self.capacity != 0:
            self._fire_writable()

    # host-side events
    def feed(self, data: bytes) -> None:
        self.input += data
        self._fire_if_readable()

    def set_capacity(self, capacity: int | None) -> None:
        self.capacity = capacity
        self._fire_if_writable()

    def set_connected_now(self, connected: bool) -> None:
        self._set_connected(connected)


class GuardedBus:
    """The guest's view of the PCI bus: every access is a device entry point, so
    an exception here is recorded as an escape and the access reads all-ones."""

    def __init__(self, bus: PciBus, escapes: list[str]):
        self._bus = bus
        self._escapes = escapes

    def _guard(self, what: str, function: Callable[[], Any], fallback: Any) -> Any:
        try:
            return function()
        except Exception:
            self._escapes.append(f"{what} raised:\n" + traceback.format_exc())
            return fallback

    def read(self, offset: int, size: int) -> int:
        return self._guard(f"config read {offset}/{size}", lambda: self._bus.read(offset, size),
                           (1 << 8 * size) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self._guard(f"config write {offset}/{size}={value:#x}", lambda: self._bus.write(offset, size, value), None)

    def io_read(self, port: int, size: int) -> int | None:
        return self._guard(f"io read {port:#x}/{size}", lambda: self._bus.io_read(port, size), None)

    def io_write(self, port: int, size: int, value: int) -> bool:
        return self._guard(f"io write {port:#x}/{size}={value:#x}",
                           lambda: self._bus.io_write(port, size, value), False)

    def mmio_read(self, address: int, size: int) -> int | None:
        return self._guard(f"mmio read {address:#x}/{size}", lambda: self._bus.mmio_read(address, size), None)

    def mmio_write(self, address: int, size: int, value: int) -> bool:
        return self._guard(f"mmio write {address:#x}/{size}={value:#x}",
                           lambda: self._bus.mmio_write(address, size, value), False)


class SlotDriver(FakeLegacyPciDriver):
    """The fake Linux driver, told the slot instead of scanning all 32."""

    def _find(self, device_id: int | None) -> int:
        return SLOT


class RecoveryError(AssertionError):
    """The device did not come back after reset + proper bring-up."""


class GuestGaveUp(Exception):
    """The guest-side helper could not do what it wanted (its own state is garbage)."""


# ---------------------------------------------------------------------------
# The rig


@dataclass
class CaseResult:
    failures: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    needs_reset_seen: bool = False
    refused_accesses: int = 0
    ops: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures
