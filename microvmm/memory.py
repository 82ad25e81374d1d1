"""Guest physical memory: the one place that turns guest addresses into host memory.

Every access is bounds-checked against the guest RAM regions; nothing here can
reach host memory outside them. Reads and writes are zero-copy through
memoryview slices of the anonymous mappings that back guest RAM.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass, field


class GuestMemoryError(Exception):
    """A guest physical range is not (entirely) backed by guest RAM."""


@dataclass
class MemoryRegion:
    """One contiguous slot of guest RAM backed by an anonymous host mapping."""

    guest_addr: int
    size: int
    mapping: mmap.mmap = field(repr=False)
    # Host virtual address of the mapping (for KVM_SET_USER_MEMORY_REGION).
    host_addr: int = 0

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemory:
    """Guest RAM as a set of non-overlapping regions.

    A range must lie within a single region: guest RAM regions are never
    adjacent in this VMM (the PCI hole separates them), so a range that
    crosses a region end is invalid guest input, not something to stitch.
    """

    def __init__(self, layout: list[tuple[int, int]]):
        if not layout:
            raise ValueError("guest memory needs at least one region")
        regions = []
        for guest_addr, size in sorted(layout):
            if size <= 0 or size % mmap.PAGESIZE or guest_addr % mmap.PAGESIZE:
                raise ValueError(f"region {guest_addr:#x}+{size:#x} is not page-aligned")
            if regions and guest_addr < regions[-1].end:
                raise ValueError(f"region {guest_addr:#x} overlaps the previous one")
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
            anchor = ctypes.c_char.from_buffer(mapping)
            host_addr = ctypes.addressof(anchor)
            del anchor  # a live ctypes export would keep the mapping from closing
            regions.append(MemoryRegion(guest_addr, size, mapping, host_addr))
        self.regions: tuple[MemoryRegion, ...] = tuple(regions)
        self._views = tuple(memoryview(r.mapping) for r in regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest guest RAM address."""
        return self.regions[-1].end

    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        """Return (region index, offset) for a range, or raise GuestMemoryError."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        for index, region in enumerate(self.regions):
            if region.guest_addr <= gpa < region.end or (length == 0 and gpa == region.end):
                if gpa + length > region.end:
                    break
                return index, gpa - region.guest_addr
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of guest RAM [gpa, gpa+length)."""
        index, offset = self._locate(gpa, length)
        return self._views[index][offset:offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack(self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack(self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack(self.view(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.view(gpa, 2), 0, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self.view(gpa, 4), 0, value & 0xFFFFFFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self.view(gpa, 8), 0, value & 0xFFFFFFFFFFFFFFFF)

    def close(self) -> None:
        for view in self._views:
            view.release()
        for region in self.regions:
            region.mapping.close()
