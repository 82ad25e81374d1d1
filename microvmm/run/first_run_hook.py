"""The start-up benchmark's hook (bench/bench_startup.py): with
MICROVMM_EXIT_AT_FIRST_RUN=1 the run prints the wall-clock time (time.time())
just before vCPU 0's first KVM_RUN, issues that KVM_RUN with immediate_exit
set, and ends there. The parent measures against its own time.time() taken
before it spawned the VMM."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

EXIT_AT_FIRST_RUN_ENV = "MICROVMM_EXIT_AT_FIRST_RUN"


def exit_at_first_run_wanted() -> bool:
    return os.environ.get(EXIT_AT_FIRST_RUN_ENV) == "1"


def exit_at_first_run(vcpu, stop: Callable[[str], None]) -> None:
    """Wrap `vcpu.run` once: say the time, ask for the stop (`stop(why)`), run."""
    run = vcpu.run

    def first_run() -> int:
        now = time.time()
        vcpu.run = run
        print(f"microvmm: first KVM_RUN at {now:.6f}", file=sys.stderr, flush=True)
        stop(f"{EXIT_AT_FIRST_RUN_ENV}=1")
        return run()
    vcpu.run = first_run
