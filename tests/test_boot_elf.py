"""ELF vmlinux loading (from bytes, and straight from the file into guest RAM)
and kernel format detection."""

from __future__ import annotations

import os

import pytest

from boot_testimages import make_bzimage, make_elf
from microvmm.boot.elf import KernelFormat, detect_kernel_format, load_elf_vmlinux, load_elf_vmlinux_file
from microvmm.boot.errors import ElfError, KernelFormatError
from microvmm.memory import GuestMemory

MiB = 1 << 20
REAL_VMLINUX = "/work/main/images/vmlinux"


@pytest.fixture
def mem():
    memory = GuestMemory([(0, 32 * MiB)])
    yield memory
    memory.close()


@pytest.fixture(params=["bytes", "file"])
def load(request, tmp_path):
    """load(mem, image, source): each test runs against both loaders, which must
    agree on every result and every error."""
    if request.param == "bytes":
        return load_elf_vmlinux

    def from_file(memory, image, source="vmlinux"):
        path = tmp_path / "vmlinux"
        path.write_bytes(image)
        fd = os.open(path, os.O_RDONLY)
        try:
            return load_elf_vmlinux_file(memory, fd, source)
        finally:
            os.close(fd)
    return from_file


def test_segments_land_at_paddr_and_bss_is_zeroed(mem, load):
    text = bytes(range(256)) * 16  # 4 KiB
    data = b"DATA" * 256
    # Dirty the bss area first: the loader must zero it, not rely on fresh RAM.
    mem.write(0x120_1000 + len(data), b"\xff" * 0x3000)
    elf = make_elf([(0x100_0000, text, len(text)), (0x120_1000, data, len(data) + 0x3000)],
                   entry=0x100_0040, extra_phdrs=1)
    loaded = load(mem, elf, "vmlinux")
    assert loaded.entry == 0x100_0040
    assert loaded.kernel_start == 0x100_0000
    assert loaded.kernel_end == 0x120_1000 + len(data) + 0x3000
    assert len(loaded.segments) == 2  # the PT_NOTE was skipped
    assert mem.read(0x100_0000, len(text)) == text
    assert mem.read(0x120_1000, len(data)) == data
    assert mem.read(0x120_1000 + len(data), 0x3000) == bytes(0x3000)
    # The byte just past memsz was not touched.
    assert mem.read(0x120_1000 + len(data) + 0x3000, 1) == b"\0"


def test_segment_beyond_ram_rejected(mem, load):
    elf = make_elf([(0x100_0000, b"x" * 16, 16), (0x1F0_0000, b"y" * 16, 2 * MiB)],
                   entry=0x100_0000)
    with pytest.raises(ElfError, match=r"vm: segment 1 at physical 0x1f00000\+0x200000 does not "
                                       r"fit in guest RAM"):
        load(mem, elf, "vm")
    assert mem.read(0x100_0000, 16) == bytes(16)  # nothing written on failure


def test_segment_below_1mib_rejected(mem, load):
    elf = make_elf([(0x8000, b"x" * 16, 16)], entry=0x8000)
    with pytest.raises(ElfError, match=r"below 1 MiB"):
        load(mem, elf)


def test_entry_outside_segments_rejected(mem, load):
    elf = make_elf([(0x100_0000, b"x" * 16, 16)], entry=0xFFFF_FFFF_8100_0000)
    with pytest.raises(ElfError, match=r"entry point 0xffffffff81000000 is not inside"):
        load(mem, elf)


def test_overlapping_segments_rejected(mem, load):
    elf = make_elf([(0x100_0000, b"x" * 16, 0x2000), (0x100_1000, b"y", 1)], entry=0x100_0000)
    with pytest.raises(ElfError, match=r"overlap"):
        load(mem, elf)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"machine": 3}, r"machine 3 is not x86-64"),
    ({"ei_class": 1}, r"not a 64-bit ELF"),
    ({"e_type": 3}, r"not an executable"),
])
def test_wrong_elf_kind_rejected(mem, load, kwargs, pattern):
    elf = make_elf([(0x100_0000, b"x", 1)], entry=0x100_0000, **kwargs)
    with pytest.raises(ElfError, match=pattern):
        load(mem, elf)


