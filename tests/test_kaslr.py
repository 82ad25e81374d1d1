"""`--kaslr`: the offset of a randomized kernel read from its page tables,
and symbols looked up at the running kernel's addresses; finding a
distribution kernel's System.map-VERSION (and saying when it is Debian's
placeholder)."""

from __future__ import annotations

import pytest

from microvmm.boot.layout import MiB, guest_ram_layout
from microvmm.diag.kaslr import KERNEL_MAP_BASE, kaslr_offset, kernel_text_base
from microvmm.diag.symbols import KaslrSymbols, SymbolMap, SymbolMapError, find_system_map
from microvmm.memory import GuestMemory

PML4, PDPT, PD = 0x10_0000, 0x10_1000, 0x10_2000
LINK_TEXT = 0xFFFF_FFFF_8100_0000  # System.map's _text (CONFIG_PHYSICAL_START 16 MiB)
PRESENT_RW, PS = 0x3, 0x80


@pytest.fixture
def mem():
    memory = GuestMemory(guest_ram_layout(64 * MiB))
    yield memory
    memory.close()


def map_kernel(mem: GuestMemory, first_pd_index: int, pages: int = 30, physical: int = 0x100_0000) -> None:
    """The kernel's own layout: PML4[511] -> PDPT[510] -> PD with 2 MiB pages
    from `first_pd_index` on, and nothing below (cleared by Linux)."""
    mem.write_u64(PML4 + 8 * 511, PDPT | PRESENT_RW)
    mem.write_u64(PDPT + 8 * 510, PD | PRESENT_RW)
    for i in range(pages):
        mem.write_u64(PD + 8 * (first_pd_index + i), (physical + i * 2 * MiB) | PRESENT_RW | PS)


def test_nokaslr_kernel_is_at_its_link_address(mem):
    map_kernel(mem, 8)
    assert kernel_text_base(mem, PML4) == LINK_TEXT
    assert kaslr_offset(mem, PML4, LINK_TEXT) == 0


def test_a_randomized_kernel_gives_its_offset_whatever_cr3s_low_bits(mem):
    map_kernel(mem, 8 + 137)
    expected = 137 * 2 * MiB
    assert kaslr_offset(mem, PML4, LINK_TEXT) == expected
    # PCID in bits 0-11, and page-table isolation's user half (bit 12).
    assert kaslr_offset(mem, PML4 | 0x5 | 0x1000, LINK_TEXT) == expected


@pytest.mark.parametrize("damage", ["no-pml4e", "no-pdpte", "1g-page", "page-table", "empty-pd", "outside-ram"])
def test_page_tables_that_do_not_show_the_kernel_give_no_offset(mem, damage):
    map_kernel(mem, 8 + 3)
    cr3 = PML4
    if damage == "no-pml4e":
        mem.write_u64(PML4 + 8 * 511, 0)
    elif damage == "no-pdpte":
        mem.write_u64(PDPT + 8 * 510, PD)  # not present
    elif damage == "1g-page":
        mem.write_u64(PDPT + 8 * 510, PD | PRESENT_RW | PS)
    elif damage == "page-table":
        mem.write_u64(PD + 8 * 2, 0x20_0000 | PRESENT_RW)  # a 4 KiB table first: not Linux's layout
    elif damage == "empty-pd":
        mem.write(PD, bytes(4096))
    else:
        mem.write_u64(PML4 + 8 * 511, (1 << 40) | PRESENT_RW)  # a guest pointer past its RAM
    assert kaslr_offset(mem, cr3, LINK_TEXT) is None
    assert kaslr_offset(mem, 0xFFFF_F000, LINK_TEXT) is None  # CR3 itself outside RAM


def test_the_boot_identity_map_shows_no_kernel(mem):
    """Before the kernel's own tables (the VMM's boot tables, the decompressor's): no offset."""
    mem.write_u64(PML4, PDPT | PRESENT_RW)
    mem.write_u64(PDPT, PD | PRESENT_RW)
    mem.write_u64(PD, PRESENT_RW | PS)
    assert kernel_text_base(mem, PML4) is None


SYMBOLS = [(LINK_TEXT, "_text"), (LINK_TEXT + 0x1000, "start_kernel"), (LINK_TEXT + 0x2000, "do_idle")]


def test_kaslr_symbols_name_the_running_kernels_addresses():
    offset = 0x2a00000
    calls = []

    def find():
        calls.append(1)
        return offset

    symbols = KaslrSymbols(SymbolMap(SYMBOLS), find)
    symbol = symbols.lookup(LINK_TEXT + offset + 0x1010)
    assert (symbol.name, symbol.offset, symbol.address) == ("start_kernel", 0x10, LINK_TEXT + offset + 0x1000)
    assert symbols.describe(LINK_TEXT + offset + 0x2004) == f"{LINK_TEXT + offset + 0x2004:#x} <do_idle+0x4>"
    assert symbols.address_of("do_idle") == LINK_TEXT + 0x2000 + offset
    assert symbols.lookup(0x40_1000) is None  # user space: not the kernel's
    assert len(calls) == 1  # found once, kept


def test_kaslr_symbols_say_nothing_while_the_offset_is_unknown():
    now = [0.0]
    answers = [None, 0x200000]
    symbols = KaslrSymbols(SymbolMap(SYMBOLS), lambda: answers.pop(0), clock=lambda: now[0])
    assert symbols.lookup(LINK_TEXT + 0x1000) is None  # never a link-address name for it
    assert symbols.describe(LINK_TEXT + 0x1000) == f"{LINK_TEXT + 0x1000:#x}"
    now[0] = 0.5
    assert symbols.lookup(LINK_TEXT + 0x201000) is None  # not asked again within a second
    now[0] = 1.5
    assert symbols.lookup(LINK_TEXT + 0x201000).name == "start_kernel"


def test_distribution_system_map_beside_vmlinuz_and_debians_placeholder(tmp_path):
    boot = tmp_path / "boot"
    boot.mkdir()
    kernel = boot / "vmlinuz-6.1.0-57-amd64"
    kernel.write_bytes(b"")
    assert find_system_map(kernel) is None
    system_map = boot / "System.map-6.1.0-57-amd64"
    system_map.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    assert find_system_map(kernel) == system_map
    with pytest.raises(SymbolMapError, match="Debian's placeholder.*-dbg package.*/proc/kallsyms.*nokaslr"):
        SymbolMap.from_file(system_map)
    # /proc/kallsyms of a nokaslr boot is a System.map (module symbols included).
    system_map.write_text(f"{LINK_TEXT:x} T _text\n{LINK_TEXT + 0x1000:x} t start_kernel\n"
                          "ffffffffc0001000 t virtcons_probe\t[virtio_console]\n")
    assert SymbolMap.from_file(system_map).lookup(LINK_TEXT + 0x1004).name == "start_kernel"
