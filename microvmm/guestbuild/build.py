"""Build the default guest images (kernel bzImage and vmlinux, System.map,
its .config, the busybox initramfs) into a directory, through the cache.

Outputs: bzImage, vmlinux, System.map, kernel.config, initramfs.cpio
(uncompressed newc, the default), initramfs.cpio.gz and manifest.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from microvmm.guestbuild import GUEST_SOURCES
from microvmm.guestbuild.cache import (BUILD_LOG_NAME, IMAGE_FILES, MANIFEST_NAME, cache_entry_complete,
                                       cache_root, compute_cache_key, install_outputs, _sha256_file)
from microvmm.guestbuild.errors import GuestBuildError
from microvmm.guestbuild.initramfs import applet_links, build_initramfs, gzip_deterministic
from microvmm.guestbuild.kernel import build_kernel, configure_kernel, kernel_trees, prepare_work_tree, unpack_pristine
from microvmm.guestbuild.packages import (BUSYBOX_BINARY, BUSYBOX_PACKAGE, KERNEL_SOURCE_PACKAGE,
                                          KERNEL_SOURCE_TARBALL, REQUIRED_PACKAGES, compiler_version,
                                          ensure_packages, package_version)
from microvmm.initramfs.newc import read_newc

logger = logging.getLogger("microvmm.guestbuild")


class PhaseTimer:
    """Logs one line per phase with its elapsed seconds."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.monotonic()
        logger.info("[%6.1fs] %s ...", self.timer.elapsed(), self.name)

    def __exit__(self, exc_type, exc, tb) -> None:
        outcome = "failed" if exc_type else "done"
        logger.info("[%6.1fs] %s %s in %.1fs", self.timer.elapsed(), self.name, outcome,
                    time.monotonic() - self.t0)


@dataclasses.dataclass
class BuildInputs:
    guest_dir: Path
    versions: dict[str, str]
    key: str


def collect_inputs(guest_dir: Path) -> BuildInputs:
    versions = {KERNEL_SOURCE_PACKAGE: package_version(KERNEL_SOURCE_PACKAGE) or "missing",
                BUSYBOX_PACKAGE: package_version(BUSYBOX_PACKAGE) or "missing",
                "gcc": compiler_version()}
    return BuildInputs(guest_dir, versions, compute_cache_key(guest_dir, versions))


def build_entry(inputs: BuildInputs, root: Path, entry: Path, timer: PhaseTimer) -> None:
    """Build every image into a staging dir, then publish it atomically as `entry`."""
    staging = entry.with_name(entry.name + f".building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log = staging / BUILD_LOG_NAME
    log.touch()
    version = inputs.versions[KERNEL_SOURCE_PACKAGE]
    trees = kernel_trees(root, version)
    patches = sorted((inputs.guest_dir / "patches").glob("*.patch"))
    try:
        with timer.phase(f"unpack {KERNEL_SOURCE_TARBALL.name} into {trees.pristine}"):
            unpack_pristine(trees, KERNEL_SOURCE_TARBALL)
        with timer.phase(f"apply {len(patches)} patch(es) in {trees.work}"):
            changed = prepare_work_tree(trees, patches)
            logger.info("  work tree %s", "updated" if changed else "already up to date")
        with timer.phase("configure kernel (tinyconfig + guest/kernel.config, verified)"):
            config = configure_kernel(trees, inputs.guest_dir / "kernel.config", log)
        with timer.phase(f"build kernel (vmlinux bzImage, -j{os.cpu_count()})"):
            logger.info("  full log: %s", entry / BUILD_LOG_NAME)
            build_kernel(trees, log)
        with timer.phase("build initramfs"):
            cpio = build_initramfs(inputs.guest_dir / "initramfs", BUSYBOX_BINARY.read_bytes(),
                                   applet_links(BUSYBOX_BINARY))
            read_newc(cpio)  # self-check: the archive parses back
            (staging / "initramfs.cpio").write_bytes(cpio)
            (staging / "initramfs.cpio.gz").write_bytes(gzip_deterministic(cpio))
    except GuestBuildError:
        failed = root / "images" / "last-failed-build.log"
        shutil.copyfile(log, failed)
        shutil.rmtree(staging, ignore_errors=True)
        logger.error("build log kept at %s", failed)
        raise
    shutil.copyfile(trees.build / "arch/x86/boot/bzImage", staging / "bzImage")
    shutil.copyfile(trees.build / "vmlinux", staging / "vmlinux")
    shutil.copyfile(trees.build / "System.map", staging / "System.map")
    shutil.copyfile(config, staging / "kernel.config")
    files = {name: {"size": (staging / name).stat().st_size, "sha256": _sha256_file(staging / name)}
             for name in IMAGE_FILES}
    manifest = {"key": inputs.key, "versions": inputs.versions,
                "patches": [p.name for p in patches], "files": files,
                "build_seconds": round(timer.elapsed(), 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(entry, ignore_errors=True)
    staging.rename(entry)


def build_images(out: Path, guest_dir: Path = GUEST_SOURCES, *, force: bool = False) -> Path:
    """Make `out` hold the images for the current inputs; returns the cache entry used."""
    timer = PhaseTimer()
    with timer.phase("check packages"):
        ensure_packages(REQUIRED_PACKAGES)
        inputs = collect_inputs(guest_dir)
    root = cache_root()
    entry = root / "images" / inputs.key
    logger.info("cache key %s (%s)", inputs.key,
                ", ".join(f"{k} {v}" for k, v in sorted(inputs.versions.items())))
    (root / "images").mkdir(parents=True, exist_ok=True)
    # A complete entry is never changed in place (a build publishes it with one
    # rename), so a cache hit needs no lock: it does not wait minutes behind
    # another key's kernel build. Only `--force` of the same key removes it
    # under our feet; then the locked path below does the work.
    if not force and cache_entry_complete(entry):
        try:
            with timer.phase(f"cache hit {entry}: install into {out}"):
                install_outputs(entry, out)
        except OSError as err:
            logger.info("cache entry changed while installing (%s); taking the build lock", err)
        else:
            return _report(out, timer, entry)
    with (root / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another build holding %s", root / ".lock")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and cache_entry_complete(entry):
            logger.info("cache hit: %s", entry)
        else:
            build_entry(inputs, root, entry, timer)
        with timer.phase(f"install into {out}"):
            install_outputs(entry, out)
    return _report(out, timer, entry)


def _report(out: Path, timer: PhaseTimer, entry: Path) -> Path:
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for name, info in manifest["files"].items():
        logger.info("  %-18s %10d bytes", name, info["size"])
    logger.info("[%6.1fs] images ready in %s", timer.elapsed(), out)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build microvmm's default guest images: kernel (bzImage, vmlinux) and a busybox initramfs.")
    parser.add_argument("--out", type=Path, required=True, help="directory to place the images in")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache entry exists")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="guest: %(message)s", stream=sys.stdout)
    try:
        build_images(args.out.resolve(), force=args.force)
    except GuestBuildError as exc:
        logger.error("%s", exc)
        return 1
    except subprocess.CalledProcessError as exc:
        logger.error("command failed (exit %d): %s", exc.returncode, " ".join(map(str, exc.cmd)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
