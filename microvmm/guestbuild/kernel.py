"""The guest kernel: unpack the Debian source once, apply the guest's patches
in a hard-link work tree, configure (tinyconfig + fragment, verified) and
build with a progress line every PROGRESS_INTERVAL_S."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence

from microvmm.guestbuild.errors import GuestBuildError
from microvmm.guestbuild.kconfig import ConfigMismatchError, parse_kconfig, verify_config
from microvmm.guestbuild.packages import _run

logger = logging.getLogger("microvmm.guestbuild")

PROGRESS_INTERVAL_S = 10.0
LOG_TAIL_LINES = 60

# Reproducible kernel identity strings (uname -v), independent of who builds when.
_KBUILD_ENV = {
    "KBUILD_BUILD_USER": "microvmm",
    "KBUILD_BUILD_HOST": "microvmm",
    "KBUILD_BUILD_TIMESTAMP": "2000-01-01",
    "KBUILD_BUILD_VERSION": "1",
}


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
