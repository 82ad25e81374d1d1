"""One call to prepare guest memory and the boot CPU state for a Linux kernel."""

from __future__ import annotations

import logging
from typing import NamedTuple

from . import layout
from .bzimage import DecompressedBzImage, SetupHeader, load_bzimage, parse_setup_header
from .elf import KernelFormat, LoadedElf, detect_kernel_format, load_elf_vmlinux
from .errors import BootError, InitrdError, UnsupportedPayloadError
from .mptable import DEFAULT_CPU_FEATURES, DEFAULT_CPU_SIGNATURE, PciIrq, write_mptable
from .paging import LongModeState, setup_long_mode
from .initrd import LoadedInitrd, place_initrd
from .params import (RNG_SEED_SIZE, BootParams, E820Entry, SetupDataType, build_e820_map,
                     build_setup_data_chain, encode_cmdline, raw_setup_header, synthesize_setup_header)

logger = logging.getLogger(__name__)

# Used when a bzImage leaves initrd_addr_max 0 (protocols before 2.03).
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF


class BootInfo(NamedTuple):
    """What setup_linux_boot did: where everything went and how the BSP must start.

    A NamedTuple, not a frozen dataclass, for start-up time (see boot/elf.py's
    ElfSegment)."""

    kernel_format: KernelFormat
    entry: int
    cpu_state: LongModeState  # boot CPU (vCPU 0) registers at the 64-bit entry
    kernel_load_addr: int
    kernel_end: int  # end of the kernel's memory footprint
    setup_header: SetupHeader  # the kernel's (or synthesized) header, before loader fields
    boot_params_addr: int
    cmdline_addr: int
    cmdline: bytes  # without the terminating NUL
    initrd_addr: int | None
    initrd_size: int
    mptable_addr: int
    e820: tuple[E820Entry, ...]
    setup_data_addr: int = 0  # 0: no setup_data list
    # bzimage_payload_as_elf: the bzImage payload's compression ("lz4", ...) when
    # the host decompressed it and the kernel was loaded as its ELF, else None.
    payload_format: str | None = None
    payload_elf_size: int = 0  # bytes the payload decompressed to (ELF + relocations)
    payload_decompress_seconds: float = 0.0  # host time spent decompressing
    # bzimage_payload_as_elf was asked for but could not be honoured (an
    # unsupported payload format): why, and the bzImage booted the usual way.
    payload_fallback_reason: str | None = None


