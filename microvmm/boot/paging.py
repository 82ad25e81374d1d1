"""Long-mode CPU state for the 64-bit boot protocol: page tables, GDT, registers.

boot.rst, "64-bit Boot Protocol": the CPU must be in 64-bit mode with paging
enabled; the kernel, zero page and command line identity-mapped; a GDT with
flat 4 GiB __BOOT_CS (selector 0x10, execute/read) and __BOOT_DS (0x18,
read/write); CS = __BOOT_CS, DS/ES/SS = __BOOT_DS; interrupts disabled;
RSI = address of struct boot_params.

Page tables use 2 MiB pages, never 1 GiB ones: this project's hosts boot with
nogbpages and the guest is not promised PDPE1GB.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass

from . import layout

logger = logging.getLogger(__name__)


class Cr0(enum.IntFlag):
    PE = 1 << 0
    MP = 1 << 1
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16
    PG = 1 << 31


class Cr4(enum.IntFlag):
    PAE = 1 << 5


class Efer(enum.IntFlag):
    LME = 1 << 8
    LMA = 1 << 10


class PageFlag(enum.IntFlag):
    PRESENT = 1 << 0
    WRITABLE = 1 << 1
    PAGE_SIZE = 1 << 7  # in a PD entry: maps a 2 MiB page


class SegmentType(enum.IntEnum):
    """Descriptor type field; code/data types (s=1) and system types (s=0) share values."""

    DATA_RW_ACCESSED = 0x3
    CODE_XR_ACCESSED = 0xB
    TSS_64_BUSY = 0xB  # with s=0: 64-bit TSS, busy (an alias of the value above)


BOOT_CS_SELECTOR = 0x10  # __BOOT_CS
BOOT_DS_SELECTOR = 0x18  # __BOOT_DS
BOOT_TSS_SELECTOR = 0x20
GDT_ENTRIES = 6  # null, null, code, data, TSS (16 bytes = 2 slots)
GDT_LIMIT = GDT_ENTRIES * 8 - 1
IDT_LIMIT = 0  # empty IDT: any exception before the kernel's own IDT is a triple fault

PAGE_2M = 2 * layout.MiB
ENTRIES_PER_TABLE = 512
RFLAGS_RESERVED = 0x2  # bit 1 always set; IF clear (interrupts disabled)


@dataclass(frozen=True)
class Segment:
    """A segment register as KVM's struct kvm_segment describes it.

    `limit` is the effective byte limit (0xFFFFFFFF for a flat 4 GiB segment
    with g=1), not the raw 20-bit descriptor field.
    """

    selector: int
    base: int
    limit: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the architectural name of the 64-bit code flag
    g: int
    avl: int = 0

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor (for a 64-bit system segment: its low half)."""
        raw_limit = self.limit >> 12 if self.g else self.limit
        if raw_limit > 0xFFFFF or (self.g and self.limit & 0xFFF != 0xFFF):
            raise ValueError(f"segment limit {self.limit:#x} cannot be encoded with g={self.g}")
        access = (self.type & 0xF) | (self.s << 4) | ((self.dpl & 3) << 5) | (self.present << 7)
        flags = self.avl | (self.l << 1) | (self.db << 2) | (self.g << 3)
        return ((raw_limit & 0xFFFF)
                | (self.base & 0xFFFFFF) << 16
                | access << 40
                | (raw_limit >> 16 & 0xF) << 48
                | flags << 52
                | (self.base >> 24 & 0xFF) << 56)

    @classmethod
    def from_descriptor(cls, raw: int, selector: int, base_high: int = 0) -> Segment:
        """Decode an 8-byte descriptor (plus base[63:32] for 64-bit system segments)."""
        raw_limit = (raw & 0xFFFF) | (raw >> 48 & 0xF) << 16
        access = raw >> 40 & 0xFF
        flags = raw >> 52 & 0xF
        g = flags >> 3 & 1
        return cls(
            selector=selector,
            base=(raw >> 16 & 0xFFFFFF) | (raw >> 56 & 0xFF) << 24 | base_high << 32,
            limit=(raw_limit << 12 | 0xFFF) if g else raw_limit,
            type=access & 0xF,
            s=access >> 4 & 1,
            dpl=access >> 5 & 3,
            present=access >> 7 & 1,
            avl=flags & 1,
            l=flags >> 1 & 1,
            db=flags >> 2 & 1,
            g=g,
        )


@dataclass(frozen=True)
class DescriptorTable:
    """A GDTR/IDTR value: base address and limit."""

    base: int
    limit: int


