"""Where the initrd goes in guest RAM, and loading one there straight from its file."""

from __future__ import annotations

import os
from typing import NamedTuple

from . import layout
from .errors import InitrdError
from .fileread import pread_into

#: initrd_addr_max of the setup header made up for an ELF vmlinux
#: (params.synthesize_setup_header), which has none of its own.
SYNTHETIC_INITRD_ADDR_MAX = 0x7FFF_FFFF


class LoadedInitrd(NamedTuple):
    """An initrd already in guest RAM (load_initrd_file): where, and its size."""

    addr: int
    size: int


def place_initrd(ram_end: int, initrd_size: int, initrd_addr_max: int, kernel_end: int) -> int:
    """The highest page-aligned address where the initrd fits.

    It must end at or below initrd_addr_max + 1 (the highest address the
    kernel accepts for initrd contents) and the end of RAM, and start above
    everything the kernel occupies (kernel_end, which includes the
    decompression footprint init_size for a bzImage).
    """
    if initrd_size <= 0:
        raise InitrdError("initrd is empty")
    top = min(initrd_addr_max + 1, ram_end)
    lowest = layout.align_up(kernel_end, layout.PAGE_SIZE)
    addr = layout.align_down(top - initrd_size, layout.PAGE_SIZE)
    if addr < lowest:
        raise InitrdError(
            f"initrd of {initrd_size} bytes does not fit between the end of the kernel "
            f"({lowest:#x}) and {top:#x} (min of initrd_addr_max+1 and the end of guest RAM): "
            f"give the guest more memory or use a smaller initrd")
    return addr


def appended_offset(initrd_size: int) -> int:
    """Where an archive appended to an initrd of `initrd_size` bytes starts: the
    next 4-byte boundary (Linux's initramfs unpacker skips the NUL padding
    between concatenated archives, and looks for a cpio header only there)."""
    return layout.align_up(initrd_size, 4)


def append_archive(initrd: bytes, appendix: bytes) -> bytes:
    """An initrd's bytes with another archive appended at appended_offset()."""
    if not appendix:
        return initrd
    return b"".join((initrd, bytes(appended_offset(len(initrd)) - len(initrd)), appendix))


def load_initrd_file(mem, fd: int, kernel_end: int, initrd_addr_max: int = SYNTHETIC_INITRD_ADDR_MAX,
                     source: str = "initrd", appendix: bytes = b"") -> LoadedInitrd:
    """Read an initrd with preadv() straight to where place_initrd() puts it.

    `appendix`, if any, is a second archive placed after it at
    appended_offset() (the NUL padding written too); the LoadedInitrd covers
    both, so the kernel unpacks both.

    `kernel_end` is the end of the loaded kernel (LoadedElf.kernel_end);
    `initrd_addr_max` the kernel's limit (the default is an ELF vmlinux's,
    whose header setup_linux_boot synthesizes). setup_linux_boot takes the
    result as its `initrd` and checks it is where it would have put it.
    Raises InitrdError (empty, does not fit, file shrank); OSError passes through.
    """
    size = os.fstat(fd).st_size
    total = appended_offset(size) + len(appendix) if appendix else size
    addr = place_initrd(mem.end, total, initrd_addr_max, kernel_end)
    done = pread_into(fd, mem.view(addr, size), 0)
    if done < size:
        raise InitrdError(f"{source}: the file ended at {done:#x} of {size:#x} bytes while loading "
                          f"(was it rewritten during the boot?)")
    if appendix:
        padding = appended_offset(size) - size
        if padding:
            mem.write(addr + size, bytes(padding))
        mem.write(addr + size + padding, appendix)
    return LoadedInitrd(addr, total)


def load_initrd_bytes(mem, data: bytes, kernel_end: int,
                      initrd_addr_max: int = SYNTHETIC_INITRD_ADDR_MAX) -> LoadedInitrd:
    """An initrd made in host memory (e.g. `run --add` without `--initrd`),
    written to where place_initrd() puts it."""
    addr = place_initrd(mem.end, len(data), initrd_addr_max, kernel_end)
    mem.write(addr, data)
    return LoadedInitrd(addr, len(data))


def command_archive(name: str, data: bytes) -> bytes:
    """A cpio archive holding the one file /NAME (0600): what Linux unpacks
    into the initramfs along with the initrd it is put in front of."""
    from microvmm.initramfs.newc import CpioEntry, EntryKind, write_newc  # deferred: only `-- CMD` runs
    return write_newc([CpioEntry(name, EntryKind.FILE, 0o600, data)])


def prepend_archive(mem, initrd: "LoadedInitrd | bytes | memoryview", archive: bytes,
                    kernel_end: int) -> "LoadedInitrd | bytes":
    """The initrd with `archive` in front of it (Linux unpacks concatenated
    archives, compressed or not, and skips the zeros between them).

    An initrd already in guest RAM gets the archive, zero-padded to whole
    pages, right below it: place_initrd() of the longer initrd gives that
    same address. Raises InitrdError if it no longer fits above the kernel.
    """
    padded = archive + b"\0" * (-len(archive) % layout.PAGE_SIZE)
    if not isinstance(initrd, LoadedInitrd):
        return padded + bytes(initrd)
    addr = initrd.addr - len(padded)
    if addr < layout.align_up(kernel_end, layout.PAGE_SIZE):
        raise InitrdError(f"the initrd and a {len(archive)}-byte command archive do not fit above the "
                          f"kernel ({kernel_end:#x}): give the guest more memory")
    mem.write(addr, padded)
    return LoadedInitrd(addr, initrd.size + len(padded))
