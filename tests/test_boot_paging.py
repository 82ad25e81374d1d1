"""Identity page tables (walked like the MMU would), GDT descriptors and long-mode state."""

from __future__ import annotations

import struct

import pytest

from microvmm.boot import layout
from microvmm.boot.paging import (Segment, boot_code_segment, boot_data_segment,
                                  boot_tss_segment, setup_long_mode, write_identity_page_tables)
from microvmm.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30
ADDR_MASK = 0x000F_FFFF_FFFF_F000


def translate(mem: GuestMemory, cr3: int, vaddr: int) -> tuple[int, int]:
    """Walk 4-level paging for vaddr; return (physical address, PD entry flags)."""
    pml4e = mem.read_u64((cr3 & ADDR_MASK) + ((vaddr >> 39) & 0x1FF) * 8)
    assert pml4e & 1, f"PML4E for {vaddr:#x} not present"
    assert pml4e & 2
    pdpte = mem.read_u64((pml4e & ADDR_MASK) + ((vaddr >> 30) & 0x1FF) * 8)
    assert pdpte & 1, f"PDPTE for {vaddr:#x} not present"
    assert not pdpte & 0x80, "1 GiB pages must not be used (nogbpages host)"
    pde = mem.read_u64((pdpte & ADDR_MASK) + ((vaddr >> 21) & 0x1FF) * 8)
    assert pde & 1, f"PDE for {vaddr:#x} not present"
    assert pde & 0x80, "expected a 2 MiB page"
    return (pde & 0x000F_FFFF_FFE0_0000) | (vaddr & 0x1F_FFFF), pde & 0xFFF


