"""Startup latency: from process start to vCPU 0's first KVM_RUN of `microvmm run`.

The parent takes time.time() just before it spawns the child; the child prints
time.time() right before its first KVM_RUN (the VMM's MICROVMM_EXIT_AT_FIRST_RUN=1
hook, which then ends the run). Both clocks are the same host wall clock, so the
difference covers exec, interpreter start, imports, argument parsing, reading the
images, building the VM and starting the vCPU thread. The Python baseline is
measured the same way (the child's first statement prints time.time()).

With a warm bytecode cache (kept in a temporary PYTHONPYCACHEPREFIX, as an
installed package has its .pyc files) unless the name says _no_pyc: then every
module is compiled from source on each start, as on machines that set
PYTHONDONTWRITEBYTECODE=1.

Figures (medians over --runs spawns, same run):
  python_startup_baseline: ms        import_microvmm_cli: ms   import_microvmm_vmm: ms
  start_to_first_kvm_run: ms (target <= 60)   start_to_first_kvm_run_min: ms
  start_to_first_kvm_run_bzimage_pty: ms      (the headline `--kernel bzImage --console @pty:p0`)
  start_to_first_kvm_run_no_pyc: ms           import_microvmm_vmm_no_pyc: ms
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from common import REPO, median, report

HOOK_ENV = "MICROVMM_EXIT_AT_FIRST_RUN"  # microvmm.run.first_run_hook.EXIT_AT_FIRST_RUN_ENV
FIRST_RUN = re.compile(r"first KVM_RUN at ([0-9.]+)")
IMAGES = os.environ.get("MICROVMM_IMAGES", str(REPO / "images"))
DEFAULT_RUN = ["--kernel", f"{IMAGES}/vmlinux", "--initrd", f"{IMAGES}/initramfs.cpio"]
# The modules `microvmm run` needs before its first KVM_RUN (Vmm._build's imports).
VMM_IMPORTS = ("microvmm.vmm, microvmm.kvm, microvmm.boot, microvmm.devices.serial, microvmm.devices.i8042, "
               "microvmm.devices.rtc, microvmm.eventloop, microvmm.pci.bus, microvmm.virtio.pci_legacy, "
               "microvmm.virtio_console, microvmm.interrupts")


#: Where the children keep their bytecode cache (set by main): an installed
#: microvmm has its .pyc files, but a checkout run with PYTHONDONTWRITEBYTECODE=1
#: (as on this project's machines) compiles every module on every start.
_PYCACHE: str | None = None


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if _PYCACHE is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = _PYCACHE  # outside the source tree
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def spawn_until_timestamp(argv: list[str], pattern: re.Pattern[str], env: dict[str, str]) -> float:
    """Seconds from just before spawning argv to the timestamp the child prints."""
    started = time.time()
    proc = subprocess.run(argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)
    match = pattern.search(proc.stdout)
    if not match:
        raise RuntimeError(f"{argv[:4]}... printed no timestamp (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    return float(match.group(1)) - started


def python_baseline() -> float:
    code = "import time; print('t', time.time())"
    return spawn_until_timestamp([sys.executable, "-c", code], re.compile(r"t ([0-9.]+)"), _env())


def import_time(modules: str) -> float:
    """Seconds a fresh interpreter spends importing `modules` (in-process clock)."""
    code = f"import time; t = time.perf_counter(); import {modules}; print('d', time.perf_counter() - t)"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True)
    return float(re.search(r"d ([0-9.e-]+)", proc.stdout).group(1))


def first_kvm_run(extra_args: list[str]) -> float:
    argv = [sys.executable, "-m", "microvmm", "run", "--serial", "off", *extra_args]
    return spawn_until_timestamp(argv, FIRST_RUN, _env(**{HOOK_ENV: "1"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    global _PYCACHE
    with tempfile.TemporaryDirectory(prefix="microvmm-bench-pycache-") as pycache:
        _PYCACHE = pycache
        python_baseline(), import_time(VMM_IMPORTS), import_time("microvmm.cli")  # fill the cache
        status = measure(args.runs)
        _PYCACHE = None
        if status == 0 and os.access("/dev/kvm", os.R_OK | os.W_OK):
            cold = [first_kvm_run(DEFAULT_RUN) for _ in range(args.runs)]
            report("start_to_first_kvm_run_no_pyc", median(cold) * 1000, "ms")
            report("import_microvmm_vmm_no_pyc",
                   median([import_time(VMM_IMPORTS) for _ in range(args.runs)]) * 1000, "ms")
    return status


def measure(runs: int) -> int:
    baseline = [python_baseline() for _ in range(runs)]
    report("python_startup_baseline", median(baseline) * 1000, "ms")
    report("import_microvmm_cli", median([import_time("microvmm.cli") for _ in range(runs)]) * 1000, "ms")
    report("import_microvmm_vmm", median([import_time(VMM_IMPORTS) for _ in range(runs)]) * 1000, "ms")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_startup: no usable /dev/kvm: start_to_first_kvm_run skipped", file=sys.stderr)
        return 0
    default = [first_kvm_run(DEFAULT_RUN) for _ in range(runs)]
    report("start_to_first_kvm_run", median(default) * 1000, "ms")
    report("start_to_first_kvm_run_min", min(default) * 1000, "ms")
    report("start_to_first_kvm_run_ratio_vs_python", median(default) / median(baseline), "ratio")
    headline = [first_kvm_run(["--kernel", f"{IMAGES}/bzImage", "--initrd", f"{IMAGES}/initramfs.cpio",
                               "--console", "@pty:p0"]) for _ in range(runs)]
    report("start_to_first_kvm_run_bzimage_pty", median(headline) * 1000, "ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
