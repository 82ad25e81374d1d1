"""The Debian packages the build needs, their versions (cache key inputs), and
host commands."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Sequence

from microvmm.guestbuild.errors import GuestBuildError

logger = logging.getLogger("microvmm.guestbuild")

REQUIRED_PACKAGES = ("linux-source-6.1", "busybox-static", "build-essential", "flex", "bison", "bc",
                     "libelf-dev", "lz4", "cpio", "kmod")
KERNEL_SOURCE_PACKAGE = "linux-source-6.1"
KERNEL_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_BINARY = Path("/bin/busybox")


def _run(cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    logger.debug("run: %s", " ".join(cmd))
    return subprocess.run(cmd, check=True, **kwargs)


def package_version(package: str) -> str | None:
    """Installed version of a Debian package, or None when it is not installed."""
    result = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\t${Version}", package],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None
    status, _, version = result.stdout.partition("\t")
    return version if status.endswith(" installed") else None


def ensure_packages(packages: Sequence[str]) -> None:
    missing = [p for p in packages if package_version(p) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise GuestBuildError(f"missing packages {' '.join(missing)}; run as root or install them")
    logger.info("installing missing packages: %s", " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update"], env=env)
    _run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env)


def compiler_version() -> str:
    result = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[0].strip()
