#!/usr/bin/env python3
"""Build microvmm's default guest images: kernel (bzImage, vmlinux) and a busybox initramfs.

Usage (as root on Debian bookworm):  python3 guest/build_images.py --out images

Outputs in --out: bzImage, vmlinux, System.map, kernel.config, initramfs.cpio
(uncompressed newc, the default), initramfs.cpio.gz and manifest.json.

Everything is cached under ${MICROVMM_CACHE:-~/.cache/microvmm}:
  src/linux-<ver>/          pristine unpacked Debian linux-source (never modified)
  src/linux-<ver>-work/     hard-link copy of it with guest/patches applied
  build/linux-<ver>/        kernel O= build directory (shared, so rebuilds are incremental)
  images/<key>/             finished image sets, keyed by a hash of all inputs
A complete images/<key>/ entry makes a rerun a copy that takes seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

GUEST_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(GUEST_DIR))
from newc import CpioArchive, read_newc  # noqa: E402  (sibling module of this script)

logger = logging.getLogger("build_images")

REQUIRED_PACKAGES = ("linux-source-6.1", "busybox-static", "build-essential", "flex", "bison", "bc",
                     "libelf-dev", "lz4", "cpio", "kmod")
KERNEL_SOURCE_PACKAGE = "linux-source-6.1"
KERNEL_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_BINARY = Path("/bin/busybox")

IMAGE_FILES = ("bzImage", "vmlinux", "System.map", "kernel.config", "initramfs.cpio", "initramfs.cpio.gz")
MANIFEST_NAME = "manifest.json"
BUILD_LOG_NAME = "build.log"
PROGRESS_INTERVAL_S = 10.0
LOG_TAIL_LINES = 60

# Files under guest/ that do not influence the images.
_KEY_IGNORED_NAMES = {"README.md", "__pycache__"}
_KEY_IGNORED_SUFFIXES = (".pyc", ".swp", "~")

# Reproducible kernel identity strings (uname -v), independent of who builds when.
_KBUILD_ENV = {
    "KBUILD_BUILD_USER": "microvmm",
    "KBUILD_BUILD_HOST": "microvmm",
    "KBUILD_BUILD_TIMESTAMP": "2000-01-01",
    "KBUILD_BUILD_VERSION": "1",
}


class GuestBuildError(Exception):
    """The image build cannot proceed; the message says why."""


class ConfigMismatchError(GuestBuildError):
    """Options of the kernel config fragment did not end up in the final .config."""

    def __init__(self, mismatches: Sequence["ConfigMismatch"]) -> None:
        self.mismatches = list(mismatches)
        lines = "\n".join(f"  {m}" for m in self.mismatches)
        super().__init__(f"{len(self.mismatches)} option(s) of the fragment did not stick:\n{lines}")


# --------------------------------------------------------------------------- kernel config


@dataclasses.dataclass(frozen=True)
class ConfigMismatch:
    option: str
    wanted: str
    got: str | None  # None: absent from .config

    def __str__(self) -> str:
        got = "absent" if self.got is None else self.got
        return f"{self.option}: wanted {self.wanted}, got {got}"


_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_kconfig(text: str) -> dict[str, str]:
    """Map option -> value for a .config or fragment; '# X is not set' gives 'n'."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if match := _SET_RE.match(line):
            options[match.group(1)] = match.group(2)
        elif match := _UNSET_RE.match(line):
            options[match.group(1)] = "n"
    return options


def verify_config(fragment: Mapping[str, str], final: Mapping[str, str]) -> list[ConfigMismatch]:
    """Options of `fragment` whose value differs in `final` ('n' also matches an absent option)."""
    mismatches = []
    for option, wanted in fragment.items():
        got = final.get(option)
        if wanted == "n" and got in (None, "n"):
            continue
        if got != wanted:
            mismatches.append(ConfigMismatch(option, wanted, got))
    return mismatches


# --------------------------------------------------------------------------- cache key


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


# --------------------------------------------------------------------------- host tools


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


