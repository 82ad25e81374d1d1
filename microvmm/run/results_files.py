"""--json / --junit: a run's result written at its end (microvmm/run/results.py
has the formats)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from microvmm.run.outcome import VmOutcome
    from microvmm.run.monitor import RunMonitor
    from microvmm.vmconfig import VmConfig


class FinishedRun(Protocol):
    """What the results take from the VMM that ran (None: it never got that far)."""

    monitor: "RunMonitor"
    #: Seconds since the monitor started when the first stop was asked for.
    stopped_at: float | None
    #: The kernel command line the guest got (None before it was made).
    cmdline: str | None


def write_results(config: "VmConfig", run: FinishedRun | None, outcome: "VmOutcome", duration: float,
                  version: str | None = None, ktap=None) -> None:
    """`ktap`: --ktap's report (run/ktap.py): one result per test, and the
    command's own exit status beside the verdict's."""
    from dataclasses import asdict

    from microvmm.run.results import RunResult, is_infrastructure_error, write_json, write_junit

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds, 3)

    monitor = run.monitor if run else None
    command_ok = config.command is None or outcome.exit_code == 0
    boot_s = monitor.boot_time if monitor else None
    command_s = None
    if config.command is not None and boot_s is not None:
        end = run.stopped_at if run.stopped_at is not None else monitor.elapsed()
        command_s = max(0.0, end - boot_s)
    result = RunResult(
        kernel=str(config.kernel), cmdline=(run.cmdline if run and run.cmdline else config.cmdline),
        verdict="pass" if outcome.exit_code == 0 and command_ok else "fail",
        reason=outcome.summary, exit_code=int(outcome.exit_code), duration_s=ms(duration),
        boot_s=ms(boot_s),
        expect_s=ms(monitor.expect_time) if monitor else None,
        command_s=ms(command_s),
        command=config.command,
        command_status=int(outcome.exit_code if ktap is None else ktap.command_exit)
        if config.command is not None and outcome.exit_code < 123 else None,
        # Absolute: CI collects it from elsewhere. None when a failed setup took it away again.
        log=os.path.abspath(config.log) if config.log and os.path.exists(config.log) else None,
        failures=[{**asdict(f), "level": f.level.name.lower(), "at": ms(f.at)} for f in monitor.failures]
        if monitor else [],
        last_lines=monitor.last_lines(40) if monitor else [],
        infrastructure_error=outcome.setup_error or is_infrastructure_error(int(outcome.exit_code)),
        microvmm_version=version or "unknown",
        tests=[case.as_json() for case in ktap.cases] if ktap is not None else None,
    )
    try:
        if config.json:
            write_json(result, str(config.json))
        if config.junit:
            write_junit(result, str(config.junit))
    except OSError as err:
        print(f"microvmm: error: cannot write results: {err}", file=sys.stderr)
