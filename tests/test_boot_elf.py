"""ELF vmlinux loading and kernel format detection."""

from __future__ import annotations

import os

import pytest

from boot_testimages import make_bzimage, make_elf
from microvmm.boot.elf import KernelFormat, detect_kernel_format, load_elf_vmlinux
from microvmm.boot.errors import ElfError, KernelFormatError
from microvmm.memory import GuestMemory

MiB = 1 << 20
REAL_VMLINUX = "/work/main/images/vmlinux"


@pytest.fixture
def mem():
    memory = GuestMemory([(0, 32 * MiB)])
    yield memory
    memory.close()


def test_segments_land_at_paddr_and_bss_is_zeroed(mem):
    text = bytes(range(256)) * 16  # 4 KiB
    data = b"DATA" * 256
    # Dirty the bss area first: the loader must zero it, not rely on fresh RAM.
    mem.write(0x120_1000 + len(data), b"\xff" * 0x3000)
    elf = make_elf([(0x100_0000, text, len(text)), (0x120_1000, data, len(data) + 0x3000)],
                   entry=0x100_0040, extra_phdrs=1)
    loaded = load_elf_vmlinux(mem, elf, "vmlinux")
    assert loaded.entry == 0x100_0040
    assert loaded.kernel_start == 0x100_0000
    assert loaded.kernel_end == 0x120_1000 + len(data) + 0x3000
    assert len(loaded.segments) == 2  # the PT_NOTE was skipped
    assert mem.read(0x100_0000, len(text)) == text
    assert mem.read(0x120_1000, len(data)) == data
    assert mem.read(0x120_1000 + len(data), 0x3000) == bytes(0x3000)
    # The byte just past memsz was not touched.
    assert mem.read(0x120_1000 + len(data) + 0x3000, 1) == b"\0"


def test_segment_beyond_ram_rejected(mem):
    elf = make_elf([(0x100_0000, b"x" * 16, 16), (0x1F0_0000, b"y" * 16, 2 * MiB)],
                   entry=0x100_0000)
    with pytest.raises(ElfError, match=r"vm: segment 1 at physical 0x1f00000\+0x200000 does not "
                                       r"fit in guest RAM"):
        load_elf_vmlinux(mem, elf, "vm")
    assert mem.read(0x100_0000, 16) == bytes(16)  # nothing written on failure


def test_segment_below_1mib_rejected(mem):
    elf = make_elf([(0x8000, b"x" * 16, 16)], entry=0x8000)
    with pytest.raises(ElfError, match=r"below 1 MiB"):
        load_elf_vmlinux(mem, elf)


def test_entry_outside_segments_rejected(mem):
    elf = make_elf([(0x100_0000, b"x" * 16, 16)], entry=0xFFFF_FFFF_8100_0000)
    with pytest.raises(ElfError, match=r"entry point 0xffffffff81000000 is not inside"):
        load_elf_vmlinux(mem, elf)


def test_overlapping_segments_rejected(mem):
    elf = make_elf([(0x100_0000, b"x" * 16, 0x2000), (0x100_1000, b"y", 1)], entry=0x100_0000)
    with pytest.raises(ElfError, match=r"overlap"):
        load_elf_vmlinux(mem, elf)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"machine": 3}, r"machine 3 is not x86-64"),
    ({"ei_class": 1}, r"not a 64-bit ELF"),
    ({"e_type": 3}, r"not an executable"),
])
def test_wrong_elf_kind_rejected(mem, kwargs, pattern):
    elf = make_elf([(0x100_0000, b"x", 1)], entry=0x100_0000, **kwargs)
    with pytest.raises(ElfError, match=pattern):
        load_elf_vmlinux(mem, elf)


def test_program_headers_out_of_bounds(mem):
    elf = bytearray(make_elf([(0x100_0000, b"x", 1)], entry=0x100_0000))
    elf[56:58] = (5000).to_bytes(2, "little")  # e_phnum far past the file
    with pytest.raises(ElfError, match=r"truncated ELF: 5000 program headers"):
        load_elf_vmlinux(mem, bytes(elf))


def test_segment_file_data_out_of_bounds(mem):
    elf = make_elf([(0x100_0000, b"x" * 0x2000, 0x2000)], entry=0x100_0000)
    with pytest.raises(ElfError, match=r"segment 0 file data .* runs past the end"):
        load_elf_vmlinux(mem, elf[:-0x100])


def test_truncated_elf_header(mem):
    with pytest.raises(ElfError, match=r"truncated ELF"):
        load_elf_vmlinux(mem, b"\x7fELF\x02\x01\x01")


def test_detect_kernel_format():
    assert detect_kernel_format(make_bzimage()) is KernelFormat.BZIMAGE
    assert detect_kernel_format(make_elf([(0x100_0000, b"x", 1)], 0x100_0000)) is KernelFormat.ELF
    with pytest.raises(KernelFormatError, match=r"initrd.img: not a kernel .*starts with b'070701"):
        detect_kernel_format(b"070701" + bytes(1000), "initrd.img")
    with pytest.raises(KernelFormatError, match=r"empty: not a kernel"):
        detect_kernel_format(b"", "empty")


@pytest.mark.skipif(not os.path.exists(REAL_VMLINUX), reason=f"{REAL_VMLINUX} not built yet")
def test_real_vmlinux_entry_is_physical_startup_64():
    with open(REAL_VMLINUX, "rb") as f:
        data = f.read()
    memory = GuestMemory([(0, 128 * MiB)])
    try:
        loaded = load_elf_vmlinux(memory, data, REAL_VMLINUX)
        # phys_startup_64: a physical address inside the first (text) segment.
        text = min(loaded.segments, key=lambda s: s.paddr)
        assert text.paddr <= loaded.entry < text.paddr + text.filesz
        assert loaded.entry < 1 << 32
    finally:
        memory.close()