@pytest.mark.parametrize("ram", [64 * MiB, 1536 * MiB, 3 * GiB])
def test_every_2mib_page_maps_to_itself(ram):
    mem = GuestMemory([(0, 64 * MiB)])  # tables live low; RAM size is what is mapped
    try:
        cr3 = write_identity_page_tables(mem, ram)
        assert cr3 == layout.PML4_ADDR
        mapped = max(GiB, -(-ram // GiB) * GiB)
        for page in range(0, mapped, 2 * MiB):
            phys, flags = translate(mem, cr3, page + 0x1234)
            assert phys == page + 0x1234
            assert flags == 0x83  # present | writable | page size
        # Nothing beyond the mapped GiBs.
        pdpt = mem.read_u64(layout.PML4_ADDR) & ADDR_MASK
        assert all(mem.read_u64(pdpt + 8 * i) == 0 for i in range(mapped // GiB, 512))
        # Only PML4 entry 0 is used.
        assert all(mem.read_u64(layout.PML4_ADDR + 8 * i) == 0 for i in range(1, 512))
    finally:
        mem.close()


def test_page_tables_do_not_overlap_other_structures():
    tables_end = layout.PD_ADDR + layout.MAX_PD_PAGES * layout.PAGE_SIZE
    assert layout.ZERO_PAGE_ADDR + 0x1000 <= layout.BOOT_STACK_TOP < layout.PML4_ADDR
    assert tables_end <= layout.CMDLINE_ADDR
    assert layout.GDT_ADDR + 6 * 8 <= layout.IDT_ADDR
    assert layout.TSS_ADDR + layout.TSS_LIMIT < layout.ZERO_PAGE_ADDR


@pytest.mark.parametrize("segment", [boot_code_segment(), boot_data_segment(), boot_tss_segment()])
def test_descriptor_roundtrip(segment):
    raw = segment.descriptor()
    assert Segment.from_descriptor(raw, segment.selector) == segment


def test_known_descriptor_encodings():
    # Flat 64-bit code (access 0x9B, flags L|G) and flat data (access 0x93, flags D|G).
    assert boot_code_segment().descriptor() == 0x00AF_9B00_0000_FFFF
    assert boot_data_segment().descriptor() == 0x00CF_9300_0000_FFFF


def test_gdt_in_memory_decodes_to_state_segments():
    mem = GuestMemory([(0, 16 * MiB)])
    try:
        state = setup_long_mode(mem, entry=0x100_0200)
        assert state.gdt.base == layout.GDT_ADDR
        count = (state.gdt.limit + 1) // 8
        raw = struct.unpack(f"<{count}Q", mem.read(state.gdt.base, state.gdt.limit + 1))
        assert raw[0] == 0
        for seg in (state.cs, state.ds, state.es, state.ss, state.tr):
            index = seg.selector >> 3
            base_high = raw[index + 1] & 0xFFFF_FFFF if seg.s == 0 else 0
            assert Segment.from_descriptor(raw[index], seg.selector, base_high) == seg
        # boot.rst: CS = __BOOT_CS (0x10), DS/ES/SS = __BOOT_DS (0x18)
        assert state.cs.selector == 0x10 and state.cs.l == 1 and state.cs.db == 0
        assert state.cs.type == 0xB and state.cs.s == 1 and state.cs.present == 1
        assert {state.ds.selector, state.es.selector, state.ss.selector} == {0x18}
        assert state.ds.type == 0x3 and state.ds.limit == 0xFFFF_FFFF
        assert state.tr.type == 11 and state.tr.s == 0 and state.tr.present == 1
        assert mem.read(state.tr.base, state.tr.limit + 1) == bytes(0x68)
    finally:
        mem.close()


def test_long_mode_registers():
    mem = GuestMemory([(0, 16 * MiB)])
    try:
        state = setup_long_mode(mem, entry=0x100_0200, boot_params_addr=0x7000)
        assert state.cr0 & 1 and state.cr0 & (1 << 31)  # PE, PG
        assert state.cr4 & (1 << 5)  # PAE
        assert state.efer == (1 << 8) | (1 << 10)  # LME | LMA
        assert state.cr3 == layout.PML4_ADDR
        assert state.rip == 0x100_0200
        assert state.rsi == 0x7000
        assert state.rflags == 2  # IF clear
        assert state.rsp == layout.BOOT_STACK_TOP
        # The entry, stack, zero page and command line are identity mapped.
        for addr in (state.rip, state.rsp, state.rsi, layout.CMDLINE_ADDR):
            assert translate(mem, state.cr3, addr)[0] == addr
        assert state.idt.base == layout.IDT_ADDR
    finally:
        mem.close()


def test_apply_to_sregs_fills_a_kvm_shaped_object():
    from dataclasses import dataclass, field

    @dataclass
    class KvmSeg:  # shaped like struct kvm_segment
        base: int = 0
        limit: int = 0xFFFF
        selector: int = 0
        type: int = 0
        present: int = 0
        dpl: int = 0
        db: int = 0
        s: int = 0
        l: int = 0  # noqa: E741
        g: int = 0
        avl: int = 0
        unusable: int = 1

    @dataclass
    class KvmDt:
        base: int = 0
        limit: int = 0xFFFF

    @dataclass
    class KvmSregs:
        cs: KvmSeg = field(default_factory=KvmSeg)
        ds: KvmSeg = field(default_factory=KvmSeg)
        es: KvmSeg = field(default_factory=KvmSeg)
        fs: KvmSeg = field(default_factory=KvmSeg)
        gs: KvmSeg = field(default_factory=KvmSeg)
        ss: KvmSeg = field(default_factory=KvmSeg)
        tr: KvmSeg = field(default_factory=KvmSeg)
        ldt: KvmSeg = field(default_factory=KvmSeg)
        gdt: KvmDt = field(default_factory=KvmDt)
        idt: KvmDt = field(default_factory=KvmDt)
        cr0: int = 0x60000010
        cr3: int = 0
        cr4: int = 0
        efer: int = 0
        apic_base: int = 0xFEE00900

    mem = GuestMemory([(0, 16 * MiB)])
    try:
        state = setup_long_mode(mem, entry=0x100_0200)
        sregs = KvmSregs()
        state.apply_to_sregs(sregs)
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
            got, want = getattr(sregs, name), getattr(state, name)
            assert (got.selector, got.base, got.limit, got.type, got.present, got.dpl, got.db,
                    got.s, got.l, got.g, got.avl, got.unusable) == (
                want.selector, want.base, want.limit, want.type, want.present, want.dpl,
                want.db, want.s, want.l, want.g, want.avl, 0)
        assert sregs.ldt == KvmSeg()  # untouched
        assert (sregs.gdt.base, sregs.gdt.limit) == (state.gdt.base, state.gdt.limit)
        assert (sregs.idt.base, sregs.idt.limit) == (state.idt.base, state.idt.limit)
        assert (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) == (
            state.cr0, state.cr3, state.cr4, state.efer)
        assert sregs.apic_base == 0xFEE00900
    finally:
        mem.close()
