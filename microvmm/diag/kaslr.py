"""Where a randomized (KASLR) x86-64 Linux kernel runs, read from its page tables.

With `--kaslr` the kernel's decompressor moves the kernel to a random virtual
address, and a System.map (link addresses) is off by that offset. The kernel
maps its own image in one place only: the 2 MiB pages of the page directory
that page-table entries PML4[511] -> PDPT[510] lead to (__START_KERNEL_map,
0xffffffff80000000). Linux clears every entry of that directory below
`_text` and past the image from its first instructions on (__startup_64,
later cleanup_highmap), so the first present entry there is the 2 MiB page
holding `_text` (CONFIG_PHYSICAL_ALIGN, a multiple of 2 MiB, aligns it).
Its address minus System.map's `_text` is the offset.

The guest's page tables are untrusted input: every read goes through
GuestMemory, and anything unexpected (entry not present, a 1 GiB page, a
table outside RAM) gives None, never a wrong offset.
"""

from __future__ import annotations

from microvmm.memory import GuestMemory, GuestMemoryError

#: __START_KERNEL_map: where x86-64 Linux maps its image (PML4 511, PDPT 510).
KERNEL_MAP_BASE = 0xFFFF_FFFF_8000_0000
_PML4_INDEX = 511
_PDPT_INDEX = 510
_PRESENT = 1 << 0
_PAGE_SIZE_BIT = 1 << 7  # PS: a 1 GiB (PDPT) or 2 MiB (PD) page
_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
#: CR3 bits that are not the table's address: PCID (0-11) and, with page-table
#: isolation, bit 12 selecting the user half of the 8 KiB PGD pair.
_CR3_TABLE_MASK = 0x000F_FFFF_FFFF_E000
_HUGE_2M = 2 << 20


def kernel_text_base(memory: GuestMemory, cr3: int) -> int | None:
    """The virtual address where the guest's kernel image (`_text`) starts,
    or None if the page tables CR3 names do not show it (yet)."""
    try:
        pml4e = memory.read_u64((cr3 & _CR3_TABLE_MASK) + 8 * _PML4_INDEX)
        if not pml4e & _PRESENT:
            return None
        pdpte = memory.read_u64((pml4e & _ADDRESS_MASK) + 8 * _PDPT_INDEX)
        if not pdpte & _PRESENT or pdpte & _PAGE_SIZE_BIT:
            return None
        directory = memory.read((pdpte & _ADDRESS_MASK), 4096)
    except GuestMemoryError:
        return None
    for index in range(512):
        entry = int.from_bytes(directory[8 * index:8 * index + 8], "little")
        if entry & _PRESENT:
            # Linux maps its image with 2 MiB pages; a page table here is not its layout.
            return KERNEL_MAP_BASE + index * _HUGE_2M if entry & _PAGE_SIZE_BIT else None
    return None


def kaslr_offset(memory: GuestMemory, cr3: int, link_text: int) -> int | None:
    """Runtime minus link address of the kernel (0 with nokaslr), or None if
    unknown. `link_text` is System.map's `_text`."""
    base = kernel_text_base(memory, cr3)
    if base is None:
        return None
    offset = base - link_text
    # KASLR moves the image within the 1 GiB kernel map, in 2 MiB steps.
    if offset % _HUGE_2M or not -(1 << 30) < offset < (1 << 30):
        return None
    return offset
