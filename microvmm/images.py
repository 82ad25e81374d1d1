"""Where the default guest images are: the kernel and initramfs `microvmm run`
boots without --kernel/--initrd.

Looked up in this order (the first that holds a vmlinux wins):
  1. $MICROVMM_IMAGES, when set (then only there: an explicit choice);
  2. ./images, the build directory of a checkout (`make images`);
  3. images/ beside the package, for a checkout run from another directory;
  4. the user's image cache, ${XDG_CACHE_HOME:-~/.cache}/microvmm/images,
     which `microvmm images build` fills (pip installs).
Only os and pathlib: the CLI reads it on its start-up path.
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGES_ENV = "MICROVMM_IMAGES"
KERNEL_IMAGE = "vmlinux"
INITRD_IMAGE = "initramfs.cpio"
#: What a `run` without --kernel/--initrd tells the user to do.
BUILD_HINT = "run `microvmm images build` (`make images` in a checkout)"


def user_cache_dir() -> Path:
    """${XDG_CACHE_HOME:-~/.cache}/microvmm: the guest builder's cache, and the user's images."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "microvmm"


def user_images_dir() -> Path:
    """Where `microvmm images build` puts the images: $MICROVMM_IMAGES, else the user's cache."""
    env = os.environ.get(IMAGES_ENV)
    return Path(env).expanduser() if env else user_cache_dir() / "images"


def candidate_images_dirs() -> list[Path]:
    """The directories `default_images_dir` looks in, in order."""
    env = os.environ.get(IMAGES_ENV)
    if env:
        return [Path(env).expanduser()]
    source_tree = Path(__file__).resolve().parent.parent
    dirs = [Path.cwd() / "images"]
    if (source_tree / "pyproject.toml").is_file():  # a checkout, not site-packages
        dirs.append(source_tree / "images")
    dirs.append(user_images_dir())
    return [d for index, d in enumerate(dirs) if d not in dirs[:index]]


def default_images_dir() -> Path:
    """The first candidate holding a vmlinux; else where `microvmm images build` would put one."""
    candidates = candidate_images_dirs()
    for candidate in candidates:
        if (candidate / KERNEL_IMAGE).is_file():
            return candidate
    return candidates[-1]
