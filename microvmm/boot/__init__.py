"""Linux x86 64-bit boot protocol as pure functions over GuestMemory.

Nothing here touches KVM: functions write guest memory and return dataclasses
(LongModeState, CpuidEntry lists) that the VMM turns into KVM register state.
Most callers need only setup_linux_boot() and vcpu_cpuid().
"""

from microvmm.lazyexports import lazy_exports

from .errors import (BootError, BzImageError, CmdlineError, ElfError, InitrdError,
                     KernelFormatError, MpTableError, PayloadCorruptError, PayloadError,
                     PayloadLocationError, PayloadNotElfError, PayloadTooLargeError,
                     UnsupportedPayloadError)
from .layout import MemoryLayoutError, guest_ram_layout

# The rest loads on first use (PEP 562): the CLI validates --mem with
# guest_ram_layout alone, and the VMM imports the loaders while a helper
# thread creates the VM (issue 6). name -> submodule.
_LAZY = {
    "LoadedBzImage": "bzimage", "SetupHeader": "bzimage", "load_bzimage": "bzimage",
    "DecompressedBzImage": "bzimage", "decompress_bzimage": "payload",
    "parse_setup_header": "bzimage",
    "CpuidEntry": "cpuid", "KvmPvFeature": "cpuid", "vcpu_cpuid": "cpuid",
    "KernelFormat": "elf", "LoadedElf": "elf", "detect_kernel_format": "elf", "load_elf_vmlinux": "elf",
    "load_elf_vmlinux_file": "elf",
    "BootInfo": "linux", "setup_linux_boot": "linux",
    "LoadedInitrd": "initrd", "load_initrd_file": "initrd", "place_initrd": "initrd",
    "PciIrq": "mptable", "write_mptable": "mptable",
    "DescriptorTable": "paging", "LongModeState": "paging", "Segment": "paging",
    "DecompressedPayload": "payload", "PayloadFormat": "payload", "decompress_bzimage_payload": "payload",
    "RNG_SEED_SIZE": "params", "BootParams": "params", "E820Entry": "params", "E820Type": "params",
    "SetupDataType": "params", "build_setup_data_chain": "params",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)


__all__ = [
    "BootError", "BootInfo", "BootParams", "BzImageError", "CmdlineError", "CpuidEntry",
    "DecompressedBzImage", "DecompressedPayload", "DescriptorTable", "E820Entry", "E820Type",
    "ElfError", "InitrdError", "KernelFormat", "KernelFormatError", "KvmPvFeature", "LoadedBzImage",
    "LoadedElf",
    "LoadedInitrd", "LongModeState", "MemoryLayoutError", "MpTableError", "PayloadCorruptError",
    "PayloadError", "PayloadFormat", "PayloadLocationError", "PayloadNotElfError",
    "PayloadTooLargeError", "PciIrq", "RNG_SEED_SIZE", "Segment", "SetupDataType", "SetupHeader",
    "UnsupportedPayloadError", "build_setup_data_chain", "decompress_bzimage",
    "decompress_bzimage_payload", "detect_kernel_format", "guest_ram_layout", "load_bzimage",
    "load_elf_vmlinux", "load_elf_vmlinux_file", "load_initrd_file", "parse_setup_header",
    "place_initrd", "setup_linux_boot", "vcpu_cpuid", "write_mptable",
]
