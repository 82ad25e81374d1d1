"""A fake virtio front-end, written the way Linux's virtio_ring + virtio_pci_legacy work.

Reusable by any test that needs a guest driver: `DriverRing` is the driver
side of one split virtqueue over a `GuestMemory`; `FakeLegacyPciDriver` finds
a virtio function on a real `PciBus` through ports 0xCF8/0xCFC, enables it,
negotiates features, sets up queues, posts buffers and kicks. `FakeIntxLine`
and `FakeMsiController` record the interrupts a function raises.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

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
            head, length = struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8))
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

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            self.set_avail_flags(AvailFlags.NO_INTERRUPT)

    def enable_interrupts(self) -> None:
        if self.event_idx:
            self.set_used_event(self.last_used_idx)
        else:
            self.set_avail_flags(0)
