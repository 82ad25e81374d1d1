"""microvmm's own version (the CLI's --version, results files)."""

from __future__ import annotations

import re
from pathlib import Path


def package_version() -> str:
    """microvmm's version: the installed package's metadata, else pyproject's."""
    from importlib import metadata
    try:
        return metadata.version("microvmm")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"
