"""The build cache: where it is, the key of an image set (a hash of every
input), complete entries, and installing an entry's files into a directory.

Everything is cached under ${MICROVMM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/microvmm}:
  src/linux-<ver>/          pristine unpacked Debian linux-source (never modified)
  src/linux-<ver>-work/     hard-link copy of it with the guest's patches applied
  build/linux-<ver>/        kernel O= build directory (shared, so rebuilds are incremental)
  images/<key>/             finished image sets, keyed by a hash of all inputs
A complete images/<key>/ entry makes a rerun a copy that takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Mapping

from microvmm.images import user_cache_dir

IMAGE_FILES = ("bzImage", "vmlinux", "System.map", "kernel.config", "initramfs.cpio", "initramfs.cpio.gz")
MANIFEST_NAME = "manifest.json"
BUILD_LOG_NAME = "build.log"

# Files of the guest sources that do not influence the images.
_KEY_IGNORED_NAMES = {"README.md", "__pycache__"}
_KEY_IGNORED_SUFFIXES = (".pyc", ".swp", "~")


def cache_root() -> Path:
    configured = os.environ.get("MICROVMM_CACHE")
    return Path(configured).expanduser() if configured else user_cache_dir()


def key_input_files(guest_dir: Path) -> list[Path]:
    """Every file under guest_dir that affects the images, in a stable order."""
    files = []
    for path in sorted(guest_dir.rglob("*")):
        rel = path.relative_to(guest_dir)
        if any(part in _KEY_IGNORED_NAMES for part in rel.parts) or path.name.endswith(_KEY_IGNORED_SUFFIXES):
            continue
        if path.is_file() or path.is_symlink():
            files.append(path)
    return files


def compute_cache_key(guest_dir: Path, versions: Mapping[str, str]) -> str:
    """sha256 over tool/package versions and the path, mode and content of each input file."""
    digest = hashlib.sha256(b"microvmm-guest-images v1\n")
    for name in sorted(versions):
        digest.update(f"version {name}={versions[name]}\n".encode())
    for path in key_input_files(guest_dir):
        rel = path.relative_to(guest_dir).as_posix()
        if path.is_symlink():
            digest.update(f"symlink {rel} -> {os.readlink(path)}\n".encode())
            continue
        content = path.read_bytes()
        executable = bool(path.stat().st_mode & 0o111)
        digest.update(f"file {rel} x={int(executable)} {len(content)}\n".encode())
        digest.update(content)
    return digest.hexdigest()[:32]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_entry_complete(entry: Path) -> bool:
    """The manifest is written last; every file it lists must be present with its size."""
    manifest_path = entry / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        return all((entry / name).stat().st_size == info["size"] for name, info in manifest["files"].items()) \
            and set(manifest["files"]) == set(IMAGE_FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def install_outputs(entry: Path, out: Path) -> None:
    """Hard-link (or copy) a cache entry's files into `out`, never writing through an old link."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*IMAGE_FILES, MANIFEST_NAME):
        target = out / name
        if target.exists() and os.path.samefile(entry / name, target):
            continue  # already this entry's link (rename() between two links of one inode is a no-op)
        staging = out / f".{name}.tmp"
        staging.unlink(missing_ok=True)
        try:
            os.link(entry / name, staging)
        except OSError:
            shutil.copyfile(entry / name, staging)
        os.replace(staging, target)
