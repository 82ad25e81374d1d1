"""bzImage parsing and loading for the Linux x86 64-bit boot protocol.

A bzImage is: a real-mode setup part of (setup_sects + 1) * 512 bytes, whose
first sector holds the setup header at offset 0x1F1
(Documentation/arch/x86/boot.rst, struct setup_header in
arch/x86/include/uapi/asm/bootparam.h), followed by the protected-mode kernel
(the decompressor plus the compressed payload). For the 64-bit boot protocol
the VMM loads only the protected-mode part and enters it at load address +
0x200 in long mode; the real-mode setup code never runs.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import astuple, dataclass, fields, replace
from typing import TYPE_CHECKING, NamedTuple

from . import layout
from .errors import BzImageError

if TYPE_CHECKING:
    from .payload import DecompressedPayload

logger = logging.getLogger(__name__)

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HEADER_MAGIC = 0x53726448  # "HdrS" little-endian
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4 (boot.rst)
MIN_PROTOCOL_VERSION = 0x020C  # 2.12: xloadflags (XLF_KERNEL_64) exists
ENTRY_64_OFFSET = 0x200  # 64-bit entry is 0x200 past the protected-mode load address
TYPE_OF_LOADER_UNDEFINED = 0xFF  # "no assigned loader id"


class LoadFlags(enum.IntFlag):
    LOADED_HIGH = 1 << 0
    KASLR_FLAG = 1 << 1
    QUIET_FLAG = 1 << 5
    KEEP_SEGMENTS = 1 << 6
    CAN_USE_HEAP = 1 << 7


class XLoadFlags(enum.IntFlag):
    KERNEL_64 = 1 << 0
    CAN_BE_LOADED_ABOVE_4G = 1 << 1
    EFI_HANDOVER_32 = 1 << 2
    EFI_HANDOVER_64 = 1 << 3
    EFI_KEXEC = 1 << 4


# (field name, struct format) in setup_header order, starting at 0x1F1.
_HEADER_FIELDS: tuple[tuple[str, str], ...] = (
    ("setup_sects", "B"),         # 0x1F1
    ("root_flags", "H"),          # 0x1F2
    ("syssize", "I"),             # 0x1F4  protected-mode size in 16-byte paragraphs
    ("ram_size", "H"),            # 0x1F8
    ("vid_mode", "H"),            # 0x1FA
    ("root_dev", "H"),            # 0x1FC
    ("boot_flag", "H"),           # 0x1FE  0xAA55
    ("jump", "H"),                # 0x200
    ("header", "I"),              # 0x202  "HdrS"
    ("version", "H"),             # 0x206
    ("realmode_swtch", "I"),      # 0x208
    ("start_sys_seg", "H"),       # 0x20C
    ("kernel_version", "H"),      # 0x20E
    ("type_of_loader", "B"),      # 0x210
    ("loadflags", "B"),           # 0x211
    ("setup_move_size", "H"),     # 0x212
    ("code32_start", "I"),        # 0x214
    ("ramdisk_image", "I"),       # 0x218
    ("ramdisk_size", "I"),        # 0x21C
    ("bootsect_kludge", "I"),     # 0x220
    ("heap_end_ptr", "H"),        # 0x224
    ("ext_loader_ver", "B"),      # 0x226
    ("ext_loader_type", "B"),     # 0x227
    ("cmd_line_ptr", "I"),        # 0x228
    ("initrd_addr_max", "I"),     # 0x22C
    ("kernel_alignment", "I"),    # 0x230
    ("relocatable_kernel", "B"),  # 0x234
    ("min_alignment", "B"),       # 0x235
    ("xloadflags", "H"),          # 0x236
    ("cmdline_size", "I"),        # 0x238
    ("hardware_subarch", "I"),    # 0x23C
    ("hardware_subarch_data", "Q"),  # 0x240
    ("payload_offset", "I"),      # 0x248
    ("payload_length", "I"),      # 0x24C
    ("setup_data", "Q"),          # 0x250
    ("pref_address", "Q"),        # 0x258
    ("init_size", "I"),           # 0x260
    ("handover_offset", "I"),     # 0x264
    ("kernel_info_offset", "I"),  # 0x268
)
_HEADER_STRUCT = struct.Struct("<" + "".join(fmt for _, fmt in _HEADER_FIELDS))
SETUP_HEADER_SIZE = _HEADER_STRUCT.size  # 0x7B: the header ends at 0x26C
SETUP_HEADER_END = SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE


@dataclass(frozen=True)
class SetupHeader:
    """struct setup_header, field for field (values as stored in the image)."""

    setup_sects: int = 0
    root_flags: int = 0
    syssize: int = 0
    ram_size: int = 0
    vid_mode: int = 0
    root_dev: int = 0
    boot_flag: int = 0
    jump: int = 0
    header: int = 0
    version: int = 0
    realmode_swtch: int = 0
    start_sys_seg: int = 0
    kernel_version: int = 0
    type_of_loader: int = 0
    loadflags: int = 0
    setup_move_size: int = 0
    code32_start: int = 0
    ramdisk_image: int = 0
    ramdisk_size: int = 0
    bootsect_kludge: int = 0
    heap_end_ptr: int = 0
    ext_loader_ver: int = 0
    ext_loader_type: int = 0
    cmd_line_ptr: int = 0
    initrd_addr_max: int = 0
    kernel_alignment: int = 0
    relocatable_kernel: int = 0
    min_alignment: int = 0
    xloadflags: int = 0
    cmdline_size: int = 0
    hardware_subarch: int = 0
    hardware_subarch_data: int = 0
    payload_offset: int = 0
    payload_length: int = 0
    setup_data: int = 0
    pref_address: int = 0
    init_size: int = 0
    handover_offset: int = 0
    kernel_info_offset: int = 0

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> SetupHeader:
        """Decode SETUP_HEADER_SIZE bytes that start at image offset 0x1F1."""
        return cls(*_HEADER_STRUCT.unpack(bytes(data[:SETUP_HEADER_SIZE])))

    def pack(self) -> bytes:
        return _HEADER_STRUCT.pack(*astuple(self))

    @property
    def setup_sectors(self) -> int:
        """Sectors of real-mode setup code after the boot sector (0 means 4)."""
        return self.setup_sects or DEFAULT_SETUP_SECTS

    @property
    def setup_size(self) -> int:
        """Bytes of the real-mode part, boot sector included: where the kernel starts."""
        return (self.setup_sectors + 1) * SECTOR_SIZE

    @property
    def protected_mode_size(self) -> int:
        return self.syssize * 16

    @property
    def is_relocatable(self) -> bool:
        return self.relocatable_kernel != 0

    @property
    def supports_64bit_entry(self) -> bool:
        return bool(self.xloadflags & XLoadFlags.KERNEL_64)

    @property
    def version_string(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    def with_changes(self, **changes: int) -> SetupHeader:
        return replace(self, **changes)


assert [f.name for f in fields(SetupHeader)] == [name for name, _ in _HEADER_FIELDS]


def is_bzimage(data: bytes | memoryview) -> bool:
    """True if the data carries the boot flag and "HdrS" magic of a Linux x86 boot image."""
    if len(data) < 0x206:  # through the "HdrS" magic
        return False
    boot_flag, = struct.unpack_from("<H", data, 0x1FE)
    magic, = struct.unpack_from("<I", data, 0x202)
    return boot_flag == BOOT_FLAG and magic == HEADER_MAGIC


def parse_setup_header(image: bytes | memoryview, source: str = "bzImage") -> SetupHeader:
    """Parse and validate the setup header of a bzImage for the 64-bit boot protocol.

    `source` names the file in error messages.
    """
    if len(image) < SETUP_HEADER_END:
        raise BzImageError(
            f"{source}: truncated: {len(image)} bytes, shorter than the setup header "
            f"(which ends at offset {SETUP_HEADER_END:#x})")
    header = SetupHeader.unpack(memoryview(image)[SETUP_HEADER_OFFSET:SETUP_HEADER_END])
    if header.boot_flag != BOOT_FLAG:
        raise BzImageError(
            f"{source}: bad boot flag {header.boot_flag:#06x} at offset 0x1FE "
            f"(expected {BOOT_FLAG:#06x}): not a Linux x86 boot image")
    if header.header != HEADER_MAGIC:
        raise BzImageError(
            f"{source}: bad header magic {header.header.to_bytes(4, 'little')!r} at offset 0x202 "
            f"(expected b'HdrS'): not a Linux x86 boot image")
    if header.version < MIN_PROTOCOL_VERSION:
        raise BzImageError(
            f"{source}: boot protocol {header.version_string} is too old: the 64-bit entry "
            f"needs protocol 2.12 or later (xloadflags)")
    if not header.supports_64bit_entry:
        raise BzImageError(
            f"{source}: not 64-bit capable: xloadflags {header.xloadflags:#x} lacks "
            f"XLF_KERNEL_64, so the kernel has no 64-bit entry point")
    if len(image) < header.setup_size:
        raise BzImageError(
            f"{source}: truncated: {len(image)} bytes, shorter than its real-mode setup "
            f"({header.setup_sectors} setup sectors = {header.setup_size} bytes)")
    if header.syssize == 0:
        raise BzImageError(f"{source}: syssize is 0: no protected-mode kernel")
    needed = header.setup_size + header.protected_mode_size
    if len(image) < needed:
        raise BzImageError(
            f"{source}: truncated: {len(image)} bytes, but setup ({header.setup_size}) + "
            f"syssize*16 ({header.protected_mode_size}) = {needed} bytes")
    if header.kernel_alignment & (header.kernel_alignment - 1):
        raise BzImageError(
            f"{source}: kernel_alignment {header.kernel_alignment:#x} is not a power of two")
    return header


class LoadedBzImage(NamedTuple):  # a result record: see boot/elf.py's ElfSegment
    """Where a bzImage's protected-mode kernel was put, and its header for boot_params."""

    header: SetupHeader
    load_addr: int  # protected-mode kernel load address
    entry: int  # 64-bit entry point = load_addr + 0x200
    kernel_end: int  # end of the memory the kernel will use (decompression footprint)


