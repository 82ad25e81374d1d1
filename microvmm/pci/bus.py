"""PCI bus 0: configuration mechanism #1 (ports 0xCF8-0xCFF) and BAR dispatch.

Acts as firmware too: when a function is added it gets BAR addresses and an
INTx GSI pre-assigned, so Linux can use them as-is without reassigning.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass

from microvmm.pci.config import (
    BarKind,
    BarListener,
    BarWindow,
    InterruptPin,
    PciConfigError,
    PciFunction,
    PciIds,
)

logger = logging.getLogger(__name__)

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
#: The bus claims this many ports from CONFIG_ADDRESS_PORT.
CONFIG_PORTS_LENGTH = 8

IO_BAR_WINDOW = (0xC000, 0x10000)
MMIO_BAR_WINDOW = (0xE0000000, 0xFEC00000)
#: IOAPIC pins for PCI INTx: above the 16 ISA IRQs (the MP table keeps 0..15 for ISA).
DEFAULT_INTX_GSIS = tuple(range(16, 24))

HOST_BRIDGE_IDS = PciIds(vendor_id=0x8086, device_id=0x0D57, class_code=0x060000)

NUM_SLOTS = 32
NUM_FUNCTIONS = 8


class ConfigAddress(enum.IntEnum):
    ENABLE = 1 << 31


@dataclass(frozen=True)
class PciIrqAssignment:
    """INTx routing of one function (for the MP table and the irqfd setup)."""

    slot: int
    function: int
    pin: InterruptPin
    gsi: int
    device: PciFunction


class PciBusError(Exception):
    """Invalid bus setup (slot taken, windows exhausted...): a VMM bug."""


class HostBridge(PciFunction):
    """00:00.0: identifies the bus to Linux (pci_sanity_check wants a host bridge)."""

    def __init__(self) -> None:
        super().__init__(HOST_BRIDGE_IDS)


class PciBus:
    """Bus 0 with config mechanism #1; register it at port 0xCF8 (length 8)."""

    def __init__(self, intx_gsis: tuple[int, ...] = DEFAULT_INTX_GSIS):
        self._lock = threading.Lock()
        self._address = 0
        self._functions: dict[tuple[int, int], PciFunction] = {}
        self._irqs: list[PciIrqAssignment] = []
        self._free_gsis = list(intx_gsis)
        self._next_io = IO_BAR_WINDOW[0]
        self._next_mmio = MMIO_BAR_WINDOW[0]
        self._windows: tuple[BarWindow, ...] = ()
        self.bar_listener: BarListener | None = None
        self.add_device(HostBridge(), 0)

    # ---- setup --------------------------------------------------------------

    def add_device(self, function: PciFunction, slot: int, func: int = 0) -> PciIrqAssignment | None:
        """Plug `function` at 00:slot.func, assign its BARs and INTx GSI."""
        if not 0 <= slot < NUM_SLOTS or not 0 <= func < NUM_FUNCTIONS:
            raise PciBusError(f"invalid slot {slot}.{func}")
        if (slot, func) in self._functions:
            raise PciBusError(f"slot {slot}.{func} is taken")
        if func != 0 and (slot, 0) not in self._functions:
            raise PciBusError(f"slot {slot} needs function 0 before function {func}")
        needs_intx = function.interrupt_pin != InterruptPin.NONE
        if needs_intx and not self._free_gsis:
            raise PciBusError("no INTx GSI left")
        # Largest BARs first keeps natural alignment from wasting the windows.
        for bar in sorted((b for b in function.bars if b is not None), key=lambda b: -b.size):
            function.set_bar_address(bar.index, self._allocate(bar.kind, bar.size))
        assignment = None
        if needs_intx:
            gsi = self._free_gsis.pop(0)
            function.interrupt_line = gsi
            assignment = PciIrqAssignment(slot, func, InterruptPin(function.interrupt_pin), gsi, function)
            self._irqs.append(assignment)
        function.bar_listener = self._bar_changed
        self._functions[(slot, func)] = function
        self._rebuild_windows()
        return assignment

    def _allocate(self, kind: BarKind, size: int) -> int:
        if kind is BarKind.IO:
            base = (self._next_io + size - 1) & ~(size - 1)
            if base + size > IO_BAR_WINDOW[1]:
                raise PciBusError("I/O BAR window exhausted")
            self._next_io = base + size
        else:
            base = (self._next_mmio + size - 1) & ~(size - 1)
            if base + size > MMIO_BAR_WINDOW[1]:
                raise PciBusError("MMIO BAR window exhausted")
            self._next_mmio = base + size
        return base

    def pci_irq_assignments(self) -> list[PciIrqAssignment]:
        return list(self._irqs)

    def function_at(self, slot: int, func: int = 0) -> PciFunction | None:
        return self._functions.get((slot, func))

    # ---- BAR dispatch ---------------------------------------------------------

    def _bar_changed(self, function: PciFunction, index: int, old: int | None, new: int | None) -> None:
        self._rebuild_windows()
        logger.debug("BAR%d of %04x:%04x: %s -> %s", index, function.ids.vendor_id,
                     function.ids.device_id, _fmt(old), _fmt(new))
        if self.bar_listener is not None:
            self.bar_listener(function, index, old, new)

    def _rebuild_windows(self) -> None:
        # Immutable snapshot: dispatch from several vCPU threads reads it without a lock.
        self._windows = tuple(w for f in self._functions.values() for w in f.windows())

    def _find(self, kind: BarKind, address: int) -> BarWindow | None:
        for window in self._windows:
            if window.bar.kind is kind and window.base <= address < window.end:
                return window
        return None

    def io_read(self, port: int, size: int) -> int | None:
        window = self._find(BarKind.IO, port)
        return None if window is None else window.bar.handler.read(port - window.base, size)

    def io_write(self, port: int, size: int, value: int) -> bool:
        window = self._find(BarKind.IO, port)
        if window is None:
            return False
        window.bar.handler.write(port - window.base, size, value)
        return True

    def mmio_read(self, address: int, size: int) -> int | None:
        window = self._find(BarKind.MEMORY32, address)
        return None if window is None else window.bar.handler.read(address - window.base, size)

    def mmio_write(self, address: int, size: int, value: int) -> bool:
        window = self._find(BarKind.MEMORY32, address)
        if window is None:
            return False
        window.bar.handler.write(address - window.base, size, value)
        return True

    # ---- config mechanism #1 (device at 0xCF8, offsets 0..7) ------------------

    def _target(self, data_offset: int, size: int) -> tuple[PciFunction | None, int] | None:
        """(function or None if absent, config offset) for a data-window access."""
        address = self._address
        if not address & ConfigAddress.ENABLE:
            return None
        if data_offset + size > 4:
            return None  # would cross the dword the address selects
        bus = (address >> 16) & 0xFF
        slot = (address >> 11) & 0x1F
        func = (address >> 8) & 0x7
        offset = (address & 0xFC) + data_offset
        if bus != 0:
            return None, offset
        return self._functions.get((slot, func)), offset

    def read(self, offset: int, size: int) -> int:
        all_ones = (1 << (8 * size)) - 1
        with self._lock:
            if offset < 4:
                # CONFIG_ADDRESS is a 32-bit register; narrower accesses do not reach it.
                return self._address if offset == 0 and size == 4 else all_ones
            target = self._target(offset - 4, size)
            if target is None or target[0] is None:
                return all_ones
            function, config_offset = target
            return function.config_read(config_offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset < 4:
                if offset == 0 and size == 4:
                    self._address = value & 0x80FFFFFC
                return
            target = self._target(offset - 4, size)
            if target is None or target[0] is None:
                return
            function, config_offset = target
        # Outside the bus lock: a config write may call the BAR listener (VMM work).
        function.config_write(config_offset, size, value)


def _fmt(address: int | None) -> str:
    return "off" if address is None else f"{address:#x}"


__all__ = [
    "CONFIG_ADDRESS_PORT", "CONFIG_DATA_PORT", "CONFIG_PORTS_LENGTH", "HostBridge", "PciBus",
    "PciBusError", "PciIrqAssignment", "PciConfigError",
]
