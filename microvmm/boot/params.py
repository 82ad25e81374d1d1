"""The boot_params "zero page", the e820 memory map, command line and initrd placement.

Offsets are those of struct boot_params (arch/x86/include/uapi/asm/bootparam.h,
Documentation/arch/x86/zero-page.rst).
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass, field

from . import layout
from .bzimage import (BOOT_FLAG, HEADER_MAGIC, SETUP_HEADER_END, SETUP_HEADER_OFFSET,
                      TYPE_OF_LOADER_UNDEFINED, LoadFlags, SetupHeader, XLoadFlags)
from .errors import BootError, CmdlineError
from .initrd import SYNTHETIC_INITRD_ADDR_MAX

logger = logging.getLogger(__name__)

BOOT_PARAMS_SIZE = 0x1000

# struct boot_params offsets
EXT_RAMDISK_IMAGE_OFFSET = 0x0C0
EXT_RAMDISK_SIZE_OFFSET = 0x0C4
EXT_CMD_LINE_PTR_OFFSET = 0x0C8
E820_ENTRIES_OFFSET = 0x1E8
SENTINEL_OFFSET = 0x1EF
E820_TABLE_OFFSET = 0x2D0
E820_MAX_ENTRIES = 128  # E820_MAX_ENTRIES_ZEROPAGE
HDR_AREA_END = 0x290  # hdr plus its padding end where edd_mbr_sig_buffer starts

# What the ELF (vmlinux) path claims in its synthesized setup header.
SYNTHETIC_PROTOCOL_VERSION = 0x020F
SYNTHETIC_CMDLINE_SIZE = 2048  # x86 COMMAND_LINE_SIZE
SYNTHETIC_KERNEL_ALIGNMENT = 0x20_0000
# End of the real-mode heap, as an offset from the setup code minus 0x200.
# Only the real-mode setup code reads it, which the 64-bit protocol skips;
# set as boot loaders do so that CAN_USE_HEAP is truthful.
HEAP_END_PTR = 0xFE00

_E820_ENTRY = struct.Struct("<QQI")


class SetupDataType(enum.IntEnum):
    """struct setup_data types (arch/x86/include/uapi/asm/bootparam.h) this VMM writes."""

    RNG_SEED = 9  # SETUP_RNG_SEED, read by Linux 6.0 and later


# struct setup_data header: u64 next (guest physical address, 0 ends the list), u32 type, u32 len.
_SETUP_DATA_HEADER = struct.Struct("<QII")
#: Bytes of RNG seed handed to the kernel: 256 bits, what crng needs to be ready.
RNG_SEED_SIZE = 32


def build_setup_data_chain(entries: list[tuple[SetupDataType, bytes]], base_addr: int) -> bytes:
    """The linked list of struct setup_data records that the zero page's
    setup_data field points to, laid out back to back from base_addr (each
    record 8-byte aligned, as the kernel maps them with early_memremap)."""
    blob = bytearray()
    for index, (kind, payload) in enumerate(entries):
        start = len(blob)
        record_end = start + _SETUP_DATA_HEADER.size + len(payload)
        next_addr = base_addr + ((record_end + 7) & ~7) if index + 1 < len(entries) else 0
        blob += _SETUP_DATA_HEADER.pack(next_addr, int(kind), len(payload)) + payload
        blob += bytes(-len(blob) % 8)
    return bytes(blob)


class E820Type(enum.IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


@dataclass(frozen=True)
class E820Entry:
    """One range of the e820 memory map handed to the kernel."""

    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        return _E820_ENTRY.pack(self.addr, self.size, int(self.type))


def build_e820_map(ram_end: int) -> list[E820Entry]:
    """The memory map for guest RAM [0, ram_end).

    Conventional memory below the EBDA is RAM; the EBDA and the BIOS area
    (which holds the MP table) are reserved so Linux neither uses nor scans
    them as free memory; everything from 1 MiB to the end of RAM is RAM.
    """
    if ram_end <= layout.HIGH_MEMORY_START:
        raise BootError(f"guest RAM ending at {ram_end:#x} has no memory above 1 MiB")
    return [
        E820Entry(0, layout.EBDA_START, E820Type.RAM),
        E820Entry(layout.EBDA_START, layout.LOW_RAM_END - layout.EBDA_START, E820Type.RESERVED),
        E820Entry(layout.BIOS_START, layout.BIOS_END - layout.BIOS_START, E820Type.RESERVED),
        E820Entry(layout.HIGH_MEMORY_START, ram_end - layout.HIGH_MEMORY_START, E820Type.RAM),
    ]


def synthesize_setup_header() -> SetupHeader:
    """The minimal setup header for booting an ELF vmlinux, which has none.

    The kernel reads cmd_line_ptr, ramdisk_image/size and the version from it;
    the rest is what a real bzImage of the same protocol would declare.
    """
    return SetupHeader(
        boot_flag=BOOT_FLAG,
        header=HEADER_MAGIC,
        version=SYNTHETIC_PROTOCOL_VERSION,
        type_of_loader=TYPE_OF_LOADER_UNDEFINED,
        loadflags=LoadFlags.LOADED_HIGH | LoadFlags.CAN_USE_HEAP,
        heap_end_ptr=HEAP_END_PTR,
        initrd_addr_max=SYNTHETIC_INITRD_ADDR_MAX,
        kernel_alignment=SYNTHETIC_KERNEL_ALIGNMENT,
        relocatable_kernel=1,
        xloadflags=XLoadFlags.KERNEL_64,
        cmdline_size=SYNTHETIC_CMDLINE_SIZE,
    )


def encode_cmdline(cmdline: str | bytes, cmdline_size: int) -> bytes:
    """The command line as NUL-terminated bytes, checked against the kernel's limit.

    cmdline_size is the maximum length *without* the terminating NUL (boot.rst).
    """
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise CmdlineError("kernel command line contains a NUL byte")
    limit = min(cmdline_size, layout.CMDLINE_MAX_SIZE - 1)
    if len(raw) > limit:
        raise CmdlineError(
            f"kernel command line is {len(raw)} bytes, longer than the kernel's limit of "
            f"{limit} bytes (setup header cmdline_size)")
    return raw + b"\0"


@dataclass
class BootParams:
    """Builder for the 4 KiB zero page handed to the kernel in RSI."""

    header: SetupHeader
    e820: list[E820Entry] = field(default_factory=list)
    cmd_line_ptr: int = 0
    ramdisk_image: int = 0
    ramdisk_size: int = 0
    setup_data: int = 0  # guest address of the first struct setup_data, 0 for none
    # The image's setup header bytes as found (from 0x1F1 to its end, see
    # raw_setup_header): carries any fields newer than SetupHeader knows.
    # Empty for an ELF vmlinux.
    raw_header: bytes = b""

    def to_bytes(self) -> bytes:
        if len(self.e820) > E820_MAX_ENTRIES:
            raise BootError(f"{len(self.e820)} e820 entries, the zero page holds "
                            f"{E820_MAX_ENTRIES}")
        page = bytearray(BOOT_PARAMS_SIZE)
        hdr = self.header.with_changes(
            type_of_loader=TYPE_OF_LOADER_UNDEFINED,
            loadflags=(self.header.loadflags | LoadFlags.LOADED_HIGH | LoadFlags.CAN_USE_HEAP)
            & ~LoadFlags.KEEP_SEGMENTS & 0xFF,
            heap_end_ptr=HEAP_END_PTR,
            cmd_line_ptr=self.cmd_line_ptr & 0xFFFF_FFFF,
            ramdisk_image=self.ramdisk_image & 0xFFFF_FFFF,
            ramdisk_size=self.ramdisk_size & 0xFFFF_FFFF,
            setup_data=self.setup_data,
        ).pack()
        raw = self.raw_header[:HDR_AREA_END - SETUP_HEADER_OFFSET]
        page[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(raw)] = raw
        page[SETUP_HEADER_OFFSET:SETUP_HEADER_END] = hdr
        struct.pack_into("<III", page, EXT_RAMDISK_IMAGE_OFFSET, self.ramdisk_image >> 32,
                         self.ramdisk_size >> 32, self.cmd_line_ptr >> 32)
        page[E820_ENTRIES_OFFSET] = len(self.e820)
        for index, entry in enumerate(self.e820):
            offset = E820_TABLE_OFFSET + index * _E820_ENTRY.size
            page[offset:offset + _E820_ENTRY.size] = entry.pack()
        # sentinel (0x1EF) stays 0: a nonzero value makes the kernel wipe
        # fields it thinks a broken loader left uninitialised.
        return bytes(page)

    def write(self, mem, addr: int = layout.ZERO_PAGE_ADDR) -> None:
        mem.write(addr, self.to_bytes())


def raw_setup_header(image: bytes | memoryview) -> bytes:
    """The setup header bytes of a bzImage as boot.rst says to copy them.

    The header ends at 0x202 + the byte at 0x201 (the offset of the jump at
    0x200), capped to the header area of struct boot_params.
    """
    end = min(0x202 + image[0x201], HDR_AREA_END, len(image))
    return bytes(image[SETUP_HEADER_OFFSET:max(end, SETUP_HEADER_OFFSET)])
