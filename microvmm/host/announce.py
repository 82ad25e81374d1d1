"""What a run says about its host before the guest starts: an emulating KVM
(slow, and which workarounds apply), and whether a bzImage's payload was
decompressed on the host."""

from __future__ import annotations

import logging
import os
import sys

from microvmm.host.hostinfo import HostKind, emulated_smp_note

logger = logging.getLogger(__name__)


def announce_host(kind: HostKind, reason: str, quirks, cpus: int) -> None:
    """On stderr, once: an emulating host makes a boot slow; say so, and which
    host workarounds (`quirks`) apply."""
    if kind is HostKind.HARDWARE:
        return
    if quirks.active:
        applied = "; ".join(quirk.message for quirk in quirks.applied)
        print(f"microvmm: emulating KVM host ({reason}): guest kernel code is emulated, a Linux "
              f"boot takes minutes, not milliseconds; applying host workarounds ({applied}). "
              "--no-host-workarounds turns them off.",
              file=sys.stderr)
    else:
        print(f"microvmm: emulating KVM host ({reason}): guest kernel code is emulated and slow; "
              "host workarounds are off.", file=sys.stderr)
    note = emulated_smp_note(cpus, os.cpu_count())
    if note:
        print(f"microvmm: {note}.", file=sys.stderr)


def announce_payload_workaround(boot) -> None:
    """Say that (or why not) a bzImage was booted as its host-decompressed ELF."""
    if boot.payload_format is not None:
        logger.warning(
            "host workaround: bzImage: %s payload (%.1f MB ELF) decompressed on the host in "
            "%.2f s, booted at its ELF entry; the guest's decompressor would run emulated "
            "(--no-host-workarounds keeps it)", boot.payload_format,
            boot.payload_elf_size / 1e6, boot.payload_decompress_seconds)
    elif boot.payload_fallback_reason is not None:
        logger.warning(
            "host workaround: bzImage: not applied: %s; the guest's own decompressor runs "
            "emulated, which takes tens of seconds to minutes here", boot.payload_fallback_reason)