def setup_linux_boot(mem, kernel: bytes | memoryview | LoadedElf | DecompressedBzImage,
                     cmdline: str | bytes,
                     initrd: bytes | memoryview | LoadedInitrd | None = None, num_cpus: int = 1,
                     pci_irqs: list[PciIrq] | tuple[PciIrq, ...] = (), *,
                     kernel_source: str = "kernel",
                     rng_seed: bytes | None = None,
                     cpu_signature: int = DEFAULT_CPU_SIGNATURE,
                     cpu_features: int = DEFAULT_CPU_FEATURES,
                     bzimage_payload_as_elf: bool = False) -> BootInfo:
    """Load a bzImage or ELF vmlinux and write everything the 64-bit boot protocol needs.

    `mem` is a GuestMemory whose RAM starts at guest address 0 (see
    layout.guest_ram_layout). `kernel` is the image's bytes, or the LoadedElf
    of an ELF vmlinux already in `mem` (load_elf_vmlinux_file reads one there
    straight from its file), or a DecompressedBzImage (payload.decompress_bzimage:
    a bzImage whose payload the caller decompressed already; it boots as its
    ELF, as with bzimage_payload_as_elf below). `initrd` likewise: its bytes,
    or the LoadedInitrd load_initrd_file put in `mem` (it must be where this
    would put it).
    `kernel_source` names the kernel file in errors.
    `rng_seed` (RNG_SEED_SIZE random bytes from the caller, which owns the
    randomness so that this stays a pure function) goes to the kernel as a
    SETUP_RNG_SEED record: a kernel that trusts its boot loader
    (CONFIG_RANDOM_TRUST_BOOTLOADER, random.trust_bootloader=on) then has a
    ready crng from its first instructions instead of waiting for interrupt
    entropy, and until then every random number re-hashes the whole pool.

    `bzimage_payload_as_elf`: a bzImage's compressed payload is decompressed
    here and its ELF vmlinux loaded at p_paddr and entered at e_entry, as an
    ELF kernel is, so that the kernel's own decompressor never runs (on a host
    that emulates guest kernel code it takes tens of seconds to minutes). The
    zero page still gets the bzImage's own setup header (cmdline_size,
    version, xloadflags...). A payload format not decoded here (zstd, lzo)
    falls back to the usual bzImage boot and says why in
    BootInfo.payload_fallback_reason; a broken payload raises PayloadError.
    Raises a BootError subclass naming the problem.
    """
    if not mem.contains(0, layout.HIGH_MEMORY_START):
        raise BootError("guest RAM must cover [0, 1 MiB) for the boot structures")
    preloaded = kernel if isinstance(kernel, LoadedElf) else None
    payload_format: str | None = None
    payload_elf_size = 0
    payload_seconds = 0.0
    fallback_reason: str | None = None
    if preloaded is not None:
        kernel_format = KernelFormat.ELF
    elif isinstance(kernel, DecompressedBzImage):  # its payload decompressed by the caller
        kernel_format = KernelFormat.BZIMAGE
    else:
        kernel_format = detect_kernel_format(kernel, kernel_source)
        if kernel_format is KernelFormat.BZIMAGE and bzimage_payload_as_elf:
            from .payload import decompress_bzimage  # deferred: bzImages on emulating hosts only
            try:
                kernel = decompress_bzimage(kernel, kernel_source)
            except UnsupportedPayloadError as err:
                fallback_reason = str(err)
                logger.info("%s; booting the bzImage through its own decompressor", err)
    payload = None
    if isinstance(kernel, DecompressedBzImage):  # decompressed by the caller or just above
        kernel, payload, payload_seconds = kernel
    if payload is not None:
        header, raw_header = parse_setup_header(kernel, kernel_source), raw_setup_header(kernel)
        elf = load_elf_vmlinux(mem, payload.elf, f"{kernel_source} ({payload.format.value} payload)")
        entry, load_addr, kernel_end = elf.entry, elf.kernel_start, elf.kernel_end
        payload_format, payload_elf_size = payload.format.value, len(payload.elf)
        del payload  # the ELF is in guest RAM now
    elif kernel_format is KernelFormat.BZIMAGE:
        loaded = load_bzimage(mem, kernel, kernel_source)
        header, raw_header = loaded.header, raw_setup_header(kernel)
        entry, load_addr, kernel_end = loaded.entry, loaded.load_addr, loaded.kernel_end
    else:
        elf = preloaded if preloaded is not None else load_elf_vmlinux(mem, kernel, kernel_source)
        header, raw_header = synthesize_setup_header(), b""
        entry, load_addr, kernel_end = elf.entry, elf.kernel_start, elf.kernel_end

    cmdline_bytes = encode_cmdline(cmdline, header.cmdline_size)
    mem.write(layout.CMDLINE_ADDR, cmdline_bytes)

    initrd_addr: int | None = None
    initrd_size = 0
    if initrd is not None:
        preloaded_initrd = initrd if isinstance(initrd, LoadedInitrd) else None
        initrd_size = preloaded_initrd.size if preloaded_initrd is not None else len(initrd)
        initrd_addr = place_initrd(mem.end, initrd_size,
                                   header.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX, kernel_end)
        if preloaded_initrd is None:
            mem.write(initrd_addr, initrd)
        elif preloaded_initrd.addr != initrd_addr:
            raise InitrdError(f"initrd loaded at {preloaded_initrd.addr:#x}, but this kernel's "
                              f"boot protocol puts it at {initrd_addr:#x}")

    setup_data_addr = 0
    if rng_seed is not None:
        if len(rng_seed) != RNG_SEED_SIZE:
            raise BootError(f"RNG seed must be {RNG_SEED_SIZE} bytes, got {len(rng_seed)}")
        # setup_data needs boot protocol 2.09; SETUP_RNG_SEED is simply skipped by kernels before 6.0.
        if header.version >= 0x0209:
            chain = build_setup_data_chain([(SetupDataType.RNG_SEED, rng_seed)], layout.SETUP_DATA_ADDR)
            assert len(chain) <= layout.SETUP_DATA_MAX_SIZE
            mem.write(layout.SETUP_DATA_ADDR, chain)
            setup_data_addr = layout.SETUP_DATA_ADDR
        else:
            logger.info("%s: boot protocol %s has no setup_data: no RNG seed passed",
                        kernel_source, header.version_string)

    e820 = build_e820_map(mem.end)
    params = BootParams(header=header, e820=e820, cmd_line_ptr=layout.CMDLINE_ADDR,
                        ramdisk_image=initrd_addr or 0, ramdisk_size=initrd_size,
                        setup_data=setup_data_addr, raw_header=raw_header)
    params.write(mem, layout.ZERO_PAGE_ADDR)
    mptable_addr = write_mptable(mem, num_cpus, pci_irqs, cpu_signature, cpu_features)
    cpu_state = setup_long_mode(mem, entry, layout.ZERO_PAGE_ADDR)
    logger.info("%s: %s kernel%s at %#x (entry %#x), initrd %s, %d CPU(s), %d MiB RAM",
                kernel_source, kernel_format.value,
                f" (its {payload_format} payload as ELF)" if payload_format else "", load_addr, entry,
                f"{initrd_size} bytes at {initrd_addr:#x}" if initrd_addr is not None else "none",
                num_cpus, mem.end // layout.MiB)
    return BootInfo(
        kernel_format=kernel_format, entry=entry, cpu_state=cpu_state,
        kernel_load_addr=load_addr, kernel_end=kernel_end,
        setup_header=header, boot_params_addr=layout.ZERO_PAGE_ADDR,
        cmdline_addr=layout.CMDLINE_ADDR, cmdline=cmdline_bytes[:-1],
        initrd_addr=initrd_addr, initrd_size=initrd_size,
        mptable_addr=mptable_addr, e820=tuple(e820), setup_data_addr=setup_data_addr,
        payload_format=payload_format, payload_elf_size=payload_elf_size,
        payload_decompress_seconds=payload_seconds, payload_fallback_reason=fallback_reason,
    )
