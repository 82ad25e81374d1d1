"""Hostile-guest harness: the real console device, legacy PCI transport and PCI bus
driven by a guest that lies about everything, with every entry point and every
guest-memory access checked.

Used by tests/test_hostile_guest.py (hypothesis, bounded) and fuzz/run_fuzz.py
(long random runs). One generator serves both: it asks a `Chooser` for every
decision, backed by hypothesis draws or by a seeded `random.Random`, so a fuzz
failure replays exactly from its seed.

A case is: random guest RAM (two regions with a gap) -> an optional partial or
full bring-up -> a sequence of hostile operations (register accesses of every
size at every offset, PCI config cycles, MSI-X table/PBA accesses, crafted
descriptor chains and control messages, ring scribbles, backend events,
interleaved I/O-thread work) -> invariants -> reset and proper bring-up by a
well-behaved driver -> data must flow both ways again.

Invariants checked (`CaseResult.failures` lists each violation):
* no exception escapes a device entry point (bus/BAR/MSI-X accesses, queue
  notify, backend callbacks, event-loop callbacks);
* no guest-memory access outside guest RAM succeeds (`AuditedGuestMemory`
  checks every view against the regions independently of GuestMemory);
* after bad input the device is either active or flagged NEEDS_RESET
  (never silently wedged), and host-side queues stay bounded;
* reset + proper bring-up works: data flows both ways, no NEEDS_RESET.

This file also holds self-tests of the instruments (they must catch what they
claim to catch).
"""

from __future__ import annotations

import random
import struct
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pytest

from microvmm.memory import GuestMemory, GuestMemoryError
from microvmm.pci.bus import PciBus
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from microvmm.virtio.queue import DESC_SIZE, DescFlags
from microvmm.virtio_console.backends import PortBackend, TerminalSize
from microvmm.virtio_console.control import BAD_ID, ControlEvent
from microvmm.virtio_console.device import (
    CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, ConsoleFeature, VirtioConsole, rx_queue_index, tx_queue_index,
)
from microvmm.virtio_console.port import CONSOLE_BUFFER_LIMIT
from microvmm.virtio_console.spec import BackendKind, PortSpec
from tests.virtio_fake_driver import (
    F_EVENT_IDX, F_INDIRECT_DESC, MSI_NO_VECTOR, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_NEEDS_RESET, DriverRing, FakeIntxLine, FakeLegacyPciDriver, FakeMsiController,
    GuestAllocator,
)

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

    def write(self, data: bytes | memoryview) -> int:
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


