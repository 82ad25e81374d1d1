"""boot_params zero page layout at bootparam.h offsets, e820, command line, initrd placement."""

from __future__ import annotations

import os
import struct

import pytest

from boot_testimages import make_bzimage
from microvmm.boot.bzimage import parse_setup_header
from microvmm.boot.errors import CmdlineError, InitrdError
from microvmm.boot.layout import MemoryLayoutError, guest_ram_layout
from microvmm.boot.initrd import SYNTHETIC_INITRD_ADDR_MAX, load_initrd_file, place_initrd
from microvmm.boot.params import (BootParams, E820Type, build_e820_map, encode_cmdline, raw_setup_header,
                                  synthesize_setup_header)
from microvmm.memory import GuestMemory

MiB = 1 << 20


def e820_from_page(page: bytes) -> list[tuple[int, int, int]]:
    count = page[0x1E8]
    return [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(count)]


def test_e820_map_entries():
    entries = [(e.addr, e.size, e.type) for e in build_e820_map(96 * MiB)]
    assert entries == [
        (0, 0x9FC00, E820Type.RAM),
        (0x9FC00, 0x400, E820Type.RESERVED),
        (0xF0000, 0x10000, E820Type.RESERVED),
        (0x100000, 96 * MiB - 0x100000, E820Type.RAM),
    ]


def test_zero_page_offsets_for_bzimage_header():
    image = make_bzimage()
    header = parse_setup_header(image)
    params = BootParams(header=header, e820=build_e820_map(64 * MiB), cmd_line_ptr=0x20000,
                        ramdisk_image=0x3F00000, ramdisk_size=0x12345,
                        raw_header=raw_setup_header(image))
    page = params.to_bytes()
    assert len(page) == 4096
    assert page[0x1E8] == 4  # e820_entries
    assert e820_from_page(page) == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2),
                                    (0xF0000, 0x10000, 2), (0x100000, 63 * MiB, 1)]
    assert page[0x1EF] == 0  # sentinel
    assert page[0x1F1] == 4  # setup_sects copied
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", page, 0x206)[0] == 0x020F
    assert page[0x210] == 0xFF  # type_of_loader: undefined
    assert page[0x211] & 0x81 == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert page[0x211] & 0x40 == 0  # not KEEP_SEGMENTS
    assert struct.unpack_from("<I", page, 0x218)[0] == 0x3F00000  # ramdisk_image
    assert struct.unpack_from("<I", page, 0x21C)[0] == 0x12345  # ramdisk_size
    assert struct.unpack_from("<H", page, 0x224)[0] == 0xFE00  # heap_end_ptr
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x20000  # cmd_line_ptr
    assert struct.unpack_from("<I", page, 0x230)[0] == 0x20_0000  # kernel_alignment
    assert struct.unpack_from("<H", page, 0x236)[0] == 0x3  # xloadflags
    assert struct.unpack_from("<I", page, 0x238)[0] == 2047  # cmdline_size
    assert struct.unpack_from("<Q", page, 0x258)[0] == 0x100_0000  # pref_address
    assert struct.unpack_from("<I", page, 0x260)[0] == 0x80_0000  # init_size
    assert struct.unpack_from("<I", page, 0x268)[0] == 0x5A5A  # kernel_info_offset
    assert struct.unpack_from("<III", page, 0xC0) == (0, 0, 0)  # ext_ fields
    assert page[0x26C:0x290] == bytes(0x290 - 0x26C)


def test_ext_fields_carry_high_halves():
    params = BootParams(header=synthesize_setup_header(), ramdisk_image=0x1_2000_0000,
                        ramdisk_size=0x2_0000_0010, cmd_line_ptr=0x3_0002_0000)
    page = params.to_bytes()
    assert struct.unpack_from("<I", page, 0x218)[0] == 0x2000_0000
    assert struct.unpack_from("<I", page, 0x21C)[0] == 0x10
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x0002_0000
    assert struct.unpack_from("<III", page, 0xC0) == (1, 2, 3)


def test_synthesized_header_for_elf():
    page = BootParams(header=synthesize_setup_header(), e820=build_e820_map(32 * MiB),
                      cmd_line_ptr=0x20000).to_bytes()
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", page, 0x206)[0] >= 0x020C
    assert page[0x210] == 0xFF
    assert page[0x211] == 0x81
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x20000
    assert struct.unpack_from("<I", page, 0x238)[0] == 2048
    assert struct.unpack_from("<I", page, 0x230)[0] == 0x20_0000
    assert struct.unpack_from("<I", page, 0x22C)[0] == 0x7FFF_FFFF


