"""setup_linux_boot: the one call the VMM makes, end to end over guest memory."""

from __future__ import annotations

import os
import struct

import pytest

from boot_testimages import make_bzimage, make_elf, pm_kernel_bytes
from microvmm.boot import (BootError, CmdlineError, InitrdError, KernelFormat, KernelFormatError,
                           PciIrq, guest_ram_layout, setup_linux_boot)
from microvmm.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def mem():
    memory = GuestMemory(guest_ram_layout(64 * MiB))
    yield memory
    memory.close()


def zero_page_u32(mem, offset):
    return mem.read_u32(0x7000 + offset)


def test_bzimage_boot_with_initrd(mem):
    initrd = b"070701" + os.urandom(100_000)
    info = setup_linux_boot(mem, make_bzimage(), "console=ttyS0 quiet", initrd, num_cpus=2,
                            pci_irqs=[PciIrq(1, 1, 16)], kernel_source="bz")
    assert info.kernel_format is KernelFormat.BZIMAGE
    assert info.kernel_load_addr == 0x100_0000 and info.entry == 0x100_0200
    assert info.cpu_state.rip == info.entry and info.cpu_state.rsi == 0x7000
    assert mem.read(0x100_0000, 0x3000) == pm_kernel_bytes(0x3000)
    # command line: pointer in the zero page, NUL-terminated text at that address
    assert zero_page_u32(mem, 0x228) == info.cmdline_addr == 0x20000
    assert mem.read(0x20000, 20) == b"console=ttyS0 quiet\0"
    # initrd: at the top of RAM, page aligned, above the kernel footprint
    assert info.initrd_addr == zero_page_u32(mem, 0x218)
    assert info.initrd_size == zero_page_u32(mem, 0x21C) == len(initrd)
    assert info.initrd_addr % 4096 == 0
    assert info.initrd_addr >= info.kernel_end == 0x180_0000
    assert 64 * MiB - 4096 < info.initrd_addr + len(initrd) <= 64 * MiB
    assert mem.read(info.initrd_addr, len(initrd)) == initrd
    # zero page: header from the image, e820 with 4 entries, loader id
    assert mem.read(0x7000 + 0x202, 4) == b"HdrS"
    assert mem.read(0x7000 + 0x210, 1) == b"\xff"
    assert mem.read(0x7000 + 0x1E8, 1) == b"\x04"
    assert struct.unpack("<QQI", mem.read(0x7000 + 0x2D0 + 3 * 20, 20)) == (
        0x100000, 63 * MiB, 1)
    assert mem.read(info.mptable_addr, 4) == b"_MP_"
    # page tables are in place behind CR3
    assert mem.read_u64(info.cpu_state.cr3) & ~0xFFF == 0xA000


def test_elf_boot_without_initrd(mem):
    text = b"\x90" * 0x2000
    elf = make_elf([(0x100_0000, text, 0x2000), (0x100_2000, b"d" * 16, 0x1000)],
                   entry=0x100_0000)
    info = setup_linux_boot(mem, elf, "console=hvc0")
    assert info.kernel_format is KernelFormat.ELF
    assert info.entry == info.cpu_state.rip == 0x100_0000
    assert info.initrd_addr is None and zero_page_u32(mem, 0x218) == 0
    assert zero_page_u32(mem, 0x21C) == 0
    assert mem.read(0x100_0000, 0x2000) == text
    assert mem.read(0x7000 + 0x202, 4) == b"HdrS"
    assert zero_page_u32(mem, 0x228) == 0x20000
    assert mem.read(0x20000, 13) == b"console=hvc0\0"


def test_an_elf_already_loaded_from_its_file_boots_like_its_bytes(mem, tmp_path):
    """The VMM loads a vmlinux and its initrd on a helper thread (load_elf_vmlinux_file,
    load_initrd_file) and hands setup_linux_boot the results: the boot it prepares,
    and all of guest RAM, are the same."""
    from microvmm.boot import load_elf_vmlinux_file, load_initrd_file
    text = os.urandom(0x2000)
    elf = make_elf([(0x100_0000, text, 0x2000), (0x100_2000, b"d" * 16, 0x1000)], entry=0x100_0040)
    initrd = b"070701" + os.urandom(5000)
    expected = setup_linux_boot(mem, elf, "console=hvc0", initrd)
    path = tmp_path / "vmlinux"
    path.write_bytes(elf)
    fresh = GuestMemory(guest_ram_layout(64 * MiB))
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            loaded = load_elf_vmlinux_file(fresh, fd, "kernel")
        finally:
            os.close(fd)
        (tmp_path / "initrd").write_bytes(initrd)
        fd = os.open(tmp_path / "initrd", os.O_RDONLY)
        try:
            loaded_initrd = load_initrd_file(fresh, fd, loaded.kernel_end)
        finally:
            os.close(fd)
        info = setup_linux_boot(fresh, loaded, "console=hvc0", loaded_initrd)
        assert info == expected
        assert fresh.read(0, 64 * MiB) == mem.read(0, 64 * MiB)
    finally:
        fresh.close()


def test_an_initrd_loaded_elsewhere_than_the_protocol_says_is_refused(mem):
    from microvmm.boot import LoadedInitrd
    elf = make_elf([(0x100_0000, b"x", 1)], entry=0x100_0000)
    with pytest.raises(InitrdError, match=r"initrd loaded at 0x2000000, but this kernel's boot protocol "
                                          r"puts it at 0x3fff000"):
        setup_linux_boot(mem, elf, "", LoadedInitrd(addr=0x200_0000, size=0x1000))