class ConsoleRig:
    """One console (2 ports) on a PCI bus with audited random guest RAM."""

    def __init__(self, chooser: Chooser, loop: Any | None = None, queue_size: int | None = None,
                 trace: list[str] | None = None):
        self.c = chooser
        self.trace = trace
        self.memory = AuditedGuestMemory(REGIONS)
        for start, size in REGIONS:
            self.memory.view(start, size)[:] = chooser.bytes(size)
        self.loop = loop if loop is not None else ManualLoop()
        self.manual = isinstance(self.loop, ManualLoop)
        self.queue_size = queue_size or chooser.choice((2, 4, 8, 16))
        self.backends = [ScriptedBackend("con", console=True), ScriptedBackend("data", console=False)]
        specs = [PortSpec(True, BackendKind.PTY, "con"), PortSpec(False, BackendKind.PTY, "data")]
        self.device = VirtioConsole(list(zip(specs, self.backends)), self.loop, queue_size=self.queue_size)
        self.bus = PciBus()
        self.intx, self.msi = FakeIntxLine(), FakeMsiController()
        self.transport = VirtioPciLegacy(self.device, self.memory, intx=self.intx, msi=self.msi)
        self.bus.add_device(self.transport, SLOT)
        self.escapes: list[str] = []
        self.gbus = GuardedBus(self.bus, self.escapes)
        self.bar0 = self.transport.bar_address(0)
        self.bar1 = self.transport.bar_address(1)
        self.bar1_size = self.transport.bars[1].size
        self.msix_cap = self.transport.msix.cap_offset
        self.driver: SlotDriver | None = None
        self.settle()

    # -- plumbing ----------------------------------------------------------------

    def note(self, text: str) -> None:
        if self.trace is not None:
            self.trace.append(text)

    def settle(self) -> None:
        """Let the I/O thread run everything posted so far."""
        if self.manual:
            if not self.loop.run():
                self.escapes.append(f"event loop still busy after {LOOP_BUDGET} callbacks (livelock)")
        else:
            from tests.console_helpers import run_on_loop
            run_on_loop(self.loop, lambda: None)  # everything posted before has run

    def on_loop(self, what: str, function: Callable[[], None]) -> None:
        """Run a backend/ioeventfd event on the I/O thread."""
        def guarded() -> None:
            try:
                function()
            except Exception:
                self.escapes.append(f"{what} on the I/O thread raised:\n" + traceback.format_exc())
        self.loop.call_soon_threadsafe(guarded)

    def entry(self, what: str, function: Callable[[], Any]) -> Any:
        """Call a device entry point directly (vCPU side)."""
        try:
            return function()
        except Exception:
            self.escapes.append(f"{what} raised:\n" + traceback.format_exc())
            return None

    def loop_errors(self) -> list[str]:
        return list(self.loop.errors) if self.manual else []

    @property
    def num_queues(self) -> int:
        return self.transport.num_queues

    def cfg_select(self, offset: int) -> None:
        self.gbus.write(0, 4, 0x80000000 | (SLOT << 11) | (offset & 0xFC))

    # -- values a hostile guest likes -----------------------------------------------

    def addr(self) -> int:
        c = self.c
        kind = c.int(0, 9)
        if kind <= 3:
            start, size = c.choice(REGIONS)
            return start + c.int(0, size - 1)
        return c.choice((
            lambda: 0, lambda: GAP[0] - c.int(0, 64), lambda: GAP[0] + c.int(0, 64), lambda: GAP[1] - c.int(1, 64),
            lambda: RAM_END - c.int(0, 64), lambda: RAM_END + c.int(0, 4096), lambda: 2**64 - c.int(1, 4096),
            lambda: 2**63, lambda: c.int(0, 2**64 - 1), lambda: c.int(0, 2**32 - 1),
        ))()

    def length(self) -> int:
        c = self.c
        return c.choice((lambda: 0, lambda: c.int(1, 64), lambda: c.int(1, 4096), lambda: 2**32 - c.int(1, 64),
                         lambda: c.int(0, 2**32 - 1), lambda: 16 * c.int(1, 8), lambda: c.int(1, RAM_END)))()

    def value(self, size: int) -> int:
        c = self.c
        mask = (1 << 8 * size) - 1
        return c.choice((lambda: 0, lambda: mask, lambda: c.int(0, mask), lambda: c.int(0, 16) & mask,
                         lambda: (1 << c.int(0, 8 * size - 1)) & mask))()

    # -- well-behaved driver ---------------------------------------------------------

    def restore_pci(self) -> None:
        """What firmware/the kernel's PCI core does before a driver binds."""
        cfg = lambda off, size, value: (self.cfg_select(off), self.gbus.write(4 + (off & 3), size, value))
        cfg(0x04, 2, 0)
        cfg(0x10, 4, self.bar0)
        cfg(0x14, 4, self.bar1)
        cfg(self.msix_cap + 2, 2, 0)  # MSI-X off, function unmasked
        self.driver = SlotDriver(self.gbus, self.memory, GuestAllocator(self.memory, PAGE, REGIONS[0][1]),
                                 transport=self.transport)
        self.driver.enable()

    def bring_up(self, multiport: bool, msix: bool, event_idx: bool, indirect: bool) -> "ConsoleGuest":
        """Reset and probe like Linux's virtio_pci_legacy + virtio_console."""
        self.restore_pci()
        driver = self.driver
        assert driver is not None
        driver.reset()
        if msix:
            driver.enable_msix(self.num_queues + 1)
        wanted = F_SIZE | F_EMERG | (F_MULTIPORT if multiport else 0) \
            | (F_EVENT_IDX if event_idx else 0) | (F_INDIRECT_DESC if indirect else 0)
        features = driver.negotiate(wanted)
        if features != wanted:
            raise RecoveryError(f"features {features:#x} negotiated, {wanted:#x} wanted")
        if msix and driver.set_config_vector(0) != 0:
            raise RecoveryError("config vector not accepted")
        queues = self.num_queues if multiport else 2
        buffers = GuestAllocator(self.memory, REGIONS[1][0], REGIONS[1][0] + REGIONS[1][1])
        for index in range(queues):
            ring = driver.setup_queue(index, vector=1 + index if msix else MSI_NO_VECTOR)
            ring.allocator = buffers  # rings in region 0, buffers in region 1
        guest = ConsoleGuest(self, multiport)
        guest.start()
        return guest

    def recover_and_check(self, result: CaseResult) -> None:
        """Reset, proper bring-up, data both ways on every port."""
        c = self.c
        multiport, msix = c.chance(60), c.chance(50)
        event_idx, indirect = c.chance(50), c.chance(50)
        self.note(f"recover multiport={multiport} msix={msix} event_idx={event_idx} indirect={indirect}")
        for backend in self.backends:
            self.on_loop("backend reconnect", lambda b=backend: (b.set_capacity(None), b.set_connected_now(True)))
        self.settle()
        interrupts_before = self.intx.asserts + len(self.msi.triggered)
        guest = self.bring_up(multiport, msix, event_idx, indirect)
        ports = [0, 1] if multiport else [0]
        if not guest.wait(lambda: all(p in guest.opened for p in ports)):
            raise RecoveryError(f"ports never came up (control log {guest.control_log[-6:]})")
        for port in ports:
            backend = self.backends[port]
            out = b"out%d:" % port + c.bytes(c.int(1, 40))
            guest.write(port, out)
            if not guest.wait(lambda: bytes(backend.output).endswith(out)):
                raise RecoveryError(f"port {port}: guest output {out!r} never reached the backend "
                                    f"(tail {bytes(backend.output[-60:])!r})")
            inp = b"in%d:" % port + c.bytes(c.int(1, 300))
            self.on_loop("drop stale input", backend.input.clear)
            self.settle()
            guest.pump()
            guest.received[port] = bytearray()
            self.on_loop("backend input", lambda b=backend, d=inp: b.feed(d))
            if not guest.wait(lambda: bytes(guest.received[port]) == inp):
                raise RecoveryError(f"port {port}: backend input {inp!r} arrived as "
                                    f"{bytes(guest.received[port])!r}")
        if self.transport.status & STATUS_NEEDS_RESET:
            raise RecoveryError("NEEDS_RESET after a proper bring-up")
        if self.intx.asserts + len(self.msi.triggered) == interrupts_before:
            raise RecoveryError("no interrupt raised during the bring-up and data exchange")


