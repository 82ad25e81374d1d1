"""The device manager: puts the planned virtio functions on the PCI bus and
wires them to KVM, every one through the same VM-wide pieces.

- one GSI router (interrupts.GsiRouter): every function's MSI-X routes live
  in the one table KVM_SET_GSI_ROUTING replaces wholesale;
- one ioeventfd registry keyed by (device, queue): a BAR move re-registers
  only the moved function's queue kicks;
- the BAR windows: the bus's I/O and MMIO windows forwarded from the VMM's
  buses, and each BAR change dispatched to the function that changed.

Running devices are found by name ("virtio-console1") or kind while the guest
runs (a control socket adds console ports that way).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from microvmm.devmgr.plan import PlannedFunction, mp_table_irqs
from microvmm.devmgr.registry import DeviceContext, DeviceSetupError, HostContext, device_module

if TYPE_CHECKING:
    from microvmm.devices.bus import Bus
    from microvmm.eventloop import EventLoop
    from microvmm.memory import GuestMemory
    from microvmm.pci.bus import PciBus
    from microvmm.virtio.device import VirtioDevice
    from microvmm.virtio.pci_legacy import VirtioPciLegacy

logger = logging.getLogger(__name__)


@dataclass
class RunningDevice:
    """A device on the bus: its model, its transport and its interrupt sinks."""

    name: str
    kind: str
    slot: int
    device: "VirtioDevice"
    transport: "VirtioPciLegacy"
    intx: Any = None
    msi: Any = None


@dataclass
class _Pending:
    """A planned function whose host side is open, not yet on the bus."""

    function: PlannedFunction
    opened: Any = None
    extra: dict = field(default_factory=dict)


class PciBarWindow:
    """Forwards one of the PCI bus's address windows (a range on the VMM's
    port or MMIO bus) to the bus, which knows the current BARs."""

    def __init__(self, base: int, read: Callable[[int, int], int | None],
                 write: Callable[[int, int, int], Any]):
        self._base = base
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        value = self._read(self._base + offset, size)
        return (1 << (8 * size)) - 1 if value is None else value

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(self._base + offset, size, value)


class DeviceManager:
    """The VM's PCI devices, from the plan to teardown."""

    def __init__(self, plan: Sequence[PlannedFunction]):
        self.plan = list(plan)
        self._pending = [_Pending(f) for f in self.plan]
        self._running: dict[str, RunningDevice] = {}
        self._by_function: dict[int, RunningDevice] = {}
        self._host_open = False
        self.pci: PciBus | None = None
        self.router = None
        self.ioeventfds = None

    def mp_table_irqs(self) -> list:
        """The MP table's PCI interrupt routing (written before the bus exists)."""
        return mp_table_irqs(self.plan)

    # ---- before the guest runs ------------------------------------------------

    def open_host(self, context: HostContext) -> None:
        """Open every device's host resources (DeviceSetupError on failure)."""
        self._host_open = True
        for pending in self._pending:
            module = device_module(pending.function.kind)
            pending.opened = module.open_host(pending.function.request.options, context)

    # ---- while vCPU 0 boots -------------------------------------------------------

    def build(self, vm, memory: "GuestMemory", loop: "EventLoop", io_bus: "Bus", mmio_bus: "Bus",
              closers: list[Callable[[], None]], queue_size: int,
              output_tap: Callable[[str, bytes], None] | None = None,
              run_ports: Callable[[], list] = lambda: [], hotplug: bool = False) -> None:
        """The PCI bus on the VMM's buses, then every planned function on it."""
        from microvmm.interrupts import GsiRouter
        from microvmm.devmgr.ioeventfds import IoEventFdRegistry
        from microvmm.pci.bus import (CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, IO_BAR_WINDOW,
                                      MMIO_BAR_WINDOW, PciBus)
        self._vm, self._loop, self._closers = vm, loop, closers
        if not self._host_open:  # a run whose devices have nothing on the host to open
            self.open_host(HostContext(None, closers))
        self.pci = pci = PciBus()
        io_bus.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, pci, "pci-config")
        io_bus.register(IO_BAR_WINDOW[0], IO_BAR_WINDOW[1] - IO_BAR_WINDOW[0],
                        PciBarWindow(IO_BAR_WINDOW[0], pci.io_read, pci.io_write), "pci-io")
        mmio_bus.register(MMIO_BAR_WINDOW[0], MMIO_BAR_WINDOW[1] - MMIO_BAR_WINDOW[0],
                          PciBarWindow(MMIO_BAR_WINDOW[0], pci.mmio_read, pci.mmio_write), "pci-mmio")
        self.router = GsiRouter(vm)
        self.ioeventfds = IoEventFdRegistry(vm, loop)
        closers.append(self.ioeventfds.close)
        pci.bar_listener = self._bar_changed
        ordinals: dict[str, int] = {}
        for pending in self._pending:
            kind = pending.function.kind
            ordinal = ordinals.get(kind, 0)
            ordinals[kind] = ordinal + 1
            context = DeviceContext(memory=memory, loop=loop, closers=closers, queue_size=queue_size,
                                    ordinal=ordinal, output_tap=output_tap, run_ports=run_ports,
                                    hotplug=hotplug)
            device = device_module(kind).create_device(pending.opened, context)
            self._attach(pending.function, device, memory)
        self._pending.clear()
        self._check_routing()

    def _attach(self, function: PlannedFunction, device: "VirtioDevice", memory: "GuestMemory") -> None:
        from microvmm.interrupts import KvmIntxLine, KvmMsiController
        from microvmm.virtio.pci_legacy import VirtioPciLegacy
        assert self.pci is not None
        transport = VirtioPciLegacy(device, memory)
        assignment = self.pci.add_device(transport, slot=function.slot)
        msi = KvmMsiController(self._vm, self.router, transport.num_queues + 1)
        self._closers.append(msi.close)
        intx = None
        if assignment is not None:
            intx = KvmIntxLine(self._vm, assignment.gsi, self._loop, transport.intx_resample)
            self._closers.append(intx.close)
        transport.connect_interrupts(intx=intx, msi=msi)
        running = RunningDevice(function.name, function.kind, function.slot, device, transport, intx, msi)
        self._running[function.name] = running
        self._by_function[id(transport)] = running
        self._sync_ioeventfds(running)
        logger.debug("%s at 00:%02x.0", function.name, function.slot)

    def _check_routing(self) -> None:
        from microvmm.boot import PciIrq
        assert self.pci is not None
        assigned = [PciIrq(device=a.slot, pin=int(a.pin), ioapic_pin=a.gsi)
                    for a in self.pci.pci_irq_assignments()]
        planned = self.mp_table_irqs()  # what the guest's MP table already says
        if assigned != planned:
            raise DeviceSetupError(f"PCI interrupt routing {assigned} differs from the MP table's {planned}")

    # ---- while the guest runs -------------------------------------------------------

    def _bar_changed(self, function, index: int, old: int | None, new: int | None) -> None:
        running = self._by_function.get(id(function))
        if running is not None:
            self._sync_ioeventfds(running)

    def _sync_ioeventfds(self, running: RunningDevice) -> None:
        assert self.ioeventfds is not None
        self.ioeventfds.sync(running.name, running.transport.notify_ioeventfds(),
                             running.transport.queue_notify)

    def get(self, name: str) -> RunningDevice:
        """The running device called `name` ("virtio-console0"); KeyError if none."""
        return self._running[name]

    def of_kind(self, kind: str) -> list[RunningDevice]:
        """The running devices of one kind ("virtio-console"), in slot order."""
        return [d for d in self._running.values() if d.kind == kind]

    def __iter__(self) -> Iterator[RunningDevice]:
        return iter(list(self._running.values()))
