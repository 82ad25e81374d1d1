"""How a run ended, and its verdict: exit status, one-line summary, report.

The VMM collects what happened (RunEnd) and `classify` decides; the order of
the checks is the verdict's priority (a signal over a kernel failure over a
timeout over a vCPU fault over the guest's own result)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Callable

from microvmm.run.exitcodes import ExitCode, signal_exit_code
from microvmm.run.monitor import Failure
from microvmm.vcpu_runner import StopReason, VcpuStop


@dataclass
class VmOutcome:
    """How a run ended: exit status, one-line summary, optional report."""

    exit_code: int
    summary: str
    report: str = ""
    stats: dict = field(default_factory=dict)
    #: The VMM could not set the VM up (infrastructure, not the guest's doing).
    setup_error: bool = False


@dataclass
class RunEnd:
    """What the VMM saw of a run, for its verdict."""

    stop: VcpuStop | None
    elapsed: float
    last_lines: list[str]
    signal: int | None = None
    failure: Failure | None = None
    #: "--timeout 5 s expired" and the like, with where the vCPUs were then.
    timeout: str | None = None
    timeout_report: str = ""
    #: A reset before the kernel's log port came up, with no restart line seen:
    #: an early kernel failure (panic=-1 resets), the message says how to see it.
    early_reset_hint: str | None = None
    expect: str | None = None
    expect_seen: bool = False
    expect_time: float | None = None
    expect_line: str | None = None
    command: bool = False
    command_status: int | None = None
    #: The guest never drove a console device it needed (why a result may be missing).
    no_driver_hint: str = ""
    #: Formats a vCPU fault's details (diag/report.py with the kernel's symbols).
    describe_stop: Callable[[VcpuStop], list[str]] | None = None


def classify(end: RunEnd) -> VmOutcome:
    stop = end.stop or VcpuStop(StopReason.SHUTDOWN, "stopped", fatal=False)
    elapsed = end.elapsed
    tail = "\n".join("  | " + line for line in end.last_lines)
    lines_report = f"last console lines:\n{tail}"
    if end.signal is not None:
        return VmOutcome(signal_exit_code(end.signal),
                         f"stopped by {signal.Signals(end.signal).name} after {elapsed:.1f} s")
    if end.failure is not None:
        failure = end.failure
        return VmOutcome(ExitCode.GUEST_PANIC,
                         f"guest kernel {failure.level.name.lower()} at {failure.at:.1f} s: {failure.line}",
                         report=lines_report)
    if end.timeout:
        return VmOutcome(ExitCode.TIMEOUT, f"timeout: {end.timeout}",
                         report=f"{lines_report}\nwhere the vCPUs were:\n{end.timeout_report}")
    if stop.fatal:
        report = [f"vCPU stopped: {stop.reason.value}" + (f": {stop.detail}" if stop.detail else "")]
        if end.describe_stop is not None:
            report += end.describe_stop(stop)
        report.append(lines_report)
        code = ExitCode.VMM_ERROR if stop.reason is StopReason.HOST_ERROR else ExitCode.GUEST_FAULT
        return VmOutcome(code, f"guest stopped abnormally: {stop.reason.value}", report="\n".join(report))
    if stop.reason is StopReason.RESET and end.early_reset_hint and not end.expect_seen:
        # panic=-1 turns an early panic into this reset; a guest whose log
        # port never came up, and whose log in RAM showed no report
        # either (or could not be read), failed all the same.
        return VmOutcome(ExitCode.GUEST_PANIC, f"guest kernel reset after {elapsed:.1f} s, {end.early_reset_hint}",
                         report=lines_report)
    if end.expect is not None:
        if end.expect_seen:
            return VmOutcome(ExitCode.OK, f"expected output seen after {end.expect_time:.1f} s: {end.expect_line}")
        return VmOutcome(ExitCode.NO_RESULT, f"guest stopped without printing {end.expect!r}{end.no_driver_hint}",
                         report=lines_report)
    if end.command:
        if end.command_status is None:
            return VmOutcome(ExitCode.NO_RESULT,
                             f"guest stopped after {elapsed:.1f} s without reporting the command's status"
                             f"{end.no_driver_hint}", report=lines_report)
        return VmOutcome(end.command_status,
                         f"command exited with status {end.command_status} after {elapsed:.1f} s")
    how = f" ({stop.detail})" if stop.reason in (StopReason.POWER_OFF, StopReason.HALTED) else ""
    return VmOutcome(ExitCode.OK, f"guest stopped: {stop.reason.value}{how} after {elapsed:.1f} s")


def no_driver_hint(transport) -> str:
    """Why a run with console ports may have had no result: the guest never
    started the virtio-console device (no driver: a kernel whose virtio is
    modular, booted without --modules). `transport`: the console's, or None."""
    if transport is None or transport.driver_seen:
        return ""
    return ("; the guest kernel never started the virtio-console device (no virtio_pci/virtio_console "
            "driver: a distribution kernel has them as modules, give them with --modules DIR)")