def test_elf_cmdline_limit_is_2048(mem):
    elf = make_elf([(0x100_0000, b"x", 1)], entry=0x100_0000)
    setup_linux_boot(mem, elf, "a" * 2048)
    with pytest.raises(CmdlineError, match=r"2049 bytes"):
        setup_linux_boot(mem, elf, "a" * 2049)


def test_bzimage_cmdline_limit_from_header(mem):
    with pytest.raises(CmdlineError, match=r"limit of 255"):
        setup_linux_boot(mem, make_bzimage(cmdline_size=255), "b" * 256)


def test_initrd_too_large(mem):
    with pytest.raises(InitrdError, match=r"does not fit"):
        setup_linux_boot(mem, make_bzimage(), "", b"x" * (63 * MiB))


def test_unknown_kernel_format(mem):
    with pytest.raises(KernelFormatError, match=r"Image.gz: not a kernel"):
        setup_linux_boot(mem, b"\x1f\x8b\x08" + bytes(4096), "", kernel_source="Image.gz")


def test_all_errors_are_boot_errors():
    for cls in (CmdlineError, InitrdError, KernelFormatError):
        assert issubclass(cls, BootError)


IMAGES = "/work/main/images"


@pytest.mark.parametrize("kernel_name", ["vmlinux", "bzImage"])
@pytest.mark.skipif(not os.path.exists(f"{IMAGES}/initramfs.cpio"),
                    reason=f"{IMAGES} not built yet")
def test_real_kernel_and_initramfs(mem, kernel_name):
    path = f"{IMAGES}/{kernel_name}"
    with open(path, "rb") as f:
        kernel = f.read()
    with open(f"{IMAGES}/initramfs.cpio", "rb") as f:
        initrd = f.read()
    info = setup_linux_boot(mem, kernel, "console=ttyS0", initrd, kernel_source=path)
    if kernel_name == "vmlinux":
        # e_entry of an x86-64 vmlinux is phys_startup_64, per System.map
        with open(f"{IMAGES}/System.map") as f:
            symbols = {name: addr for addr, _, name in
                       (line.split() for line in f) if name}
        assert info.entry == int(symbols["phys_startup_64"], 16)
        assert info.kernel_end == int(symbols["_end"], 16) - 0xFFFF_FFFF_8000_0000
    else:
        assert info.entry == info.kernel_load_addr + 0x200
        # the image's setup header went into the zero page (version, init_size ...)
        assert mem.read(0x7000 + 0x1F1, 0x1F) == kernel[0x1F1:0x210]
        assert mem.read(0x7000 + 0x230, 0x3C) == kernel[0x230:0x26C]
    assert info.initrd_addr >= info.kernel_end
    assert mem.read(info.initrd_addr, 6) == b"070701"


def _setup_data_records(mem, first):
    """Walk the zero page's setup_data list as the kernel does: (type, payload) per record."""
    records, addr = [], first
    while addr:
        next_addr, kind, length = struct.unpack("<QII", mem.read(addr, 16))
        records.append((kind, mem.read(addr + 16, length)))
        assert len(records) < 16, "setup_data list does not end"
        addr = next_addr
    return records


@pytest.mark.parametrize("kernel", ["bzimage", "elf"])
def test_rng_seed_reaches_the_kernel_as_setup_rng_seed(mem, kernel):
    image = make_bzimage() if kernel == "bzimage" else make_elf([(0x100_0000, b"\x90" * 0x1000, 0x1000)],
                                                                 entry=0x100_0000)
    seed = os.urandom(32)
    info = setup_linux_boot(mem, image, "console=ttyS0", rng_seed=seed)
    # boot_params.hdr.setup_data (0x250) points at a one-record list: SETUP_RNG_SEED (9) with the seed
    first = mem.read_u64(0x7000 + 0x250)
    assert first == info.setup_data_addr != 0
    assert _setup_data_records(mem, first) == [(9, seed)]
    # below 1 MiB, clear of the zero page and the command line
    assert first + 16 + 32 <= 0x7000


def test_no_rng_seed_leaves_setup_data_empty(mem):
    info = setup_linux_boot(mem, make_bzimage(), "console=ttyS0")
    assert mem.read_u64(0x7000 + 0x250) == 0 == info.setup_data_addr


def test_rng_seed_of_wrong_size_is_refused(mem):
    with pytest.raises(BootError, match="32 bytes"):
        setup_linux_boot(mem, make_bzimage(), "console=ttyS0", rng_seed=b"short")


def test_setup_data_chain_links_records_at_aligned_addresses():
    from microvmm.boot import SetupDataType, build_setup_data_chain
    blob = build_setup_data_chain([(SetupDataType.RNG_SEED, b"abc"), (SetupDataType.RNG_SEED, b"xyz")], 0x6000)
    next_addr, kind, length = struct.unpack_from("<QII", blob, 0)
    assert (kind, length, blob[16:19]) == (9, 3, b"abc")
    assert next_addr == 0x6000 + 24  # 16 + 3 rounded up to 8
    assert struct.unpack_from("<QII", blob, 24) == (0, 9, 3) and blob[40:43] == b"xyz"
