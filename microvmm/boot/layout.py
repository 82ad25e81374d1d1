"""The guest physical memory map used to boot Linux: one documented place.

Low memory (below 1 MiB) holds the small structures the VMM writes for the
64-bit boot protocol; the kernel itself goes at 1 MiB or above:

    0x0000_0000 - 0x0000_04FF  real-mode IVT / BDA area (left zero)
    0x0000_0500                GDT (null, null, code64 0x10, data 0x18, TSS 0x20)
    0x0000_0600                IDT (empty: limit 0, the kernel installs its own)
    0x0000_0700                TSS (zeroed, only so TR holds a valid busy TSS)
    0x0000_6000                setup_data list (RNG seed), up to 4 KiB
    0x0000_7000                boot_params ("zero page", 4 KiB)
    0x0000_8000 - 0x0000_8FF0  boot stack (RSP at entry)
    0x0000_9000                PML4
    0x0000_A000                PDPT
    0x0000_B000 - 0x0000_EFFF  page directories (one per GiB, 2 MiB pages)
    0x0002_0000                kernel command line (up to 64 KiB)
    0x0009_FC00 - 0x0009_FFFF  EBDA (reserved in e820)
    0x000F_0000 - 0x000F_FFFF  BIOS area: MP floating pointer + MP config table
    0x0010_0000                bzImage protected-mode kernel (or pref_address)
    p_paddr                    ELF vmlinux PT_LOAD segments (usually 16 MiB)
    ... top of RAM             initrd, placed as high as it fits
    0xC000_0000                start of the PCI hole: guest RAM must end below it
    0xFEC0_0000                IOAPIC MMIO
    0xFEE0_0000                local APIC MMIO
"""

from __future__ import annotations

from .errors import BootError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

PAGE_SIZE = 0x1000

GDT_ADDR = 0x500
IDT_ADDR = 0x600
TSS_ADDR = 0x700
TSS_LIMIT = 0x67  # 104-byte 64-bit TSS, limit is size - 1

SETUP_DATA_ADDR = 0x6000
SETUP_DATA_MAX_SIZE = 0x1000
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0

PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
MAX_PD_PAGES = 4  # 4 page directories of 512 x 2 MiB map the first 4 GiB

CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 0x10000

EBDA_START = 0x9FC00
LOW_RAM_END = 0xA0000  # end of conventional memory (VGA hole above)
BIOS_START = 0xF0000
BIOS_END = 0x100000
MPTABLE_START = BIOS_START

HIGH_MEMORY_START = 0x100000  # where a bzImage protected-mode kernel loads by default

PCI_HOLE_START = 0xC000_0000
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

# Guests smaller than this cannot hold the low structures plus any real kernel.
MIN_RAM_SIZE = 4 * MiB


class MemoryLayoutError(BootError, ValueError):
    """The requested guest memory size does not fit this VMM's memory map."""


def guest_ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """The (guest address, size) regions of guest RAM for a --mem size in bytes.

    RAM is one region starting at 0. It must end below the PCI hole, because
    this VMM puts device MMIO (PCI BARs, IOAPIC, LAPIC) from PCI_HOLE_START up
    and does not relocate RAM above 4 GiB.
    """
    if mem_size % PAGE_SIZE:
        raise MemoryLayoutError(f"guest memory size {mem_size:#x} is not a multiple of 4 KiB")
    if mem_size < MIN_RAM_SIZE:
        raise MemoryLayoutError(
            f"guest memory size {mem_size // KiB} KiB is too small (minimum {MIN_RAM_SIZE // MiB} MiB)")
    if mem_size > PCI_HOLE_START:
        raise MemoryLayoutError(
            f"guest memory size {mem_size // MiB} MiB is too large: RAM must end below the "
            f"PCI hole at {PCI_HOLE_START:#x} (maximum {PCI_HOLE_START // MiB} MiB)")
    return [(0, mem_size)]


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment
