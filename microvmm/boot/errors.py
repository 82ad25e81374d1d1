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