def test_write_puts_page_at_zero_page_address():
    memory = GuestMemory([(0, 16 * MiB)])
    try:
        BootParams(header=synthesize_setup_header(), e820=build_e820_map(16 * MiB)).write(memory)
        assert memory.read(0x7000 + 0x202, 4) == b"HdrS"
        assert memory.read(0x7000 + 0x1E8, 1) == b"\x04"
    finally:
        memory.close()


def test_cmdline_nul_terminated_and_limit():
    assert encode_cmdline("console=ttyS0", 2047) == b"console=ttyS0\0"
    assert encode_cmdline(b"x" * 2047, 2047) == b"x" * 2047 + b"\0"
    with pytest.raises(CmdlineError, match=r"2048 bytes, longer than the kernel's limit of 2047"):
        encode_cmdline("x" * 2048, 2047)
    with pytest.raises(CmdlineError, match=r"NUL"):
        encode_cmdline("a\0b", 2047)


def test_initrd_placed_at_top_page_aligned():
    addr = place_initrd(ram_end=64 * MiB, initrd_size=0x1801, initrd_addr_max=0x7FFF_FFFF,
                        kernel_end=0x180_0000)
    assert addr == 64 * MiB - 0x2000
    assert addr % 4096 == 0 and addr + 0x1801 <= 64 * MiB


def test_initrd_respects_initrd_addr_max():
    addr = place_initrd(ram_end=64 * MiB, initrd_size=0x1000, initrd_addr_max=0x1FF_FFFF,
                        kernel_end=0x180_0000)
    assert addr == 0x200_0000 - 0x1000


def test_initrd_that_does_not_fit_above_kernel():
    with pytest.raises(InitrdError, match=r"does not fit between the end of the kernel"):
        place_initrd(ram_end=16 * MiB, initrd_size=9 * MiB, initrd_addr_max=0x7FFF_FFFF,
                     kernel_end=0x800_0000 - 0x100_0000)
    # exactly fitting is fine
    assert place_initrd(ram_end=16 * MiB, initrd_size=8 * MiB, initrd_addr_max=0x7FFF_FFFF,
                        kernel_end=8 * MiB) == 8 * MiB
    with pytest.raises(InitrdError, match=r"empty"):
        place_initrd(ram_end=16 * MiB, initrd_size=0, initrd_addr_max=0x7FFF_FFFF,
                     kernel_end=8 * MiB)


def test_guest_ram_layout_limits():
    assert guest_ram_layout(128 * MiB) == [(0, 128 * MiB)]
    assert guest_ram_layout(0xC000_0000) == [(0, 0xC000_0000)]
    with pytest.raises(MemoryLayoutError, match=r"too large.*PCI hole at 0xc0000000"):
        guest_ram_layout(0xC000_0000 + 4096)
    with pytest.raises(MemoryLayoutError, match=r"too small"):
        guest_ram_layout(1 * MiB)
    with pytest.raises(MemoryLayoutError, match=r"multiple of 4 KiB"):
        guest_ram_layout(64 * MiB + 1)


def test_load_initrd_file_reads_it_to_its_place(tmp_path):
    data = os.urandom(0x3456)
    path = tmp_path / "initrd"
    path.write_bytes(data)
    mem = GuestMemory([(0, 64 * MiB)])
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            loaded = load_initrd_file(mem, fd, kernel_end=0x200_0000)
        finally:
            os.close(fd)
        assert loaded.addr == place_initrd(64 * MiB, len(data), SYNTHETIC_INITRD_ADDR_MAX, 0x200_0000)
        assert loaded.size == len(data)
        assert mem.read(loaded.addr, loaded.size) == data
    finally:
        mem.close()


def test_load_initrd_file_refuses_a_file_that_shrinks(tmp_path, monkeypatch):
    path = tmp_path / "initrd"
    path.write_bytes(bytes(0x4000))
    real_preadv = os.preadv

    def cut_then_read(fd, buffers, offset):
        os.truncate(path, 0x1000)
        return real_preadv(fd, buffers, offset)
    monkeypatch.setattr(os, "preadv", cut_then_read)
    mem = GuestMemory([(0, 64 * MiB)])
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(InitrdError, match=r"initrd: the file ended at 0x1000 of 0x4000 bytes"):
                load_initrd_file(mem, fd, kernel_end=0x200_0000)
        finally:
            os.close(fd)
    finally:
        mem.close()
