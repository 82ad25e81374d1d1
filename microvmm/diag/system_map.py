"""Where a kernel's System.map is: a path check only (start-up needs it to
plan the kernel's console; parsing is diag/symbols.py's, on demand)."""

from __future__ import annotations

import os
from pathlib import Path


def find_system_map(kernel_path: str | os.PathLike) -> Path | None:
    """System.map beside the kernel (build tree or images/), or a distribution's
    /boot/System.map-VERSION beside /boot/vmlinuz-VERSION, if any."""
    kernel = Path(kernel_path)
    candidates = [kernel.parent / "System.map", kernel.parent.parent.parent.parent / "System.map"]
    for prefix in ("vmlinuz-", "vmlinux-", "bzImage-"):
        if kernel.name.startswith(prefix):
            candidates.insert(0, kernel.parent / f"System.map-{kernel.name[len(prefix):]}")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None
