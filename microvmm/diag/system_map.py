"""Where a kernel's System.map is: a path check only (start-up needs it to
plan the kernel's console; parsing is diag/symbols.py's, on demand)."""

from __future__ import annotations

import os
from pathlib import Path


def find_system_map(kernel_path: str | os.PathLike) -> Path | None:
    """System.map beside the kernel (build tree or images/), if any."""
    kernel = Path(kernel_path)
    for candidate in (kernel.parent / "System.map", kernel.parent.parent.parent.parent / "System.map"):
        if candidate.is_file():
            return candidate
    return None
