"""A fake virtio front-end, written the way Linux's virtio_ring + virtio_pci_legacy work.

Reusable by any test that needs a guest driver: `DriverRing` is the driver
side of one split virtqueue over a `GuestMemory`; `FakeLegacyPciDriver` finds
a virtio function on a real `PciBus` through ports 0xCF8/0xCFC, enables it,
negotiates features, sets up queues, posts buffers and kicks. `FakeIntxLine`
and `FakeMsiController` record the interrupts a function raises.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from microvmm.memory import GuestMemory
from microvmm.virtio.queue import (
    DESC_SIZE,
    AvailFlags,
    DescFlags,
    UsedFlags,
    legacy_ring_bytes,
    legacy_ring_layout,
    vring_need_event,
)

PAGE = 4096


# ---------------------------------------------------------------------------
# Interrupt fakes (implement microvmm.pci.irq.IntxLine / MsiController)


class EventIntx:
    """An INTx line that wakes a fake guest waiting on `event` (an IntxLine)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def assert_line(self) -> None:
        self.event.set()


class FakeIntxLine:
    """Level INTx line: records asserts; `level` drops when the test 'EOIs' it."""

    def __init__(self) -> None:
        self.asserts = 0
        self.level = False

    def assert_line(self) -> None:
        self.asserts += 1
        self.level = True

    def eoi(self) -> None:
        """What KVM does on guest EOI of a level interrupt: lower the line."""
        self.level = False


@dataclass
class ProgrammedVector:
    address: int
    data: int
    masked: bool


class FakeMsiController:
    """Records MSI-X programming and triggers."""

    def __init__(self) -> None:
        self.vectors: dict[int, ProgrammedVector] = {}
        self.program_calls: list[tuple[int, int, int, bool]] = []
        self.triggered: list[int] = []

    def program_vector(self, vector: int, address: int, data: int, masked: bool) -> None:
        self.program_calls.append((vector, address, data, masked))
        self.vectors[vector] = ProgrammedVector(address, data, masked)

    def trigger(self, vector: int) -> None:
        self.triggered.append(vector)


# ---------------------------------------------------------------------------
# Guest RAM allocation


class GuestAllocator:
    """Bump allocator over a range of guest RAM (the fake guest's 'kmalloc')."""

    def __init__(self, memory: GuestMemory, start: int, end: int):
        self.memory = memory
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError("fake guest allocator exhausted")
        self.next = addr + size
        self.memory.view(addr, size)[:] = bytes(size)
        return addr


# ---------------------------------------------------------------------------
# Driver side of a split virtqueue


@dataclass
class PostedBuffer:
    head: int
    descs: list[int]
    writable: list[tuple[int, int]]  # (addr, len) of device-writable buffers
    indirect_table: int | None = None


@dataclass
class UsedBuffer:
    head: int
    length: int
    data: bytes  # the first `length` bytes of the writable buffers


_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
#: struct virtio_console_control as the driver writes and reads it: id, event, value.
CONSOLE_CONTROL = struct.Struct("<IHH")


