"""The rig of a hostile-guest case: the real console device, legacy PCI
transport and bus over audited memory; and a well-behaved driver (ConsoleGuest)
that brings it up and checks that data flows."""

from __future__ import annotations

import traceback
from typing import Any, Callable

from microvmm.pci.bus import PciBus
from microvmm.testing.fakes.hostile.instruments import (
    AuditedGuestMemory, CTRL, CaseResult, Chooser, F_EMERG, F_MULTIPORT, F_SIZE, GAP, GuardedBus, LOOP_BUDGET,
    ManualLoop, PAGE, RAM_END, REGIONS, REG_QUEUE_NOTIFY, RecoveryError, SLOT, ScriptedBackend, SlotDriver,
)
from microvmm.testing.fakes.virtio_driver import (
    F_EVENT_IDX, F_INDIRECT_DESC, MSI_NO_VECTOR, STATUS_NEEDS_RESET, DriverRing, FakeIntxLine,
    FakeMsiController, GuestAllocator,
)
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from microvmm.virtio_console.control import BAD_ID, ControlEvent
from microvmm.virtio_console.device import (
    CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, VirtioConsole, rx_queue_index, tx_queue_index,
)
from microvmm.virtio_console.spec import BackendKind, PortSpec


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
