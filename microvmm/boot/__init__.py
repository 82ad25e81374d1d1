"""Linux x86 64-bit boot protocol as pure functions over GuestMemory.

Nothing here touches KVM: functions write guest memory and return dataclasses
(LongModeState, CpuidEntry lists) that the VMM turns into KVM register state.
Most callers need only setup_linux_boot() and vcpu_cpuid().
"""

from .bzimage import LoadedBzImage, SetupHeader, load_bzimage, parse_setup_header
from .cpuid import CpuidEntry, vcpu_cpuid
from .elf import KernelFormat, LoadedElf, detect_kernel_format, load_elf_vmlinux
from .errors import (BootError, BzImageError, CmdlineError, ElfError, InitrdError,
                     KernelFormatError, MpTableError, PayloadCorruptError, PayloadError,
                     PayloadLocationError, PayloadNotElfError, PayloadTooLargeError,
                     UnsupportedPayloadError)
from .layout import MemoryLayoutError, guest_ram_layout
from .linux import BootInfo, setup_linux_boot
from .mptable import PciIrq, write_mptable
from .paging import DescriptorTable, LongModeState, Segment
from .payload import DecompressedPayload, PayloadFormat, decompress_bzimage_payload
from .params import RNG_SEED_SIZE, BootParams, E820Entry, E820Type, SetupDataType, build_setup_data_chain

__all__ = [
    "BootError", "BootInfo", "BootParams", "BzImageError", "CmdlineError", "CpuidEntry",
    "DecompressedPayload", "DescriptorTable", "E820Entry", "E820Type", "ElfError", "InitrdError", "KernelFormat",
    "KernelFormatError", "LoadedBzImage", "LoadedElf", "LongModeState", "MemoryLayoutError",
    "MpTableError", "PayloadCorruptError", "PayloadError", "PayloadFormat",
    "PayloadLocationError", "PayloadNotElfError", "PayloadTooLargeError", "PciIrq", "RNG_SEED_SIZE", "Segment", "SetupDataType", "SetupHeader",
    "UnsupportedPayloadError", "build_setup_data_chain", "decompress_bzimage_payload",
    "detect_kernel_format",
    "guest_ram_layout", "load_bzimage", "load_elf_vmlinux", "parse_setup_header",
    "setup_linux_boot", "vcpu_cpuid", "write_mptable",
]