def test_program_headers_out_of_bounds(mem, load):
    elf = bytearray(make_elf([(0x100_0000, b"x", 1)], entry=0x100_0000))
    elf[56:58] = (5000).to_bytes(2, "little")  # e_phnum far past the file
    with pytest.raises(ElfError, match=r"truncated ELF: 5000 program headers"):
        load(mem, bytes(elf))


def test_segment_file_data_out_of_bounds(mem, load):
    elf = make_elf([(0x100_0000, b"x" * 0x2000, 0x2000)], entry=0x100_0000)
    with pytest.raises(ElfError, match=r"segment 0 file data .* runs past the end"):
        load(mem, elf[:-0x100])


def test_truncated_elf_header(mem, load):
    with pytest.raises(ElfError, match=r"truncated ELF"):
        load(mem, b"\x7fELF\x02\x01\x01")


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


@pytest.mark.skipif(not os.path.exists(REAL_VMLINUX), reason=f"{REAL_VMLINUX} not built yet")
def test_the_file_loader_puts_the_real_vmlinux_where_the_bytes_loader_does():
    with open(REAL_VMLINUX, "rb") as f:
        data = f.read()
    from_bytes = GuestMemory([(0, 128 * MiB)])
    from_file = GuestMemory([(0, 128 * MiB)])
    try:
        expected = load_elf_vmlinux(from_bytes, data, "vmlinux")
        with open(REAL_VMLINUX, "rb") as f:
            loaded = load_elf_vmlinux_file(from_file, f.fileno(), "vmlinux")
        assert loaded == expected
        for seg in loaded.segments:
            assert from_file.read(seg.paddr, seg.memsz) == from_bytes.read(seg.paddr, seg.memsz)
    finally:
        from_bytes.close()
        from_file.close()


def test_a_file_that_shrinks_while_it_loads_is_a_truncated_elf(mem, tmp_path, monkeypatch):
    """fstat said the segment fits; the read then hits the end of the file (a kernel
    rebuilt during the boot). The loader must not leave the segment half-read silently."""
    elf = make_elf([(0x100_0000, b"x" * 0x3000, 0x3000)], entry=0x100_0000)
    path = tmp_path / "vmlinux"
    path.write_bytes(elf)
    real_preadv = os.preadv
    calls = []

    def preadv_then_truncate(fd, buffers, offset):
        calls.append(offset)
        if len(calls) == 2:  # after the program headers: the file is cut short
            os.truncate(path, offset + 0x1000)
        return real_preadv(fd, buffers, offset)
    monkeypatch.setattr(os, "preadv", preadv_then_truncate)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ElfError, match=r"vmlinux: truncated ELF: the file ended at 0x[0-9a-f]+ while loading"):
            load_elf_vmlinux_file(mem, fd, "vmlinux")
    finally:
        os.close(fd)


def test_the_file_loader_reads_only_headers_into_host_memory(mem, tmp_path, monkeypatch):
    """Segments go from the file to guest RAM with preadv into guest memory views;
    pread is used for the ELF header alone."""
    text = os.urandom(0x4000)
    elf = make_elf([(0x100_0000, text, 0x4000)], entry=0x100_0000, extra_phdrs=2)
    path = tmp_path / "vmlinux"
    path.write_bytes(elf)
    sizes = []
    real_pread = os.pread

    def recording_pread(fd, size, offset):
        sizes.append(size)
        return real_pread(fd, size, offset)
    monkeypatch.setattr(os, "pread", recording_pread)
    fd = os.open(path, os.O_RDONLY)
    try:
        load_elf_vmlinux_file(mem, fd, "vmlinux")
    finally:
        os.close(fd)
    assert sizes == [64]
    assert mem.read(0x100_0000, 0x4000) == text