class ConsoleGuest:
    """A synchronous virtio_console.c, reduced to its protocol (rings via DriverRing)."""

    def __init__(self, rig: ConsoleRig, multiport: bool):
        self.rig = rig
        self.driver = rig.driver
        self.multiport = multiport
        self.rings: dict[int, DriverRing] = self.driver.rings
        self.received: dict[int, bytearray] = {}
        self.opened: set[int] = set()
        self.control_log: list[tuple[int, int, int]] = []
        self.via_ioeventfd = rig.c.chance(50)

    def kick(self, index: int) -> None:
        ring = self.rings[index]
        if ring.kick_prepare():
            if self.via_ioeventfd:
                port = self.driver.io_base + REG_QUEUE_NOTIFY
                specs = [s for s in self.rig.transport.notify_ioeventfds() if s.port == port and s.datamatch == index]
                if len(specs) != 1:
                    raise RecoveryError(f"no ioeventfd for queue {index}")
                self.rig.on_loop("ioeventfd kick", lambda: self.rig.transport.queue_notify(index))
            else:
                self.driver.io_write(REG_QUEUE_NOTIFY, 2, index)

    def start(self) -> None:
        rings = self.rings
        size = self.rig.queue_size
        if self.multiport:
            for _ in range(size):
                rings[CONTROL_RX_QUEUE].add(writable=[64])
        else:
            self.fill_rx(0)
        self.driver.driver_ok()
        if self.multiport:
            self.send_control(BAD_ID, ControlEvent.DEVICE_READY, 1)
        else:
            self.opened.add(0)

    def fill_rx(self, port: int) -> None:
        ring = self.rings[rx_queue_index(port)]
        while ring.free:
            ring.add(writable=[self.rig.c.choice((1, 7, 64, 512))])
        self.kick(rx_queue_index(port))
        self.received.setdefault(port, bytearray())

    def send_control(self, port: int, event: int, value: int) -> None:
        ring = self.rings[CONTROL_TX_QUEUE]
        ring.get_used()
        for _ in range(20):  # Linux spins in __send_control_msg until the buffer is used
            if ring.free:
                break
            self.rig.settle()
            ring.get_used()
        else:
            raise RecoveryError("control transmit buffers never used")
        ring.add(readable=[CTRL.pack(port, event, value)])
        self.kick(CONTROL_TX_QUEUE)

    def write(self, port: int, data: bytes) -> None:
        ring = self.rings[tx_queue_index(port)]
        ring.get_used()
        split = self.rig.c.int(0, len(data))
        parts = [p for p in (data[:split], data[split:]) if p]
        ring.add(readable=parts)
        self.kick(tx_queue_index(port))

    def used(self, index: int) -> list:
        """Used entries of a queue; the device may never claim more than the buffers hold."""
        entries = self.rings[index].get_used()
        for entry in entries:
            if entry.length > len(entry.data):
                raise RecoveryError(f"queue {index}: used length {entry.length} exceeds the "
                                    f"{len(entry.data)}-byte buffers of chain {entry.head}")
        return entries

    def pump(self) -> None:
        rings = self.rings
        if self.multiport:
            for used in self.used(CONTROL_RX_QUEUE):
                port, event, value = CTRL.unpack_from(used.data)
                self.control_log.append((port, event, value))
                rings[CONTROL_RX_QUEUE].add(writable=[64])
                self.kick(CONTROL_RX_QUEUE)
                if event == ControlEvent.DEVICE_ADD:
                    self.fill_rx(port)
                    self.send_control(port, ControlEvent.PORT_READY, 1)
                    self.send_control(port, ControlEvent.PORT_OPEN, 1)
                    self.opened.add(port)
            rings[CONTROL_TX_QUEUE].get_used()
        for port in list(self.received):
            ring = rings[rx_queue_index(port)]
            for used in self.used(rx_queue_index(port)):
                self.received[port] += used.data
                ring.add(writable=[64])
                self.kick(rx_queue_index(port))
        for port in (0, 1):
            if tx_queue_index(port) in rings:
                rings[tx_queue_index(port)].get_used()

    def wait(self, predicate: Callable[[], bool], rounds: int = 60) -> bool:
        for _ in range(rounds):
            self.rig.settle()
            self.pump()
            if predicate():
                return True
            if not self.rig.manual:
                import time
                time.sleep(0.002)
        self.rig.settle()
        self.pump()
        return predicate()


