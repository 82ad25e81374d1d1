"""bzImage setup-header parsing, validation and loading (synthetic and real images)."""

from __future__ import annotations

import os

import pytest

from boot_testimages import BZ_SETUP_SIZE, make_bzimage, pm_kernel_bytes
from microvmm.boot.bzimage import (SetupHeader, is_bzimage, load_bzimage, parse_setup_header)
from microvmm.boot.errors import BzImageError
from microvmm.memory import GuestMemory

MiB = 1 << 20
REAL_BZIMAGE = "/work/main/images/bzImage"


@pytest.fixture
def mem():
    memory = GuestMemory([(0, 64 * MiB)])
    yield memory
    memory.close()


def test_header_fields_parsed_from_synthetic_image():
    header = parse_setup_header(make_bzimage(pm_size=0x3000), "bz")
    assert header.setup_sects == 4
    assert header.setup_size == BZ_SETUP_SIZE
    assert header.syssize == 0x300
    assert header.boot_flag == 0xAA55
    assert header.header.to_bytes(4, "little") == b"HdrS"
    assert header.version == 0x020F and header.version_string == "2.15"
    assert header.loadflags == 0x01
    assert header.kernel_alignment == 0x20_0000
    assert header.relocatable_kernel == 1 and header.is_relocatable
    assert header.min_alignment == 21
    assert header.xloadflags == 0x3 and header.supports_64bit_entry
    assert header.cmdline_size == 2047
    assert header.initrd_addr_max == 0x7FFF_FFFF
    assert header.pref_address == 0x100_0000
    assert header.init_size == 0x80_0000
    assert header.kernel_info_offset == 0x5A5A


def test_header_pack_roundtrips_image_bytes():
    image = make_bzimage()
    header = parse_setup_header(image)
    assert header.pack() == image[0x1F1:0x26C]
    assert SetupHeader.unpack(header.pack()) == header


def test_setup_sects_zero_means_four():
    image = make_bzimage(setup_sects=0)
    header = parse_setup_header(image)
    assert header.setup_sects == 0
    assert header.setup_size == 5 * 512


def test_truncated_before_header_end():
    with pytest.raises(BzImageError, match=r"bzImage-x: truncated.*setup header"):
        parse_setup_header(make_bzimage()[:0x240], "bzImage-x")


def test_truncated_inside_protected_mode_kernel():
    image = make_bzimage(pm_size=0x3000)
    with pytest.raises(BzImageError, match=r"/tmp/k: truncated.*syssize"):
        parse_setup_header(image[:-16], "/tmp/k")


def test_truncated_inside_setup_sectors():
    image = make_bzimage(setup_sects=30)
    with pytest.raises(BzImageError, match=r"truncated.*30 setup sectors"):
        parse_setup_header(image[:0x1000], "k")


def test_bad_header_magic():
    with pytest.raises(BzImageError, match=r"mykernel: bad header magic b'HdrX'"):
        parse_setup_header(make_bzimage(magic=b"HdrX"), "mykernel")


def test_bad_boot_flag():
    with pytest.raises(BzImageError, match=r"k: bad boot flag 0x55aa"):
        parse_setup_header(make_bzimage(boot_flag=0x55AA), "k")


def test_protocol_too_old():
    with pytest.raises(BzImageError, match=r"k: boot protocol 2.11 is too old.*2.12"):
        parse_setup_header(make_bzimage(version=0x020B), "k")


def test_protocol_2_12_accepted():
    assert parse_setup_header(make_bzimage(version=0x020C)).version == 0x020C


def test_missing_64bit_flag():
    with pytest.raises(BzImageError, match=r"k: not 64-bit capable.*XLF_KERNEL_64"):
        parse_setup_header(make_bzimage(xloadflags=0x2), "k")


def test_is_bzimage():
    assert is_bzimage(make_bzimage())
    assert not is_bzimage(make_bzimage(magic=b"XXXX"))
    assert not is_bzimage(b"\x7fELF" + bytes(0x300))
    assert not is_bzimage(b"short")


def test_load_at_pref_address(mem):
    image = make_bzimage(pm_size=0x3000, pref_address=0x100_0000, init_size=0x80_0000)
    loaded = load_bzimage(mem, image, "bz")
    assert loaded.load_addr == 0x100_0000
    assert loaded.entry == 0x100_0200
    assert loaded.kernel_end == 0x180_0000
    assert mem.read(0x100_0000, 0x3000) == pm_kernel_bytes(0x3000)
    assert mem.read(0x100000, 16) == bytes(16)  # nothing at 1 MiB


def test_relocatable_falls_back_to_1mib_when_pref_does_not_fit():
    small = GuestMemory([(0, 16 * MiB)])
    try:
        # A fitting, aligned pref_address is used; a misaligned one is not, and
        # a relocatable kernel goes to 1 MiB, then runs at max(1 MiB aligned up,
        # pref_address) and needs init_size from there.
        image = make_bzimage(pref_address=0x20_0000, init_size=0x40_0000)
        loaded = load_bzimage(small, image)
        assert loaded.load_addr == 0x20_0000  # pref fits: used
        image = make_bzimage(pref_address=0x30_0000, kernel_alignment=0x20_0000,
                             init_size=0x40_0000)
        loaded = load_bzimage(small, image)  # pref not aligned to kernel_alignment
        assert loaded.load_addr == 0x100000
        assert loaded.entry == 0x100200
        assert loaded.kernel_end == 0x30_0000 + 0x40_0000
        assert small.read(0x100000, 0x100) == pm_kernel_bytes(0x3000)[:0x100]
    finally:
        small.close()


def test_non_relocatable_kernel_that_cannot_sit_at_pref_address():
    small = GuestMemory([(0, 16 * MiB)])
    try:
        image = make_bzimage(relocatable=0, pref_address=0x100_0000, init_size=0x80_0000)
        with pytest.raises(BzImageError, match=r"k: kernel is not relocatable.*0x1000000"):
            load_bzimage(small, image, "k")
    finally:
        small.close()


def test_guest_ram_too_small_for_footprint():
    small = GuestMemory([(0, 8 * MiB)])
    try:
        image = make_bzimage(pref_address=0x100_0000, init_size=0x80_0000)
        with pytest.raises(BzImageError, match=r"k: guest RAM too small"):
            load_bzimage(small, image, "k")
    finally:
        small.close()


@pytest.mark.skipif(not os.path.exists(REAL_BZIMAGE), reason=f"{REAL_BZIMAGE} not built yet")
def test_real_bzimage_header(mem):
    with open(REAL_BZIMAGE, "rb") as f:
        image = f.read()
    header = parse_setup_header(image, REAL_BZIMAGE)
    assert header.version >= 0x020C
    assert header.supports_64bit_entry
    assert header.setup_size + header.protected_mode_size <= len(image)
    # The header's own jump lands right after the fields we know (or later, never before).
    assert 0x202 + image[0x201] >= 0x26C
    loaded = load_bzimage(mem, image, REAL_BZIMAGE)
    assert loaded.entry == loaded.load_addr + 0x200
    assert mem.read(loaded.load_addr, 64) == image[header.setup_size:header.setup_size + 64]
