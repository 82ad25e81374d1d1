"""PCI type-0 configuration space of one function: registers, BARs, capabilities.

The 256-byte space is stored as bytes with a per-byte writable mask and a
write-1-to-clear mask, so any access size/offset the guest uses behaves like
hardware: read-only bits keep their value, BAR size probing (write all-ones,
read back) returns the size mask because the low address bits are read-only.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

logger = logging.getLogger(__name__)

CONFIG_SPACE_SIZE = 256
NUM_BARS = 6


class ConfigReg(enum.IntEnum):
    """Offsets in the type-0 header."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    CLASS_PROG = 0x09  # class code: prog-if 0x09, subclass 0x0A, base class 0x0B
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BAR0 = 0x10
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    EXPANSION_ROM = 0x30
    CAPABILITIES_PTR = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


class Command(enum.IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


class Status(enum.IntFlag):
    INTERRUPT = 1 << 3
    CAP_LIST = 1 << 4
    # Error bits the guest clears by writing 1 to them.
    MASTER_DATA_PARITY = 1 << 8
    SIG_TARGET_ABORT = 1 << 11
    RCV_TARGET_ABORT = 1 << 12
    RCV_MASTER_ABORT = 1 << 13
    SIG_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY = 1 << 15


STATUS_W1C = (Status.MASTER_DATA_PARITY | Status.SIG_TARGET_ABORT | Status.RCV_TARGET_ABORT
              | Status.RCV_MASTER_ABORT | Status.SIG_SYSTEM_ERROR | Status.DETECTED_PARITY)
COMMAND_WRITABLE = (Command.IO | Command.MEMORY | Command.BUS_MASTER | Command.PARITY
                    | Command.SERR | Command.INTX_DISABLE)


class InterruptPin(enum.IntEnum):
    NONE = 0
    INTA = 1
    INTB = 2
    INTC = 3
    INTD = 4


class BarKind(enum.Enum):
    IO = "io"
    MEMORY32 = "mem32"


class RegisterDevice(Protocol):
    """Registers behind a BAR; offsets relative to the BAR base."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass
class PciBar:
    index: int
    kind: BarKind
    size: int
    handler: RegisterDevice
    prefetchable: bool = False

    @property
    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return 0x1
        return 0x8 if self.prefetchable else 0x0


@dataclass(frozen=True)
class BarWindow:
    """A BAR as currently decoded: address range the function responds to."""

    function: "PciFunction"
    bar: PciBar
    base: int

    @property
    def end(self) -> int:
        return self.base + self.bar.size


@dataclass(frozen=True)
class PciIds:
    vendor_id: int
    device_id: int
    class_code: int  # 24 bits: base class << 16 | subclass << 8 | prog-if
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    interrupt_pin: InterruptPin = InterruptPin.NONE


#: Called with (function, bar index, old base or None, new base or None) when a
#: BAR's decoded address changes (moved, or decode enabled/disabled).
BarListener = Callable[["PciFunction", int, "int | None", "int | None"], None]
#: Called after a config write touched [offset, offset + size) of a hooked range.
ConfigWriteHook = Callable[[int, int], None]


class PciConfigError(Exception):
    """Invalid function setup (a VMM bug, not guest input)."""


class PciFunction:
    """A PCI function's config space. Subclasses add BARs and capabilities.

    Config accesses arrive from vCPU threads (through the bus, which serialises
    them); BAR-decode changes are reported to `bar_listener` after the write.
    """

    def __init__(self, ids: PciIds):
        self.ids = ids
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self.bars: list[PciBar | None] = [None] * NUM_BARS
        self._last_cap: int | None = None
        self._cap_end = 0x40  # capabilities are placed after the standard header
        self._write_hooks: list[tuple[int, int, ConfigWriteHook]] = []
        self._decoded: dict[int, int] = {}
        self.bar_listener: BarListener | None = None
        self._lock = threading.RLock()

        self._set16(ConfigReg.VENDOR_ID, ids.vendor_id)
        self._set16(ConfigReg.DEVICE_ID, ids.device_id)
        self.config[ConfigReg.REVISION_ID] = ids.revision
        self.config[ConfigReg.CLASS_PROG:ConfigReg.CLASS_PROG + 3] = ids.class_code.to_bytes(3, "little")
        self._set16(ConfigReg.SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id)
        self._set16(ConfigReg.SUBSYSTEM_ID, ids.subsystem_id)
        self.config[ConfigReg.INTERRUPT_PIN] = ids.interrupt_pin
        self._set_mask(self.wmask, ConfigReg.COMMAND, 2, COMMAND_WRITABLE)
        self._set_mask(self.w1cmask, ConfigReg.STATUS, 2, STATUS_W1C)
        self.wmask[ConfigReg.CACHE_LINE_SIZE] = 0xFF
        self.wmask[ConfigReg.LATENCY_TIMER] = 0xFF
        self.wmask[ConfigReg.INTERRUPT_LINE] = 0xFF

    # ---- raw helpers --------------------------------------------------------

    def _set16(self, offset: int, value: int) -> None:
        struct.pack_into("<H", self.config, offset, value & 0xFFFF)

    @staticmethod
    def _set_mask(mask: bytearray, offset: int, size: int, value: int) -> None:
        mask[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        """Raw config value (no side effects), for the VMM and tests."""
        return int.from_bytes(self.config[offset:offset + size], "little")

    # ---- setup (VMM side) ---------------------------------------------------

    def add_bar(self, index: int, kind: BarKind, size: int, handler: RegisterDevice,
                prefetchable: bool = False) -> PciBar:
        if not 0 <= index < NUM_BARS or self.bars[index] is not None:
            raise PciConfigError(f"BAR{index} is invalid or already used")
        minimum = 4 if kind is BarKind.IO else 16
        if size < minimum or size & (size - 1) or (kind is BarKind.IO and size > 256):
            raise PciConfigError(f"BAR{index} size {size:#x} is not a valid power of two")
        bar = PciBar(index, kind, size, handler, prefetchable)
        self.bars[index] = bar
        offset = ConfigReg.BAR0 + 4 * index
        struct.pack_into("<I", self.config, offset, bar.type_bits)
        low_bits = 0x3 if kind is BarKind.IO else 0xF
        self._set_mask(self.wmask, offset, 4, ~(size - 1) & ~low_bits & 0xFFFFFFFF)
        return bar

    def set_bar_address(self, index: int, address: int) -> None:
        """Program a BAR (firmware-style pre-assignment by the bus)."""
        bar = self.bars[index]
        if bar is None or address % bar.size:
            raise PciConfigError(f"BAR{index} cannot be placed at {address:#x}")
        with self._lock:
            struct.pack_into("<I", self.config, ConfigReg.BAR0 + 4 * index, address | bar.type_bits)
            self._update_decode()

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None,
                       on_write: ConfigWriteHook | None = None) -> int:
        """Append a capability (id, next, then `body`); returns its config offset.

        `wmask` covers `body` (guest-writable bits); `on_write(offset_in_cap,
        size)` runs after a guest write to the capability, with the lock held.
        """
        length = 2 + len(body)
        offset = (self._cap_end + 3) & ~3
        if offset + length > CONFIG_SPACE_SIZE:
            raise PciConfigError("config space is full")
        self.config[offset] = cap_id
        self.config[offset + 1] = 0
        self.config[offset + 2:offset + length] = body
        if wmask is not None:
            if len(wmask) != len(body):
                raise PciConfigError("capability wmask must match its body")
            self.wmask[offset + 2:offset + length] = wmask
        if self._last_cap is None:
            self.config[ConfigReg.CAPABILITIES_PTR] = offset
            self.config[ConfigReg.STATUS] |= Status.CAP_LIST
        else:
            self.config[self._last_cap + 1] = offset
        self._last_cap = offset
        self._cap_end = offset + length
        if on_write is not None:
            self._write_hooks.append((offset, offset + length, lambda o, s, base=offset, f=on_write: f(o - base, s)))
        return offset

    # ---- state the transport/bus look at ------------------------------------

    @property
    def command(self) -> int:
        return self.get(ConfigReg.COMMAND, 2)

    @property
    def interrupt_pin(self) -> int:
        return self.config[ConfigReg.INTERRUPT_PIN]

    @property
    def interrupt_line(self) -> int:
        return self.config[ConfigReg.INTERRUPT_LINE]

    @interrupt_line.setter
    def interrupt_line(self, value: int) -> None:
        self.config[ConfigReg.INTERRUPT_LINE] = value & 0xFF

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & Command.INTX_DISABLE)

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        if bar is None:
            return 0
        raw = self.get(ConfigReg.BAR0 + 4 * index, 4)
        return raw & (~0x3 if bar.kind is BarKind.IO else ~0xF) & 0xFFFFFFFF

    def decoded_base(self, index: int) -> int | None:
        """Where BAR `index` currently decodes, or None (disabled/unassigned)."""
        return self._decoded.get(index)

    def windows(self) -> list[BarWindow]:
        return [BarWindow(self, bar, self._decoded[bar.index])
                for bar in self.bars if bar is not None and bar.index in self._decoded]

    # ---- guest config accesses ---------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0
        with self._lock:
            return self.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return
        with self._lock:
            for i in range(size):
                byte = (value >> (8 * i)) & 0xFF
                pos = offset + i
                wm, w1c = self.wmask[pos], self.w1cmask[pos]
                new = (self.config[pos] & ~wm) | (byte & wm)
                new &= ~(byte & w1c)
                self.config[pos] = new & 0xFF
            end = offset + size
            if offset < ConfigReg.COMMAND + 2 and end > ConfigReg.COMMAND or \
                    offset < ConfigReg.BAR0 + 4 * NUM_BARS and end > ConfigReg.BAR0:
                self._update_decode()
            for start, stop, hook in self._write_hooks:
                if offset < stop and end > start:
                    hook(max(offset, start), min(end, stop) - max(offset, start))

    def _update_decode(self) -> None:
        command = self.command
        decoded: dict[int, int] = {}
        for bar in self.bars:
            if bar is None:
                continue
            enable = Command.IO if bar.kind is BarKind.IO else Command.MEMORY
            base = self.bar_address(bar.index)
            # Address 0 means unassigned; a window wrapping the address space is never decoded.
            limit = 1 << 16 if bar.kind is BarKind.IO else 1 << 32
            if command & enable and base != 0 and base + bar.size <= limit:
                decoded[bar.index] = base
        old = self._decoded
        self._decoded = decoded
        if self.bar_listener is None:
            return
        for index in sorted(set(old) | set(decoded)):
            if old.get(index) != decoded.get(index):
                self.bar_listener(self, index, old.get(index), decoded.get(index))
