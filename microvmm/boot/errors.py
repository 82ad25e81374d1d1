"""Exceptions of the boot layer: each names the problem and, where known, the file."""

from __future__ import annotations


class BootError(Exception):
    """Base class: the guest cannot be set up to boot as requested."""


class KernelFormatError(BootError):
    """The kernel file is neither a bzImage nor an x86-64 ELF vmlinux."""


class BzImageError(BootError):
    """A bzImage is truncated, malformed, or unsuitable for the 64-bit boot protocol."""


class ElfError(BootError):
    """An ELF vmlinux is malformed or does not fit in guest RAM."""


class CmdlineError(BootError):
    """The kernel command line cannot be passed (too long, embedded NUL)."""


class InitrdError(BootError):
    """The initrd cannot be placed in guest RAM."""


class MpTableError(BootError):
    """The MP table cannot describe the requested CPUs / interrupts."""


class PayloadError(BzImageError):
    """A bzImage's compressed payload cannot be turned into its ELF vmlinux."""


class UnsupportedPayloadError(PayloadError):
    """The payload's compression format cannot be decompressed by the VMM.

    The bzImage still boots the usual way: its own decompressor runs in the guest.
    """

    def __init__(self, message: str, payload_format: str) -> None:
        super().__init__(message)
        self.payload_format = payload_format


class PayloadLocationError(PayloadError):
    """payload_offset/payload_length point outside the protected-mode kernel."""


class PayloadCorruptError(PayloadError):
    """The payload does not decompress (truncated, bad checksum, bad block)."""


class PayloadTooLargeError(PayloadError):
    """The payload decompresses to more than the VMM's limit (a decompression bomb)."""


class PayloadNotElfError(PayloadError):
    """The payload decompresses, but not to an ELF file."""
