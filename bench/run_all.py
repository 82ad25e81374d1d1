"""Run every benchmark in sequence (`make bench`), each as its own process.

Each prints `name: value unit` lines; this runner passes them through (its own progress lines go to stderr) and exits
non-zero only if a benchmark crashed (timings are never asserted).
"""

from __future__ import annotations

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
    if failed:
        print(f"crashed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


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
