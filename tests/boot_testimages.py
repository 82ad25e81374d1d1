"""Builders for synthetic kernel images used by the tests/test_boot_*.py files.

They produce byte-exact bzImages and ELF64 files from the published layouts
(boot.rst setup header, ELF64 spec), independently of microvmm.boot's parsers
(struct offsets are spelled out here rather than imported).
"""

from __future__ import annotations

import struct

MiB = 1 << 20

BZ_SETUP_SECTS = 4
BZ_SETUP_SIZE = (BZ_SETUP_SECTS + 1) * 512


def pm_kernel_bytes(size: int) -> bytes:
    """A recognisable protected-mode kernel body (no two 4-byte words alike nearby)."""
    return b"".join(struct.pack("<I", 0xB0070000 + i) for i in range(size // 4))


def make_bzimage(*, pm_size: int = 0x3000, version: int = 0x020F, xloadflags: int = 0x3,
                 relocatable: int = 1, pref_address: int = 0x100_0000,
                 init_size: int = 0x80_0000, kernel_alignment: int = 0x20_0000,
                 cmdline_size: int = 2047, initrd_addr_max: int = 0x7FFF_FFFF,
                 setup_sects: int = BZ_SETUP_SECTS, boot_flag: int = 0xAA55,
                 magic: bytes = b"HdrS") -> bytes:
    """A bzImage: setup sectors with a setup header at 0x1F1, then the protected-mode kernel."""
    setup_size = ((setup_sects or 4) + 1) * 512
    image = bytearray(setup_size)
    pm = pm_kernel_bytes(pm_size)
    struct.pack_into("<B", image, 0x1F1, setup_sects)
    struct.pack_into("<I", image, 0x1F4, (len(pm) + 15) // 16)  # syssize
    struct.pack_into("<H", image, 0x1FE, boot_flag)
    image[0x200:0x202] = bytes([0xEB, 0x26C - 0x202])  # jmp over the header to 0x26C
    image[0x202:0x206] = magic
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<B", image, 0x211, 0x01)  # loadflags: LOADED_HIGH
    struct.pack_into("<I", image, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", image, 0x22C, initrd_addr_max)
    struct.pack_into("<I", image, 0x230, kernel_alignment)
    struct.pack_into("<B", image, 0x234, relocatable)
    struct.pack_into("<B", image, 0x235, 21)  # min_alignment (log2)
    struct.pack_into("<H", image, 0x236, xloadflags)
    struct.pack_into("<I", image, 0x238, cmdline_size)
    struct.pack_into("<Q", image, 0x258, pref_address)
    struct.pack_into("<I", image, 0x260, init_size)
    struct.pack_into("<I", image, 0x268, 0x5A5A)  # kernel_info_offset (arbitrary marker)
    return bytes(image) + pm


# One PT_LOAD description: (p_paddr, file bytes, p_memsz)
Segment = tuple[int, bytes, int]


def make_elf(segments: list[Segment], entry: int, *, machine: int = 62, ei_class: int = 2,
             e_type: int = 2, extra_phdrs: int = 0) -> bytes:
    """An ELF64 little-endian executable with the given PT_LOAD segments.

    extra_phdrs adds PT_NOTE headers (type 4) that the loader must skip.
    """
    ehdr_size, phdr_size = 64, 56
    phnum = len(segments) + extra_phdrs
    data_offset = ehdr_size + phnum * phdr_size
    data_offset = (data_offset + 0xFFF) & ~0xFFF
    ident = b"\x7fELF" + bytes([ei_class, 1, 1, 0]) + bytes(8)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, ehdr_size, 0, 0,
                       ehdr_size, phdr_size, phnum, 64, 0, 0)
    phdrs = b""
    body = b""
    for paddr, payload, memsz in segments:
        offset = data_offset + len(body)
        vaddr = 0xFFFF_FFFF_8000_0000 + paddr - 0x100_0000  # kernel high mapping, unused
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, offset, vaddr, paddr, len(payload), memsz,
                             0x1000)
        body += payload + bytes(-len(payload) % 0x1000)
    for _ in range(extra_phdrs):
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, 0, 0, 0, 0, 0, 4)
    head = ehdr + phdrs
    return head + bytes(data_offset - len(head)) + body
