"""Run every benchmark in sequence (`make bench`), each as its own process.

Each prints `name: value unit` lines; this runner passes them through (its own progress lines go to stderr) and exits
non-zero only if a benchmark crashed (timings are never asserted).

Then, on a host whose /dev/kvm is not hardware KVM, the boot figures once more
on a real-semantics KVM (`--realkvm`, figures named realkvm_*; ~10 minutes);
on a hardware-KVM host bench_boot.py's figures already are those.
`--no-realkvm` leaves that part out; `--realkvm` runs only it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Fast ones first; the guest boots (about two minutes here) last.
BENCHMARKS = ("bench_startup.py", "bench_console.py", "bench_soak.py", "bench_boot.py")


def main() -> int:
    if "--realkvm" in sys.argv[1:]:
        return realkvm()
    failed = []
    for name in BENCHMARKS:
        print(f"== {name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(HERE / name)], cwd=HERE.parent)
        print(f"== {name}: exit {code} after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        if code != 0:
            failed.append(name)
    if "--no-realkvm" not in sys.argv[1:]:
        if hardware_kvm_here():
            print("== real-KVM figures: this host's /dev/kvm is hardware KVM, bench_boot.py's figures are "
                  "those", file=sys.stderr, flush=True)
        else:
            print("== real-KVM figures (bench_boot.py in scripts/realkvm's L1)", file=sys.stderr, flush=True)
            started = time.monotonic()
            code = realkvm()
            print(f"== realkvm: exit {code} after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            if code != 0:
                failed.append("bench_boot.py --prefix realkvm_ (scripts/realkvm)")
    if failed:
        print(f"crashed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def hardware_kvm_here() -> bool:
    sys.path.insert(0, str(HERE.parent))
    from microvmm.host.hostinfo import HostKind, detect_host_kind
    return os.path.exists("/dev/kvm") and detect_host_kind()[0] is HostKind.HARDWARE


def realkvm() -> int:
    """`run_all.py --realkvm`: the boot figures on a real-semantics KVM, in the
    L1 Linux with kvm_amd that scripts/realkvm runs (slow: ~10 minutes), named
    realkvm_*. On a hardware-KVM host scripts/realkvm runs it right here."""
    lane = HERE.parent / "scripts" / "realkvm"
    if not lane.exists():
        print(f"run_all: {lane} is missing: no real-KVM lane in this checkout", file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, str(lane), "--", sys.executable, str(HERE / "bench_boot.py"),
                            "--skip-bzimage", "--prefix", "realkvm_"], cwd=HERE.parent)


if __name__ == "__main__":
    sys.exit(main())