class DecompressedBzImage(NamedTuple):
    """A bzImage whose payload was decompressed ahead of setup_linux_boot (the
    VMM does it on a helper thread: payload.decompress_bzimage)."""

    image: bytes | memoryview  # the bzImage itself: its setup header goes to the zero page
    payload: DecompressedPayload
    seconds: float  # host time the decompression took


def _footprint_end(header: SetupHeader, load_addr: int, loaded_size: int) -> int:
    """End of the memory the kernel may use once it decompresses itself.

    A relocatable kernel runs at its load address rounded up to kernel_alignment,
    but never below its compiled-in LOAD_PHYSICAL_ADDR (= pref_address); a
    non-relocatable one always runs at pref_address. It then needs init_size
    bytes from there.
    """
    alignment = header.kernel_alignment or 1
    if header.is_relocatable:
        run_addr = max(layout.align_up(load_addr, alignment), header.pref_address)
    else:
        run_addr = header.pref_address or load_addr
    return max(load_addr + loaded_size, run_addr + header.init_size)


def choose_load_address(header: SetupHeader, ram_end: int, loaded_size: int,
                        source: str = "bzImage") -> int:
    """Pick the protected-mode load address.

    Loading at pref_address (the kernel's LOAD_PHYSICAL_ADDR, suitably aligned)
    means the decompressor need not move itself. Otherwise a relocatable kernel
    goes at 1 MiB; a non-relocatable one cannot be placed anywhere else.
    """
    pref = header.pref_address
    alignment = header.kernel_alignment or 1
    if (pref >= layout.HIGH_MEMORY_START and pref % alignment == 0
            and _footprint_end(header, pref, loaded_size) <= ram_end):
        return pref
    if header.is_relocatable or pref in (0, layout.HIGH_MEMORY_START):
        return layout.HIGH_MEMORY_START
    raise BzImageError(
        f"{source}: kernel is not relocatable and must run at its fixed address "
        f"{pref:#x}, which needs guest RAM up to "
        f"{_footprint_end(header, pref, loaded_size):#x}; guest RAM ends at {ram_end:#x}")


def load_bzimage(mem, image: bytes | memoryview, source: str = "bzImage") -> LoadedBzImage:
    """Validate a bzImage and copy its protected-mode kernel into guest memory.

    `mem` is a microvmm.memory.GuestMemory. Returns the load address, the
    64-bit entry point and the header to seed boot_params with.
    """
    header = parse_setup_header(image, source)
    kernel = memoryview(image)[header.setup_size:]
    ram_end = mem.end
    load_addr = choose_load_address(header, ram_end, len(kernel), source)
    kernel_end = _footprint_end(header, load_addr, len(kernel))
    if kernel_end > ram_end or not mem.contains(load_addr, len(kernel)):
        raise BzImageError(
            f"{source}: guest RAM too small: the kernel at {load_addr:#x} needs memory up to "
            f"{kernel_end:#x} (init_size {header.init_size:#x}); guest RAM ends at {ram_end:#x}")
    mem.write(load_addr, kernel)
    logger.debug("%s: protocol %s, %d bytes of kernel at %#x, footprint to %#x",
                 source, header.version_string, len(kernel), load_addr, kernel_end)
    return LoadedBzImage(header=header, load_addr=load_addr,
                         entry=load_addr + ENTRY_64_OFFSET, kernel_end=kernel_end)