@dataclass(frozen=True)
class LongModeState:
    """Register state of the boot CPU at the 64-bit kernel entry."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    rip: int
    rsp: int
    rsi: int
    rflags: int = RFLAGS_RESERVED

    SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss", "tr")

    def apply_to_sregs(self, sregs) -> None:
        """Copy this state into a KVM special-registers object, in place.

        `sregs` is anything shaped like struct kvm_sregs (e.g. the KVM
        binding's Sregs dataclass from KVM_GET_SREGS): segment attributes
        cs..tr with the kvm_segment field names, gdt/idt with base/limit,
        and cr0/cr3/cr4/efer. LDT, cr2, cr8 and apic_base are left as they were.
        """
        for name in self.SEGMENT_REGISTERS:
            source: Segment = getattr(self, name)
            target = getattr(sregs, name)
            for attr in ("selector", "base", "limit", "type", "present", "dpl", "db", "s", "l",
                         "g", "avl"):
                setattr(target, attr, getattr(source, attr))
            target.unusable = 0
        for name in ("gdt", "idt"):
            table: DescriptorTable = getattr(self, name)
            getattr(sregs, name).base = table.base
            getattr(sregs, name).limit = table.limit
        sregs.cr0 = self.cr0
        sregs.cr3 = self.cr3
        sregs.cr4 = self.cr4
        sregs.efer = self.efer


def boot_code_segment() -> Segment:
    return Segment(selector=BOOT_CS_SELECTOR, base=0, limit=0xFFFF_FFFF,
                   type=int(SegmentType.CODE_XR_ACCESSED), present=1, dpl=0, db=0, s=1, l=1, g=1)


def boot_data_segment() -> Segment:
    return Segment(selector=BOOT_DS_SELECTOR, base=0, limit=0xFFFF_FFFF,
                   type=int(SegmentType.DATA_RW_ACCESSED), present=1, dpl=0, db=1, s=1, l=0, g=1)


def boot_tss_segment() -> Segment:
    # KVM refuses to enter a guest whose TR is not a busy TSS; the kernel
    # loads its own TR during cpu_init, this one is only there to be valid.
    return Segment(selector=BOOT_TSS_SELECTOR, base=layout.TSS_ADDR, limit=layout.TSS_LIMIT,
                   type=int(SegmentType.TSS_64_BUSY), present=1, dpl=0, db=0, s=0, l=0, g=0)


def write_gdt(mem, addr: int = layout.GDT_ADDR) -> DescriptorTable:
    """Write the boot GDT and a zeroed TSS; return the GDTR value."""
    tss = boot_tss_segment()
    entries = [0, 0, boot_code_segment().descriptor(), boot_data_segment().descriptor(),
               tss.descriptor(), tss.base >> 32]  # 64-bit TSS descriptor is 16 bytes
    assert len(entries) == GDT_ENTRIES
    mem.write(addr, struct.pack(f"<{GDT_ENTRIES}Q", *entries))
    mem.write(tss.base, bytes(tss.limit + 1))
    return DescriptorTable(base=addr, limit=GDT_LIMIT)


def write_idt(mem, addr: int = layout.IDT_ADDR) -> DescriptorTable:
    mem.write(addr, bytes(8))
    return DescriptorTable(base=addr, limit=IDT_LIMIT)


def identity_map_size(ram_end: int) -> int:
    """How much is identity-mapped: all of guest RAM in whole GiB, at least 1 GiB, at most 4."""
    gibs = max(1, layout.align_up(ram_end, layout.GiB) // layout.GiB)
    if gibs > layout.MAX_PD_PAGES:
        raise ValueError(f"guest RAM end {ram_end:#x} is beyond the 4 GiB identity map")
    return gibs * layout.GiB


def write_identity_page_tables(mem, ram_end: int) -> int:
    """Write PML4, PDPT and page directories mapping [0, identity_map_size) 1:1.

    Returns the CR3 value (the PML4 address).
    """
    map_size = identity_map_size(ram_end)
    num_pds = map_size // layout.GiB
    table_flags = PageFlag.PRESENT | PageFlag.WRITABLE
    mem.write(layout.PML4_ADDR, bytes(layout.PAGE_SIZE))
    mem.write(layout.PDPT_ADDR, bytes(layout.PAGE_SIZE))
    mem.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | int(table_flags))
    for pd_index in range(num_pds):
        pd_addr = layout.PD_ADDR + pd_index * layout.PAGE_SIZE
        mem.write_u64(layout.PDPT_ADDR + pd_index * 8, pd_addr | int(table_flags))
        base = pd_index * layout.GiB
        large_page = int(table_flags | PageFlag.PAGE_SIZE)  # once: IntFlag arithmetic is slow
        entries = [(base + i * PAGE_2M) | large_page for i in range(ENTRIES_PER_TABLE)]
        mem.write(pd_addr, struct.pack(f"<{ENTRIES_PER_TABLE}Q", *entries))
    logger.debug("identity map of %d GiB with 2 MiB pages, CR3 %#x", num_pds, layout.PML4_ADDR)
    return layout.PML4_ADDR


def setup_long_mode(mem, entry: int, boot_params_addr: int = layout.ZERO_PAGE_ADDR) -> LongModeState:
    """Write page tables, GDT, IDT and TSS; return the BSP state for the 64-bit entry."""
    cr3 = write_identity_page_tables(mem, mem.end)
    gdt = write_gdt(mem)
    idt = write_idt(mem)
    data = boot_data_segment()
    return LongModeState(
        cr0=int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG),
        cr3=cr3,
        cr4=int(Cr4.PAE),
        efer=int(Efer.LME | Efer.LMA),
        cs=boot_code_segment(),
        ds=data, es=data, fs=data, gs=data, ss=data,
        tr=boot_tss_segment(),
        gdt=gdt,
        idt=idt,
        rip=entry,
        rsp=layout.BOOT_STACK_TOP,
        rsi=boot_params_addr,
    )