def cache_root() -> Path:
    configured = os.environ.get("MICROVMM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "microvmm"


# --------------------------------------------------------------------------- phases


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


# --------------------------------------------------------------------------- kernel source


@dataclasses.dataclass(frozen=True)
class KernelTrees:
    pristine: Path
    work: Path
    build: Path


def kernel_trees(root: Path, version: str) -> KernelTrees:
    return KernelTrees(pristine=root / "src" / f"linux-{version}",
                       work=root / "src" / f"linux-{version}-work",
                       build=root / "build" / f"linux-{version}")


_UNPACKED_MARKER = ".microvmm-unpacked"
_WORK_READY_MARKER = ".microvmm-work-ready"
_PATCH_STATE = ".microvmm-patches.json"


def unpack_pristine(trees: KernelTrees, tarball: Path) -> None:
    if (trees.pristine / _UNPACKED_MARKER).exists():
        return
    staging = trees.pristine.with_name(trees.pristine.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(trees.pristine, ignore_errors=True)
    staging.mkdir(parents=True)
    _run(["tar", "-xf", str(tarball), "-C", str(staging)])
    tops = list(staging.iterdir())
    if len(tops) != 1 or not (tops[0] / "Makefile").exists():
        raise GuestBuildError(f"{tarball} did not unpack to a single kernel tree: {tops}")
    tops[0].rename(trees.pristine)
    staging.rmdir()
    (trees.pristine / _UNPACKED_MARKER).write_text(f"{tarball}\n")


def patched_paths(patch_text: str) -> list[str]:
    """Tree-relative files a -p1 unified diff touches (old and new names, /dev/null excluded)."""
    paths = []
    for line in patch_text.splitlines():
        if line.startswith(("--- ", "+++ ")):
            name = line[4:].split("\t")[0].strip()
            if name == "/dev/null" or "/" not in name:
                continue
            rel = name.split("/", 1)[1]
            if rel not in paths:
                paths.append(rel)
    return paths


def _restore_from_pristine(trees: KernelTrees, rel: str) -> None:
    """Give `rel` in the work tree a private copy of the pristine file with a fresh mtime
    (so make rebuilds it), or remove it when pristine has no such file."""
    target = trees.work / rel
    source = trees.pristine / rel
    if target.exists() or target.is_symlink():
        target.unlink()
    if source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        shutil.copymode(source, target)


def prepare_work_tree(trees: KernelTrees, patches: Sequence[Path]) -> bool:
    """Make the work tree equal pristine + `patches`; returns True if it changed.

    The work tree is a hard-link copy of pristine. Files touched by the
    previously applied patch set are replaced by private pristine copies,
    then the new set is applied to private copies, so pristine never changes
    and a changed patch really recompiles what it touches.
    """
    wanted = [{"name": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in patches]
    state_file = trees.work / _PATCH_STATE
    if not (trees.work / _WORK_READY_MARKER).exists():
        shutil.rmtree(trees.work, ignore_errors=True)
        _run(["cp", "-al", str(trees.pristine), str(trees.work)])
        (trees.work / _WORK_READY_MARKER).touch()
        previous: dict = {"patches": [], "files": []}
    else:
        previous = json.loads(state_file.read_text()) if state_file.exists() else {"patches": [], "files": []}
    if previous["patches"] == wanted:
        return False
    for rel in previous["files"]:
        _restore_from_pristine(trees, rel)
    state_file.unlink(missing_ok=True)
    touched: list[str] = []
    for patch in patches:
        text = patch.read_text()
        rels = patched_paths(text)
        for rel in rels:
            _restore_from_pristine(trees, rel)  # break the hard link before patch writes
        touched.extend(r for r in rels if r not in touched)
        # Record what is about to change before it changes, so a failed apply is undone next run.
        state_file.write_text(json.dumps({"patches": [], "files": touched}))
        result = subprocess.run(["patch", "-p1", "--forward", "--no-backup-if-mismatch", "-r", "-", "-i",
                                 str(patch)], cwd=trees.work, capture_output=True, text=True)
        if result.returncode != 0:
            raise GuestBuildError(f"patch {patch.name} does not apply:\n{result.stdout}{result.stderr}")
        logger.info("applied %s (%s)", patch.name, ", ".join(rels))
    state_file.write_text(json.dumps({"patches": wanted, "files": touched}))
    return True


# --------------------------------------------------------------------------- kernel build


def make_cmd(trees: KernelTrees, *targets: str, jobs: int = 1) -> list[str]:
    return ["make", "-C", str(trees.work), f"O={trees.build}", "ARCH=x86_64", f"-j{jobs}", *targets]


def configure_kernel(trees: KernelTrees, fragment: Path, log: Path) -> Path:
    """tinyconfig + fragment (merge_config.sh) + olddefconfig, then verify; returns .config."""
    trees.build.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ARCH="x86_64", **_KBUILD_ENV)
    with log.open("a") as out:
        for cmd in (make_cmd(trees, "tinyconfig"),
                    [str(trees.work / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(trees.build),
                     str(trees.build / ".config"), str(fragment)],
                    make_cmd(trees, "olddefconfig")):
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            result = subprocess.run(cmd, cwd=trees.work, env=env, stdout=out, stderr=subprocess.STDOUT)
            if result.returncode != 0:
                raise GuestBuildError(f"kernel configuration failed: {' '.join(cmd)}\n{tail(log)}")
    config = trees.build / ".config"
    mismatches = verify_config(parse_kconfig(fragment.read_text()), parse_kconfig(config.read_text()))
    if mismatches:
        raise ConfigMismatchError(mismatches)
    return config


_COMPILE_RE = re.compile(r"^\s+(CC|AS|LD|AR|HOSTCC)\s")
_CC_COUNT_FILE = ".microvmm-last-compile-count"


def _pump(stream, sink: "queue.Queue[str | None]") -> None:
    for line in iter(stream.readline, ""):
        sink.put(line)
    sink.put(None)


def build_kernel(trees: KernelTrees, log: Path) -> None:
    """make vmlinux bzImage with a one-line progress report every PROGRESS_INTERVAL_S."""
    jobs = os.cpu_count() or 1
    cmd = make_cmd(trees, "vmlinux", "bzImage", jobs=jobs)
    env = dict(os.environ, ARCH="x86_64", **_KBUILD_ENV)
    count_file = trees.build / _CC_COUNT_FILE
    previous_total = int(count_file.read_text()) if count_file.exists() else 0
    compiled = 0
    last_step = ""
    t0 = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=trees.work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        next_report = t0 + PROGRESS_INTERVAL_S
        finished = False
        while not finished:
            try:
                line = lines.get(timeout=max(0.1, next_report - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None:
                finished = True
            elif line:
                out.write(line)
                if _COMPILE_RE.match(line):
                    compiled += 1
                    last_step = line.strip()
            now = time.monotonic()
            if now >= next_report and not finished:
                estimate = f" (~{min(99, 100 * compiled // previous_total)}% of last full build)" \
                    if previous_total > compiled else ""
                logger.info("  kernel build %4.0fs: %d steps%s; last: %s", now - t0, compiled, estimate,
                            last_step or "-")
                next_report = now + PROGRESS_INTERVAL_S
        returncode = proc.wait()
    if returncode != 0:
        raise GuestBuildError(f"kernel build failed (exit {returncode}); full log: {log}\n{tail(log)}")
    if compiled > previous_total:
        count_file.write_text(str(compiled))
    logger.info("  kernel build finished: %d build steps in %.0fs", compiled, time.monotonic() - t0)


def tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = log.read_text(errors="replace").splitlines()
    return "--- last lines of " + str(log) + " ---\n" + "\n".join(text[-lines:])


# --------------------------------------------------------------------------- initramfs


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
    """newc archive: root dirs, /dev/console, busybox + applet symlinks, then guest/initramfs/ files
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


# --------------------------------------------------------------------------- cache entries


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


def build_images(out: Path, guest_dir: Path = GUEST_DIR, *, force: bool = False) -> Path:
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
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for name, info in manifest["files"].items():
        logger.info("  %-18s %10d bytes", name, info["size"])
    logger.info("[%6.1fs] images ready in %s", timer.elapsed(), out)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