# ---------------------------------------------------------------------------
# Hostile operations


class HostileGuest:
    """Generates and performs hostile operations against a rig."""

    def __init__(self, rig: ConsoleRig):
        self.rig = rig
        self.c = rig.c
        self.ops: list[Callable[[], None]] = [
            self.op_config_cycle, self.op_config_cycle, self.op_bar0_access, self.op_bar0_access,
            self.op_bar0_access, self.op_msix_access, self.op_scribble, self.op_chain, self.op_chain,
            self.op_chain, self.op_control, self.op_control, self.op_legit_write, self.op_legit_rx,
            self.op_backend_event, self.op_backend_event, self.op_kick, self.op_run_loop,
            self.op_reset, self.op_emergency_write,
        ]

    def setup(self) -> None:
        """Start from a fresh, half-set-up or fully running device."""
        rig, c = self.rig, self.c
        stage = c.int(0, 3)
        rig.note(f"setup stage {stage}")
        if stage == 0:
            return
        if stage == 1:  # features and queues at driver-chosen (maybe bad) pages, no DRIVER_OK
            rig.restore_pci()
            rig.driver.negotiate(c.int(0, 2**32 - 1))
            for index in range(rig.num_queues):
                if c.chance(70):
                    rig.driver.io_write(REG_QUEUE_SEL, 2, index)
                    pfn = c.choice((c.int(0, RAM_END // PAGE), c.int(0, 2**32 - 1), 0))
                    rig.driver.io_write(REG_QUEUE_PFN, 4, pfn)
            return
        guest = rig.bring_up(multiport=c.chance(70), msix=c.chance(50), event_idx=c.chance(50),
                             indirect=c.chance(60))
        self.guest = guest
        if stage == 3:
            guest.wait(lambda: len(guest.opened) == (2 if guest.multiport else 1), rounds=8)

    def run(self, count: int) -> None:
        for _ in range(count):
            op = self.c.choice(self.ops)
            try:
                op()
            except GuestGaveUp:
                pass

    # -- register and config accesses ----------------------------------------------

    def op_config_cycle(self) -> None:
        """Config mechanism #1: any port offset, any size, addresses near our function."""
        rig, c = self.rig, self.c
        if c.chance(50):
            bus = c.choice((0, 0, 0, 1, 255))
            slot = c.choice((SLOT, SLOT, 0, c.int(0, 31)))
            func = c.choice((0, 0, 0, c.int(0, 7)))
            reg = c.choice((0x04, 0x06, 0x10, 0x14, 0x18, 0x3C, 0x34, rig.msix_cap, rig.msix_cap + 2,
                            rig.msix_cap + 4, c.int(0, 0xFF)))
            enable = 0x80000000 if c.chance(90) else 0
            address = enable | bus << 16 | slot << 11 | func << 8 | reg
            if c.chance(10):
                address = c.int(0, 2**32 - 1)
            rig.gbus.write(0, 4, address)
            rig.note(f"cf8 <- {address:#x}")
        size = c.choice((1, 2, 4))
        offset = c.int(0, 8 - size) if c.chance(30) else 4 + c.int(0, 4 - size)
        if c.chance(60):
            value = self.config_value(size)
            rig.note(f"cfg port {offset}/{size} <- {value:#x}")
            rig.gbus.write(offset, size, value)
        else:
            rig.gbus.read(offset, size)

    def config_value(self, size: int) -> int:
        c, rig = self.c, self.rig
        mask = (1 << 8 * size) - 1
        return c.choice((lambda: rig.value(size), lambda: mask, lambda: rig.bar0 & mask,
                         lambda: (rig.bar1 & mask), lambda: 0x7, lambda: 0x407, lambda: 0xC000 & mask,
                         lambda: 0x8000 & mask, lambda: 0x4000 & mask))()

    def op_bar0_access(self) -> None:
        """Legacy registers: every size at every offset, through the bus or straight in."""
        rig, c = self.rig, self.c
        size = c.choice((1, 2, 4))
        offset = c.choice((c.int(0, 0xFF), c.int(0, 31), REG_STATUS, REG_QUEUE_PFN, REG_QUEUE_SEL,
                           REG_QUEUE_NOTIFY, 19, 20, 22, 24, 28, 32))
        write = c.chance(65)
        if offset in (REG_STATUS,) and write and c.chance(70):
            size = 1
            value = c.choice((0, 1, 3, 7, 0x40, 0x47, 0x80, 0xFF, c.int(0, 255)))
        elif offset == REG_QUEUE_PFN and write and c.chance(70):
            size = 4
            value = c.choice((0, c.int(0, RAM_END // PAGE), GAP[0] // PAGE, RAM_END // PAGE - 1,
                              c.int(0, 2**32 - 1)))
        elif offset == REG_QUEUE_SEL and write and c.chance(70):
            size = 2
            value = c.choice((c.int(0, rig.num_queues + 2), 0xFFFF))
        elif offset == REG_QUEUE_NOTIFY and write and c.chance(70):
            size = 2
            value = c.choice((c.int(0, rig.num_queues + 2), 0xFFFF))
        else:
            value = rig.value(size)
        direct = c.chance(40)
        rig.note(f"bar0 {'write' if write else 'read'} {offset:#x}/{size}"
                 f"{f' <- {value:#x}' if write else ''}{' direct' if direct else ''}")
        if direct:
            if write:
                rig.entry("bar0_write", lambda: rig.transport.bar0_write(offset, size, value))
            else:
                rig.entry("bar0_read", lambda: rig.transport.bar0_read(offset, size))
        elif write:
            rig.gbus.io_write(rig.bar0 + offset, size, value)
        else:
            rig.gbus.io_read(rig.bar0 + offset, size)

    def op_msix_access(self) -> None:
        """MSI-X table/PBA: in range, out of range, misaligned, every size."""
        rig, c = self.rig, self.c
        msix = rig.transport.msix
        size = c.choice((1, 2, 4, 8, 4, 4))
        offset = c.choice((c.int(0, msix.table_size + 32), msix.pba_offset + c.int(-8, 24),
                           c.int(0, rig.bar1_size - 1), 16 * c.int(0, msix.num_vectors) + 12,
                           c.int(-64, -1), rig.bar1_size + c.int(0, 64), c.int(0, 2**32)))
        write = c.chance(70)
        value = rig.value(size)
        if write and offset % 16 == 12 and c.chance(50):
            value = c.choice((0, 1))
        rig.note(f"msix {'write' if write else 'read'} {offset:#x}/{size}{f' <- {value:#x}' if write else ''}")
        if c.chance(50) and 0 <= offset <= rig.bar1_size - size:
            if write:
                rig.gbus.mmio_write(rig.bar1 + offset, size, value)
            else:
                rig.gbus.mmio_read(rig.bar1 + offset, size)
        elif write:
            rig.entry("msix write", lambda: msix.write(offset, size, value))
        else:
            rig.entry("msix read", lambda: msix.read(offset, size))

    # -- guest memory ------------------------------------------------------------------

    def op_scribble(self) -> None:
        """The guest overwrites part of its RAM, rings included."""
        rig, c = self.rig, self.c
        queues = [q for q in rig.transport.queues if q.ready]
        if queues and c.chance(70):
            q = c.choice(queues)
            base = c.choice((q.desc_addr, q.avail_addr, q.used_addr))
            addr = base + c.int(0, 32)
        else:
            start, size = c.choice(REGIONS)
            addr = start + c.int(0, size - 1)
        length = c.int(1, 16)
        if not rig.memory.inside(addr, length):
            raise GuestGaveUp
        rig.note(f"scribble {addr:#x}+{length}")
        rig.memory.write(addr, c.bytes(length))

    def hostile_desc(self, table_entries: int, index: int) -> tuple[int, int, int, int]:
        rig, c = self.rig, self.c
        flags = c.choice((0, DescFlags.NEXT, DescFlags.WRITE, DescFlags.NEXT | DescFlags.WRITE,
                          DescFlags.INDIRECT, DescFlags.INDIRECT | DescFlags.NEXT,
                          DescFlags.INDIRECT | DescFlags.WRITE, c.int(0, 0xFFFF)))
        nxt = c.choice((index + 1, index, 0, c.int(0, table_entries - 1), table_entries,
                        c.int(0, 0xFFFF)))
        return rig.addr(), rig.length(), int(flags), nxt & 0xFFFF

    def write_table(self, table: int, entries: int, nested: bool) -> None:
        rig, c = self.rig, self.c
        for i in range(entries):
            addr, length, flags, nxt = self.hostile_desc(entries, i)
            if c.chance(50):  # a plausible buffer
                start, size = c.choice(REGIONS)
                addr, length = start + c.int(0, size - 64), c.int(0, 64)
                flags = c.choice((0, DescFlags.WRITE)) | (DescFlags.NEXT if i + 1 < entries else 0)
                nxt = i + 1
            if nested and c.chance(30):
                inner = self.place(16 * 2)
                self.write_table(inner, 2, nested=False)
                addr, length, flags = inner, 32, DescFlags.INDIRECT
            rig.memory.write(table + DESC_SIZE * i, DESC.pack(addr, length & 0xFFFFFFFF, flags, nxt))

    def place(self, size: int) -> int:
        """Somewhere in guest RAM to put guest-made structures."""
        c = self.c
        start, region_size = c.choice(REGIONS)
        return start + 16 * c.int(0, (region_size - size) // 16)

    def op_chain(self) -> None:
        """A crafted chain: loops, wild/wrapping addresses and lengths, nested
        indirect tables, wrong-direction or zero-length buffers; then an avail idx
        that may be absurd, and a kick."""
        rig, c = self.rig, self.c
        index = c.int(0, rig.num_queues - 1)
        queue = rig.transport.queues[index]
        if not queue.ready:
            raise GuestGaveUp
        size = queue.size
        head = c.choice((c.int(0, size - 1), c.int(0, size - 1), size, c.int(0, 0xFFFF)))
        count = c.int(1, 4)
        for i in range(count):
            slot = (head + i) % size if c.chance(70) else c.int(0, size - 1)
            addr, length, flags, nxt = self.hostile_desc(size, slot)
            style = c.int(0, 9)
            if style <= 2:  # a plausible buffer of the right or wrong direction
                start, region_size = c.choice(REGIONS)
                addr, length = start + c.int(0, region_size - 600), c.choice((0, 1, 8, 512))
            elif style <= 4:  # an indirect table, maybe with nested indirect entries
                entries = c.int(1, 6)
                table = self.place(DESC_SIZE * entries)
                self.write_table(table, entries, nested=c.chance(50))
                addr = table
                length = c.choice((DESC_SIZE * entries, DESC_SIZE * entries + c.int(1, 15), 0,
                                   DESC_SIZE * 2000, rig.length()))
                flags = DescFlags.INDIRECT | (DescFlags.NEXT if c.chance(15) else 0)
            rig.memory.write(queue.desc_addr + DESC_SIZE * slot, DESC.pack(addr, length & 0xFFFFFFFF, flags, nxt))
        avail_idx = rig.memory.read_u16(queue.avail_addr + 2)
        rig.memory.write_u16(queue.avail_addr + 4 + 2 * (avail_idx % size), head & 0xFFFF)
        new_idx = c.choice((avail_idx + 1, avail_idx + 1, avail_idx + c.int(2, size), avail_idx + size + 1,
                            avail_idx - 1, c.int(0, 0xFFFF), queue.last_avail_idx + 0x8000))
        rig.memory.write_u16(queue.avail_addr + 2, new_idx & 0xFFFF)
        rig.note(f"chain q{index} head {head} x{count} avail {avail_idx}->{new_idx & 0xFFFF}")
        self.kick(index)

    def kick(self, index: int) -> None:
        rig, c = self.rig, self.c
        if c.chance(50):
            rig.gbus.io_write(rig.bar0 + REG_QUEUE_NOTIFY, 2, index)
        else:
            rig.on_loop("ioeventfd kick", lambda: rig.transport.queue_notify(index))
        if c.chance(60):
            rig.settle()

    def op_kick(self) -> None:
        rig, c = self.rig, self.c
        index = c.choice((c.int(0, rig.num_queues - 1), rig.num_queues, c.int(0, 0xFFFF), -1))
        rig.note(f"kick {index}")
        if index < 0 or c.chance(50):
            rig.on_loop("ioeventfd kick", lambda: rig.transport.queue_notify(index))
            rig.settle()
        else:
            self.kick(index)

    def op_control(self) -> None:
        """A control message: bad port ids, unknown or host-only events, short or
        split buffers, wrong direction."""
        rig, c = self.rig, self.c
        queue = rig.transport.queues[CONTROL_TX_QUEUE]
        if not queue.ready:
            raise GuestGaveUp
        port = c.choice((0, 1, 2, 15, 16, BAD_ID, c.int(0, 2**32 - 1)))
        event = c.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, c.int(0, 0xFFFF)))
        value = c.choice((0, 1, 2, c.int(0, 0xFFFF)))
        message = CTRL.pack(port, event, value) + c.bytes(c.choice((0, 0, 4, 16)))
        cut = c.choice((len(message), len(message), c.int(0, 7), c.int(0, len(message))))
        message = message[:cut]
        split = c.int(0, len(message))
        flags_first = c.choice((0, 0, 0, DescFlags.WRITE))
        size = queue.size
        head = c.int(0, size - 1)
        second = (head + 1) % size
        buf = self.place(64)
        rig.memory.write(buf, message)
        parts = [(buf, split), (buf + split, len(message) - split)] if c.chance(40) else [(buf, len(message))]
        for i, (addr, length) in enumerate(parts):
            last = i == len(parts) - 1
            slot = head if i == 0 else second
            flags = (flags_first if i == 0 else 0) | (0 if last else DescFlags.NEXT)
            rig.memory.write(queue.desc_addr + DESC_SIZE * slot, DESC.pack(addr, length, flags, second))
        avail_idx = rig.memory.read_u16(queue.avail_addr + 2)
        rig.memory.write_u16(queue.avail_addr + 4 + 2 * (avail_idx % size), head)
        rig.memory.write_u16(queue.avail_addr + 2, (avail_idx + 1) & 0xFFFF)
        rig.note(f"control port={port:#x} event={event} value={value} len={len(message)} parts={len(parts)}")
        self.kick(CONTROL_TX_QUEUE)

    def op_legit_write(self) -> None:
        guest = getattr(self, "guest", None)
        if guest is None:
            raise GuestGaveUp
        port = self.c.int(0, 1 if guest.multiport else 0)
        try:
            guest.write(port, self.c.bytes(self.c.int(1, 40)))
            guest.pump()
        except (RuntimeError, KeyError, MemoryError, AssertionError, GuestMemoryError, struct.error) as exc:
            raise GuestGaveUp from exc  # the guest's own bookkeeping is wrecked; not the device's fault
        self.rig.note(f"legit write port {port}")

    def op_legit_rx(self) -> None:
        guest = getattr(self, "guest", None)
        if guest is None:
            raise GuestGaveUp
        port = self.c.int(0, 1 if guest.multiport else 0)
        try:
            ring = guest.rings[rx_queue_index(port)]
            if ring.free:
                ring.add(writable=[self.c.choice((0, 1, 16, 512))])  # zero-length is hostile
            guest.kick(rx_queue_index(port))
            guest.pump()
        except (RuntimeError, KeyError, MemoryError, AssertionError, GuestMemoryError, struct.error) as exc:
            raise GuestGaveUp from exc
        self.rig.note(f"legit rx port {port}")

    # -- host side and timing -------------------------------------------------------------

    def op_backend_event(self) -> None:
        rig, c = self.rig, self.c
        backend = c.choice(rig.backends)
        kind = c.int(0, 4)
        if kind == 0:
            data = c.bytes(c.int(1, 64))
            rig.on_loop("backend input", lambda: backend.feed(data))
        elif kind == 1:
            capacity = c.choice((None, 0, c.int(1, 32)))
            rig.on_loop("backend writable", lambda: backend.set_capacity(capacity))
        elif kind == 2:
            connected = c.chance(50)
            rig.on_loop("backend connection", lambda: backend.set_connected_now(connected))
        elif kind == 3:
            port = rig.backends.index(backend)
            cols, rows = c.int(0, 0xFFFF), c.int(0, 0xFFFF)
            rig.entry("resize", lambda: rig.device.resize(port, cols, rows))
        else:
            rig.entry("refresh_sizes", rig.device.refresh_sizes)
            rig.entry("intx_resample", rig.transport.intx_resample)
        rig.note(f"backend event {kind} on {backend.name}")
        if c.chance(50):
            rig.settle()

    def op_run_loop(self) -> None:
        rig = self.rig
        rig.note("run loop")
        if rig.manual:
            rig.loop.run(limit=self.c.int(0, 8))
        else:
            rig.settle()

    def op_reset(self) -> None:
        rig, c = self.rig, self.c
        rig.note("reset")
        rig.entry("reset", lambda: rig.transport.bar0_write(REG_STATUS, 1, 0))
        self.guest = None
        if c.chance(50):
            # half a bring-up after the reset
            rig.entry("status", lambda: rig.transport.bar0_write(REG_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER))
            rig.entry("queue", lambda: (rig.transport.bar0_write(REG_QUEUE_SEL, 2, c.int(0, rig.num_queues)),
                                        rig.transport.bar0_write(REG_QUEUE_PFN, 4, c.int(0, RAM_END // PAGE))))
            if c.chance(50):
                rig.entry("driver ok", lambda: rig.transport.bar0_write(
                    REG_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK))

    def op_emergency_write(self) -> None:
        rig, c = self.rig, self.c
        offset = c.choice((8, 8, c.int(0, 12)))
        size = c.choice((1, 4))
        value = rig.value(size)
        rig.note(f"device config write {offset}/{size} <- {value:#x}")
        rig.entry("write_config", lambda: rig.transport.bar0_write(rig.transport.config_offset + offset, size, value))


# ---------------------------------------------------------------------------
# Invariants and the whole case


def check_state(rig: ConsoleRig, result: CaseResult) -> None:
    """After hostile input: the device is active or flagged NEEDS_RESET; host state bounded."""
    transport, device = rig.transport, rig.device
    status = transport.status
    # (A driver may write the bit itself; only the device's failure must show.)
    if transport.failed and not status & STATUS_NEEDS_RESET:
        result.failures.append(f"device failed but status {status:#x} lacks NEEDS_RESET")
    if transport.failed:
        result.needs_reset_seen = True
    if transport.activated and not transport.failed and not device._active:
        result.failures.append("device stopped without NEEDS_RESET (wedged)")
    if not transport.activated and device._active:
        result.failures.append("device active while the transport is not")
    if len(device._control_out) > CONTROL_BACKLOG_BOUND:
        result.failures.append(f"{len(device._control_out)} control messages queued host-side (unbounded)")
    for port in device.ports:
        if len(port.held) > CONSOLE_BUFFER_LIMIT:
            result.failures.append(f"port {port.index} holds {len(port.held)} bytes")


def collect(rig: ConsoleRig, result: CaseResult) -> None:
    result.failures.extend(rig.escapes)
    result.failures.extend(rig.loop_errors())
    result.failures.extend(rig.memory.violations)
    rig.escapes.clear()
    if rig.manual:
        rig.loop.errors.clear()
    rig.memory.violations.clear()


def run_case(chooser: Chooser, max_ops: int = 24, loop: Any | None = None,
             trace: list[str] | None = None) -> CaseResult:
    """One hostile-guest case; never raises for device misbehaviour, reports it."""
    result = CaseResult(trace=trace if trace is not None else [])
    rig = ConsoleRig(chooser, loop=loop, trace=result.trace)
    try:
        hostile = HostileGuest(rig)
        try:
            hostile.setup()
        except Exception as exc:
            result.failures.append(f"initial bring-up failed: {exc!r}\n" + traceback.format_exc())
            return result
        count = chooser.int(0, max_ops)
        hostile.run(count)
        result.ops = count
        rig.settle()
        collect(rig, result)
        check_state(rig, result)
        result.refused_accesses = rig.memory.refused
        try:
            rig.recover_and_check(result)
        except Exception as exc:  # whatever stops a proper driver is a failure
            result.failures.append(f"no recovery after reset: {exc!r}\n" + traceback.format_exc())
        rig.settle()
        collect(rig, result)
        check_state(rig, result)
        if rig.transport.failed:
            result.failures.append("NEEDS_RESET after the recovery exchange")
    finally:
        rig.entry("close", rig.device.close)
        if rig.manual:
            rig.loop.run()
    return result


# ---------------------------------------------------------------------------
# Self-tests of the instruments: they must catch what they claim to catch


def test_audited_memory_flags_an_escaping_view(monkeypatch):
    memory = AuditedGuestMemory(REGIONS)
    with pytest.raises(GuestMemoryError):
        memory.view(GAP[0] - 8, 16)  # straddles the gap
    assert memory.refused == 1 and not memory.violations
    # A GuestMemory that forgot its bounds check must be caught.
    monkeypatch.setattr(GuestMemory, "_locate", lambda self, gpa, length: (0, gpa))
    memory.view(GAP[0] - 8, 16)
    assert memory.violations and "outside guest RAM succeeded" in memory.violations[0]


def test_manual_loop_records_callback_exceptions():
    loop = ManualLoop()
    loop.call_soon_threadsafe(lambda: 1 / 0)
    loop.call_soon_threadsafe(lambda: loop.call_soon_threadsafe(lambda: None))
    assert loop.run()
    assert len(loop.errors) == 1 and "ZeroDivisionError" in loop.errors[0]


def test_harness_detects_a_device_that_raises(monkeypatch):
    """If an entry point lets an exception out, the case fails."""
    monkeypatch.setattr(VirtioConsole, "read_config", lambda self, offset, size: 1 / 0)
    rig = ConsoleRig(RandomChooser(1))
    rig.gbus.io_read(rig.bar0 + 20, 1)  # device config read, bus decoding on by firmware
    rig.restore_pci()
    rig.gbus.io_read(rig.bar0 + 20, 1)
    assert any("ZeroDivisionError" in e for e in rig.escapes)


def test_harness_detects_a_device_that_stops_working(monkeypatch):
    """A device whose output path is broken must fail the recovery check."""
    # Both ways out: single writes and the batched (vectored) transmit path.
    monkeypatch.setattr(VirtioConsole, "_write_out", lambda self, port, data: 0)
    monkeypatch.setattr(VirtioConsole, "_write_out_vectored", lambda self, port, views: 0)
    result = run_case(RandomChooser(7), max_ops=0)
    assert any("never reached the backend" in f for f in result.failures), result.failures


def test_clean_case_passes():
    for seed in range(5):
        result = run_case(RandomChooser(seed), max_ops=0)
        assert result.ok, (seed, result.failures)