class DriverRing:
    """Driver side of one legacy split virtqueue (mirrors virtio_ring.c)."""

    def __init__(self, memory: GuestMemory, allocator: GuestAllocator, size: int,
                 event_idx: bool = False, indirect: bool = False):
        self.memory = memory
        self.allocator = allocator
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        base = allocator.alloc(legacy_ring_bytes(size), align=PAGE)
        self.pfn = base // PAGE
        self.desc, self.avail, self.used = legacy_ring_layout(self.pfn, size)
        self.free: list[int] = list(range(size))
        self.avail_idx = 0
        self.last_used_idx = 0
        # Kick decision: avail idx at the previous kick check (virtio_ring's num_added logic).
        self._idx_at_last_kick = 0
        self.posted: dict[int, PostedBuffer] = {}

    # raw field access ------------------------------------------------------
    def write_desc(self, table: int, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.memory.write(table + DESC_SIZE * index, _DESC.pack(addr, length, flags, nxt))

    def set_avail_idx(self, value: int) -> None:
        self.memory.write_u16(self.avail + 2, value & 0xFFFF)

    def set_avail_ring(self, slot: int, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (slot % self.size), head)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    @property
    def used_flags(self) -> int:
        return self.memory.read_u16(self.used)

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.used + 4 + 8 * self.size)

    # posting ----------------------------------------------------------------
    def add(self, readable: list[bytes] = (), writable: list[int] = (),
            use_indirect: bool | None = None) -> int:
        """Post one chain: `readable` payloads then `writable` buffer sizes. Returns head."""
        segments: list[tuple[int, int, int]] = []  # (addr, len, flags)
        writable_bufs: list[tuple[int, int]] = []
        for payload in readable:
            addr = self.allocator.alloc(max(len(payload), 1))
            self.memory.write(addr, payload)
            segments.append((addr, len(payload), 0))
        for length in writable:
            addr = self.allocator.alloc(max(length, 1))
            segments.append((addr, length, DescFlags.WRITE))
            writable_bufs.append((addr, length))
        if not segments:
            raise ValueError("a chain needs at least one buffer")
        if use_indirect is None:
            use_indirect = self.indirect and len(segments) > 1
        if use_indirect:
            table = self.allocator.alloc(DESC_SIZE * len(segments))
            for i, (addr, length, flags) in enumerate(segments):
                last = i == len(segments) - 1
                self.write_desc(table, i, addr, length, flags | (0 if last else DescFlags.NEXT),
                                0 if last else i + 1)
            head = self._take_descs(1)[0]
            self.write_desc(self.desc, head, table, DESC_SIZE * len(segments), DescFlags.INDIRECT, 0)
            posted = PostedBuffer(head, [head], writable_bufs, table)
        else:
            descs = self._take_descs(len(segments))
            for i, (addr, length, flags) in enumerate(segments):
                last = i == len(segments) - 1
                self.write_desc(self.desc, descs[i], addr, length,
                                flags | (0 if last else DescFlags.NEXT), 0 if last else descs[i + 1])
            head = descs[0]
            posted = PostedBuffer(head, descs, writable_bufs)
        self.posted[head] = posted
        self.publish(head)
        return head

    def _take_descs(self, count: int) -> list[int]:
        if count > len(self.free):
            raise RuntimeError("ring full")
        taken, self.free = self.free[:count], self.free[count:]
        return taken

    def publish(self, head: int) -> None:
        """Put `head` in the avail ring, then publish the new avail idx."""
        self.set_avail_ring(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def kick_prepare(self) -> bool:
        """virtqueue_kick_prepare: should the driver notify the device now?"""
        old, new = self._idx_at_last_kick, self.avail_idx
        self._idx_at_last_kick = new
        if self.event_idx:
            return vring_need_event(self.avail_event, new, old)
        return not self.used_flags & UsedFlags.NO_NOTIFY

    # completion -------------------------------------------------------------
    def get_used(self) -> list[UsedBuffer]:
        """Collect every used entry the device published since the last call."""
        done: list[UsedBuffer] = []
        while self.last_used_idx != self.used_idx:
            slot = self.last_used_idx % self.size
            head, length = _USED_ELEM.unpack(self.memory.read(self.used + 4 + 8 * slot, 8))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            posted = self.posted.pop(head)
            self.free.extend(posted.descs)
            remaining = length
            data = bytearray()
            for addr, buf_len in posted.writable:
                take = min(buf_len, remaining)
                data += self.memory.read(addr, take)
                remaining -= take
            done.append(UsedBuffer(head, length, bytes(data)))
        if self.event_idx:
            # virtqueue_enable_cb: interrupt me when the next entry is used.
            self.set_used_event(self.last_used_idx)
        return done

    def reap_used_elems(self) -> list[tuple[int, int]]:
        """(id, len) of every used entry since the last call, for drivers that
        recycle their own buffers: nothing is freed or read back, and used_event
        is left alone (unlike get_used)."""
        used_idx = self.used_idx
        done = []
        while self.last_used_idx != used_idx:
            slot = self.last_used_idx % self.size
            done.append(_USED_ELEM.unpack(self.memory.read(self.used + 4 + 8 * slot, 8)))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return done

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            self.set_avail_flags(AvailFlags.NO_INTERRUPT)

    def enable_interrupts(self) -> None:
        if self.event_idx:
            self.set_used_event(self.last_used_idx)
        else:
            self.set_avail_flags(0)


# ---------------------------------------------------------------------------
# PCI side: config mechanism #1 and the legacy virtio register block

VIRTIO_VENDOR = 0x1AF4
MSI_NO_VECTOR = 0xFFFF
MSI_ADDRESS_BASE = 0xFEE00000
MSI_DATA_BASE = 0x40

# Legacy register offsets (include/uapi/linux/virtio_pci.h), kept independent of the
# implementation under test on purpose.
REG_HOST_FEATURES = 0
REG_GUEST_FEATURES = 4
REG_QUEUE_PFN = 8
REG_QUEUE_NUM = 12
REG_QUEUE_SEL = 14
REG_QUEUE_NOTIFY = 16
REG_STATUS = 18
REG_ISR = 19
REG_MSI_CONFIG_VECTOR = 20
REG_MSI_QUEUE_VECTOR = 22

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_NEEDS_RESET = 0x40

F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29


class ConfigMechanism1:
    """Guest-side config accesses through ports 0xCF8/0xCFC of a `PciBus`.

    The bus is registered at 0xCF8, so its device offsets are port - 0xCF8.
    """

    def __init__(self, bus) -> None:
        self.bus = bus

    def _select(self, slot: int, func: int, offset: int) -> None:
        self.bus.write(0, 4, 0x80000000 | (slot << 11) | (func << 8) | (offset & 0xFC))

    def read(self, slot: int, func: int, offset: int, size: int) -> int:
        self._select(slot, func, offset)
        return self.bus.read(4 + (offset & 3), size)

    def write(self, slot: int, func: int, offset: int, size: int, value: int) -> None:
        self._select(slot, func, offset)
        self.bus.write(4 + (offset & 3), size, value)


class FakeLegacyPciDriver:
    """Probes and drives one legacy virtio-pci function like Linux does."""

    def __init__(self, bus, memory: GuestMemory, allocator: GuestAllocator,
                 device_id: int | None = None, transport=None):
        self.bus = bus
        self.cfg = ConfigMechanism1(bus)
        self.memory = memory
        self.allocator = allocator
        self.transport = transport  # only needed for the ioeventfd kick path
        self.slot = self._find(device_id)
        self.io_base = 0
        self.msix_bar = 0
        self.msix_cap = 0
        self.msix_enabled = False
        self.features = 0
        self.rings: dict[int, DriverRing] = {}

    def _find(self, device_id: int | None) -> int:
        for slot in range(32):
            ids = self.cfg.read(slot, 0, 0, 4)
            if ids & 0xFFFF != VIRTIO_VENDOR:
                continue
            if device_id is None or ids >> 16 == device_id:
                return slot
        raise LookupError("no virtio function on the bus")

    # config space ------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return self.cfg.read(self.slot, 0, offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.cfg.write(self.slot, 0, offset, size, value)

    def find_capability(self, cap_id: int) -> int:
        pointer = self.config_read(0x34, 1)
        for _ in range(48):
            if pointer == 0:
                break
            if self.config_read(pointer, 1) == cap_id:
                return pointer
            pointer = self.config_read(pointer + 1, 1)
        return 0

    def enable(self) -> None:
        """pci_enable_device + pci_set_master; read back BAR0/BAR1 like pci_iomap."""
        bar0 = self.config_read(0x10, 4)
        assert bar0 & 1, "BAR0 must be an I/O BAR"
        self.io_base = bar0 & ~3
        self.msix_bar = self.config_read(0x14, 4) & ~0xF
        command = self.config_read(0x04, 2)
        self.config_write(0x04, 2, command | 0x7)

    # legacy registers ----------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        value = self.bus.io_read(self.io_base + offset, size)
        assert value is not None, f"BAR0 offset {offset:#x} not decoded"
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        assert self.bus.io_write(self.io_base + offset, size, value), f"BAR0 offset {offset:#x} not decoded"

    @property
    def status(self) -> int:
        return self.io_read(REG_STATUS, 1)

    def read_isr(self) -> int:
        return self.io_read(REG_ISR, 1)

    def device_config_offset(self) -> int:
        return 24 if self.msix_enabled else 20

    def read_device_config(self, offset: int, size: int = 1) -> int:
        return self.io_read(self.device_config_offset() + offset, size)

    def write_device_config(self, offset: int, size: int, value: int) -> None:
        self.io_write(self.device_config_offset() + offset, size, value)

    def reset(self) -> None:
        self.io_write(REG_STATUS, 1, 0)
        assert self.status == 0  # vp_legacy_get_status flushes the reset
        self.rings.clear()

    def negotiate(self, wanted: int) -> int:
        """ACKNOWLEDGE, DRIVER, read host features, write the accepted subset."""
        self.reset()
        self.io_write(REG_STATUS, 1, STATUS_ACKNOWLEDGE)
        self.io_write(REG_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        host = self.io_read(REG_HOST_FEATURES, 4)
        self.features = host & wanted
        self.io_write(REG_GUEST_FEATURES, 4, self.features)
        return self.features

    # MSI-X -------------------------------------------------------------------------
    def enable_msix(self, num_vectors: int) -> None:
        """pci_alloc_irq_vectors(MSIX): enable+maskall, program entries, unmask."""
        cap = self.find_capability(0x11)
        assert cap, "no MSI-X capability"
        self.msix_cap = cap
        control = self.config_read(cap + 2, 2)
        assert (control & 0x7FF) + 1 >= num_vectors
        table = self.config_read(cap + 4, 4)
        assert table & 7 == 1, "table expected in BAR1"
        table_base = self.msix_bar + (table & ~7)
        self.config_write(cap + 2, 2, control | 0xC000)  # ENABLE | FUNCTION_MASK
        for vector in range(num_vectors):
            entry = table_base + 16 * vector
            assert self.bus.mmio_write(entry, 4, MSI_ADDRESS_BASE)
            assert self.bus.mmio_write(entry + 4, 4, 0)
            assert self.bus.mmio_write(entry + 8, 4, MSI_DATA_BASE + vector)
            assert self.bus.mmio_write(entry + 12, 4, 0)  # unmask
        self.config_write(cap + 2, 2, (control | 0x8000) & ~0x4000)
        self.msix_enabled = True

    def msix_table_entry(self, vector: int) -> int:
        table = self.config_read(self.msix_cap + 4, 4)
        return self.msix_bar + (table & ~7) + 16 * vector

    def set_config_vector(self, vector: int) -> int:
        self.io_write(REG_MSI_CONFIG_VECTOR, 2, vector)
        return self.io_read(REG_MSI_CONFIG_VECTOR, 2)

    # queues --------------------------------------------------------------------------
    def setup_queue(self, index: int, vector: int = MSI_NO_VECTOR) -> DriverRing:
        """virtio_pci_legacy setup_vq."""
        self.io_write(REG_QUEUE_SEL, 2, index)
        size = self.io_read(REG_QUEUE_NUM, 2)
        if size == 0 or self.io_read(REG_QUEUE_PFN, 4):
            raise LookupError(f"queue {index} unavailable")
        ring = DriverRing(self.memory, self.allocator, size,
                          event_idx=bool(self.features & F_EVENT_IDX),
                          indirect=bool(self.features & F_INDIRECT_DESC))
        self.io_write(REG_QUEUE_PFN, 4, ring.pfn)
        if self.msix_enabled and vector != MSI_NO_VECTOR:
            self.io_write(REG_MSI_QUEUE_VECTOR, 2, vector)
            if self.io_read(REG_MSI_QUEUE_VECTOR, 2) == MSI_NO_VECTOR:
                raise RuntimeError(f"queue {index}: vector {vector} not accepted")
        self.rings[index] = ring
        return ring

    def driver_ok(self) -> None:
        self.io_write(REG_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)

    def kick(self, index: int, via_ioeventfd: bool = False, force: bool = False) -> bool:
        """virtqueue_kick: notify if the device asked for it. Returns whether it kicked."""
        if not self.rings[index].kick_prepare() and not force:
            return False
        if via_ioeventfd:
            port = self.io_base + REG_QUEUE_NOTIFY
            matches = [spec for spec in self.transport.notify_ioeventfds()
                       if spec.port == port and spec.size == 2 and spec.datamatch == index]
            assert len(matches) == 1, "no ioeventfd registered for this kick"
            self.transport.queue_notify(matches[0].queue_index)
        else:
            self.io_write(REG_QUEUE_NOTIFY, 2, index)
        return True
