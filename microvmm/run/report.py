"""A run's end on the terminal and in files: the report and one-line summary
on stderr, --stats, --json / --junit."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from microvmm.run.outcome import VmOutcome
    from microvmm.run.results_files import FinishedRun
    from microvmm.vmconfig import VmConfig


def report_run(config: "VmConfig", run: "FinishedRun | None", outcome: "VmOutcome", duration: float,
               version: str | None, *, unfinished_line: bool, statistics: Callable[[], str] | None,
               ktap=None) -> None:
    """`unfinished_line`: the guest's last line on the terminal has no end (a
    prompt); `statistics`: --stats's text, None when no devices were built;
    `ktap`: --ktap's report (run/ktap.py), None without."""
    if unfinished_line:
        print(file=sys.stderr)  # don't glue the summary to an unfinished guest line
    if outcome.report:
        print(outcome.report, file=sys.stderr)
    if config.stats and statistics is not None:
        print(statistics(), file=sys.stderr)
    print(f"microvmm: {outcome.summary}", file=sys.stderr)
    if config.json or config.junit:
        from microvmm.run.results_files import write_results
        write_results(config, run, outcome, duration, version, ktap)
