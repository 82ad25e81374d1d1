"""The default initramfs: root directories, /dev/console, busybox and a few
applet links, then the guest's initramfs/ files; as a deterministic newc archive."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

from microvmm.guestbuild.errors import GuestBuildError
from microvmm.initramfs.newc import CpioArchive


# Directories of the root file system; permissions are the mode to create them with.
_ROOT_DIRECTORIES = {
    "bin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o555, "root": 0o700, "run": 0o755,
    "sbin": 0o755, "sys": 0o555, "tmp": 0o1777, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
}


#: The only applet links in the image. Debian's busybox ash finds every applet
#: without one (FEATURE_SH_STANDALONE: `ls`, `dd`, ... run from any PATH), so
#: links are needed only where a path is exec'd before /proc is mounted (the
#: first `mount` in /init), or by name from outside the shell (#!/bin/sh,
#: /etc/passwd's shell, #!/usr/bin/env). Each link costs the guest kernel
#: ~35 ms to unpack on an emulating host: all 266 took ~9 s of every boot.
#: `busybox --install -s` in the guest creates the rest.
APPLET_LINKS = ("bin/ash", "bin/mount", "bin/sh", "usr/bin/env")


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of all applets ("bin/sh", "usr/bin/setsid", ...) of this busybox binary."""
    result = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True)
    return sorted(line.strip().lstrip("/") for line in result.stdout.splitlines() if line.strip())


def applet_links(busybox: Path, wanted: Sequence[str] = APPLET_LINKS) -> list[str]:
    """The applet links to put in the image: `wanted`, each checked to be an applet of this busybox."""
    available = set(busybox_applets(busybox))
    missing = [path for path in wanted if path not in available]
    if missing:
        raise GuestBuildError(f"{busybox} has no applet for {', '.join(missing)}")
    return sorted(wanted)


def _parent_dirs(path: str) -> Iterator[str]:
    parts = path.split("/")
    for depth in range(1, len(parts)):
        yield "/".join(parts[:depth])


def build_initramfs(source_dir: Path, busybox_binary: bytes, applets: Sequence[str]) -> bytes:
    """newc archive: root dirs, /dev/console, busybox + applet symlinks, then the guest sources' initramfs/ files
    (which win over applet links of the same name, e.g. sbin/poweroff)."""
    archive = CpioArchive()
    for path, permissions in _ROOT_DIRECTORIES.items():
        archive.add_directory(path, permissions)
    # The kernel opens /dev/console for init before anything is mounted.
    archive.add_char_device("dev/console", 5, 1, 0o600)
    archive.add_file("bin/busybox", busybox_binary, 0o755)
    for applet in applets:
        if applet == "bin/busybox":
            continue
        for parent in _parent_dirs(applet):
            if parent not in archive.entries:
                archive.add_directory(parent)
        archive.add_symlink(applet, "/bin/busybox")
    for path in sorted(source_dir.rglob("*")):
        rel = path.relative_to(source_dir).as_posix()
        if path.is_dir():
            archive.add_directory(rel, 0o755)
        elif path.is_symlink():
            archive.add_symlink(rel, os.readlink(path))
        else:
            archive.add_file(rel, path.read_bytes(), 0o755 if path.stat().st_mode & 0o111 else 0o644)
    return archive.to_bytes()


def gzip_deterministic(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)
