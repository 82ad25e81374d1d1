"""Loading an uncompressed x86-64 ELF vmlinux, and telling kernel formats apart.

The vmlinux linker script (arch/x86/kernel/vmlinux.lds.S) says
ENTRY(phys_startup_64) on x86-64, so e_entry is the *physical* address of
startup_64, and every PT_LOAD's p_paddr is its physical load address (the
virtual addresses are in the kernel's high mapping). startup_64 takes the
64-bit boot protocol: long mode, identity-mapped low memory, RSI = boot_params.
Booting it skips the bzImage decompressor entirely (much faster on a software
hypervisor).
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from typing import NamedTuple

from . import layout
from .errors import ElfError, KernelFormatError
from .fileread import pread_into

logger = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1

# e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags,
# e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_PHDR = struct.Struct("<IIQQQQQQ")


class KernelFormat(str, enum.Enum):
    BZIMAGE = "bzimage"
    ELF = "elf"


def detect_kernel_format(data: bytes | memoryview, source: str = "kernel") -> KernelFormat:
    """Tell a bzImage from an ELF vmlinux by their magic numbers."""
    if len(data) >= 4 and bytes(data[:4]) == ELF_MAGIC:
        return KernelFormat.ELF
    from .bzimage import is_bzimage  # deferred: the ELF loader runs on its own first (issue 6)
    if is_bzimage(data):
        return KernelFormat.BZIMAGE
    head = bytes(data[:8])
    raise KernelFormatError(
        f"{source}: not a kernel this VMM can boot ({len(data)} bytes, starts with {head!r}): "
        f"expected a bzImage (boot flag 0xAA55 at 0x1FE, 'HdrS' at 0x202) or an ELF vmlinux")


# The loaders' results are NamedTuples, not frozen dataclasses: immutable
# records either way, but Python 3.11 creates a NamedTuple class ~6x faster,
# and these classes are created on every `microvmm run` before the guest
# starts (issue 6).
class ElfSegment(NamedTuple):
    """One PT_LOAD segment: where it goes and where its bytes are in the file."""

    paddr: int
    filesz: int
    memsz: int
    offset: int


class LoadedElf(NamedTuple):
    """Where load_elf_vmlinux put a vmlinux, and its entry point."""

    entry: int  # physical address of startup_64
    segments: tuple[ElfSegment, ...]
    kernel_start: int  # lowest p_paddr
    kernel_end: int  # highest p_paddr + p_memsz


def _parse_program_headers(data: bytes | memoryview, source: str,
                           file_size: int | None = None) -> tuple[int, list[ElfSegment]]:
    """The entry point and PT_LOAD segments of an x86-64 ELF executable.

    `data` holds the file from its start at least through the program header
    table; `file_size` (default len(data)) is what segment offsets are checked
    against, so a loader that reads segments straight from the file can parse
    just the headers.
    """
    if file_size is None:
        file_size = len(data)
    if file_size < _EHDR.size or len(data) < _EHDR.size:
        raise ElfError(f"{source}: truncated ELF: {file_size} bytes, shorter than the "
                       f"{_EHDR.size}-byte ELF header")
    (ident, e_type, e_machine, e_version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, *_rest) = _EHDR.unpack_from(data, 0)
    if ident[:4] != ELF_MAGIC:
        raise ElfError(f"{source}: bad ELF magic {ident[:4]!r}")
    if ident[4] != ELFCLASS64:
        raise ElfError(f"{source}: not a 64-bit ELF (EI_CLASS {ident[4]}, expected 2)")
    if ident[5] != ELFDATA2LSB:
        raise ElfError(f"{source}: not a little-endian ELF (EI_DATA {ident[5]}, expected 1)")
    if ident[6] != EV_CURRENT or e_version != EV_CURRENT:
        raise ElfError(f"{source}: unknown ELF version {ident[6]}/{e_version}")
    if e_machine != EM_X86_64:
        raise ElfError(f"{source}: ELF machine {e_machine} is not x86-64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise ElfError(f"{source}: ELF type {e_type} is not an executable (ET_EXEC): "
                       f"expected a vmlinux")
    if e_phnum == 0:
        raise ElfError(f"{source}: ELF has no program headers")
    if e_phentsize != _PHDR.size:
        raise ElfError(f"{source}: ELF program header size {e_phentsize}, expected {_PHDR.size}")
    if e_phoff + e_phnum * e_phentsize > file_size:
        raise ElfError(f"{source}: truncated ELF: {e_phnum} program headers at {e_phoff:#x} "
                       f"run past the end of the {file_size}-byte file")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise ValueError("the program header table lies beyond the bytes given")  # a caller's bug
    segments = []
    for index in range(e_phnum):
        (p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz,
         _align) = _PHDR.unpack_from(data, e_phoff + index * _PHDR.size)
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            raise ElfError(f"{source}: segment {index}: p_filesz {p_filesz:#x} exceeds "
                           f"p_memsz {p_memsz:#x}")
        if p_offset + p_filesz > file_size:
            raise ElfError(f"{source}: truncated ELF: segment {index} file data "
                           f"{p_offset:#x}+{p_filesz:#x} runs past the end of the file")
        segments.append(ElfSegment(paddr=p_paddr, filesz=p_filesz, memsz=p_memsz,
                                   offset=p_offset))
    if not segments:
        raise ElfError(f"{source}: ELF has no PT_LOAD segments")
    return e_entry, segments


def _check_segments(mem, entry: int, segments: list[ElfSegment], source: str) -> list[ElfSegment]:
    """Every segment in guest RAM at or above 1 MiB, none overlapping, the entry
    point inside one; returns the segments ordered by address."""
    for index, seg in enumerate(segments):
        if seg.paddr < layout.HIGH_MEMORY_START:
            raise ElfError(
                f"{source}: segment {index} at physical {seg.paddr:#x} is below 1 MiB, where "
                f"the VMM keeps boot_params, page tables and the MP table")
        if not mem.contains(seg.paddr, seg.memsz):
            raise ElfError(
                f"{source}: segment {index} at physical {seg.paddr:#x}+{seg.memsz:#x} does not "
                f"fit in guest RAM (which ends at {mem.end:#x}): give the guest more memory")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.paddr < prev.paddr + prev.memsz:
            raise ElfError(f"{source}: segments at {prev.paddr:#x} and {cur.paddr:#x} overlap")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in segments):
        raise ElfError(
            f"{source}: entry point {entry:#x} is not inside any PT_LOAD segment's physical "
            f"range (is this an x86-64 vmlinux, whose e_entry is phys_startup_64?)")
    return ordered


def _zero_bss(mem, seg: ElfSegment) -> None:
    if seg.memsz > seg.filesz:
        mem.view(seg.paddr + seg.filesz, seg.memsz - seg.filesz)[:] = bytes(seg.memsz - seg.filesz)


def _loaded(entry: int, segments: list[ElfSegment], ordered: list[ElfSegment], source: str) -> LoadedElf:
    kernel_start = ordered[0].paddr
    kernel_end = max(s.paddr + s.memsz for s in segments)
    logger.debug("%s: %d PT_LOAD segments in [%#x, %#x), entry %#x",
                 source, len(segments), kernel_start, kernel_end, entry)
    return LoadedElf(entry=entry, segments=tuple(segments), kernel_start=kernel_start,
                     kernel_end=kernel_end)


def load_elf_vmlinux(mem, data: bytes | memoryview, source: str = "vmlinux") -> LoadedElf:
    """Copy each PT_LOAD segment of an x86-64 vmlinux to its p_paddr in guest memory.

    `mem` is a microvmm.memory.GuestMemory. Bytes p_filesz..p_memsz (bss) are
    zeroed. Every segment must lie in guest RAM at or above 1 MiB (below it
    live the VMM's boot structures), and the entry point must be inside one.
    """
    view = memoryview(data)
    entry, segments = _parse_program_headers(view, source)
    ordered = _check_segments(mem, entry, segments, source)
    for seg in segments:
        mem.write(seg.paddr, view[seg.offset:seg.offset + seg.filesz])
        _zero_bss(mem, seg)
    return _loaded(entry, segments, ordered, source)


def load_elf_vmlinux_file(mem, fd: int, source: str = "vmlinux") -> LoadedElf:
    """load_elf_vmlinux for a vmlinux still in its file (an open descriptor).

    Only the ELF and program headers are read into host memory; each segment
    is read with preadv() straight into guest RAM. That skips a copy of the
    ~15 MB image, and the read, page faults included, runs without the GIL:
    the VMM loads the kernel on a helper thread while it imports the rest.
    Raises ElfError as load_elf_vmlinux does, and when the file shrinks
    while it is read; OSError from the reads passes through.
    """
    file_size = os.fstat(fd).st_size
    head = os.pread(fd, min(file_size, _EHDR.size), 0)
    if len(head) >= _EHDR.size:
        header = _EHDR.unpack(head)
        e_phoff, e_phentsize, e_phnum = header[5], header[9], header[10]
        table_end = e_phoff + e_phnum * e_phentsize
        if len(head) < table_end <= file_size:
            head = _pread_exactly(fd, table_end, 0, source)
    entry, segments = _parse_program_headers(head, source, file_size)
    ordered = _check_segments(mem, entry, segments, source)
    for seg in segments:
        _preadv_exactly(fd, mem.view(seg.paddr, seg.filesz), seg.offset, source)
        _zero_bss(mem, seg)
    return _loaded(entry, segments, ordered, source)


def _pread_exactly(fd: int, size: int, offset: int, source: str) -> bytes:
    buffer = bytearray(size)
    _preadv_exactly(fd, memoryview(buffer), offset, source)
    return bytes(buffer)


def _preadv_exactly(fd: int, target: memoryview, offset: int, source: str) -> None:
    done = pread_into(fd, target, offset)
    if done < len(target):
        raise ElfError(f"{source}: truncated ELF: the file ended at {offset + done:#x} while "
                       f"loading (was it rewritten during the boot?)")
