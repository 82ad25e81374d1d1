"""One hostile-guest case: bring-up, hostile operations, invariants, recovery."""

from __future__ import annotations

import traceback
from typing import Any

from microvmm.testing.fakes.hostile.guest import HostileGuest
from microvmm.testing.fakes.hostile.instruments import CONTROL_BACKLOG_BOUND, CaseResult, Chooser
from microvmm.testing.fakes.hostile.rig import ConsoleRig
from microvmm.testing.fakes.virtio_driver import STATUS_NEEDS_RESET
from microvmm.virtio_console.port import CONSOLE_BUFFER_LIMIT


# ---------------------------------------------------------------------------
# Invariants and the whole case


def check_state(rig: ConsoleRig, result: CaseResult) -> None:
    """After hostile input: the device is active or flagged NEEDS_RESET; host state bounded."""
    transport, device = rig.transport, rig.device
    status = transport.status
    # (A driver may write the bit itself; only the device's failure must show.)
    if transport.failed and not status & STATUS_NEEDS_RESET:
        result.failures.append(f"device failed but status {status:#x} lacks NEEDS_RESET")
    if transport.failed:
        result.needs_reset_seen = True
    if transport.activated and not transport.failed and not device._active:
        result.failures.append("device stopped without NEEDS_RESET (wedged)")
    if not transport.activated and device._active:
        result.failures.append("device active while the transport is not")
    if len(device._control_out) > CONTROL_BACKLOG_BOUND:
        result.failures.append(f"{len(device._control_out)} control messages queued host-side (unbounded)")
    for port in device.ports:
        if len(port.held) > CONSOLE_BUFFER_LIMIT:
            result.failures.append(f"port {port.index} holds {len(port.held)} bytes")


def collect(rig: ConsoleRig, result: CaseResult) -> None:
    result.failures.extend(rig.escapes)
    result.failures.extend(rig.loop_errors())
    result.failures.extend(rig.memory.violations)
    rig.escapes.clear()
    if rig.manual:
        rig.loop.errors.clear()
    rig.memory.violations.clear()


def run_case(chooser: Chooser, max_ops: int = 24, loop: Any | None = None,
             trace: list[str] | None = None) -> CaseResult:
    """One hostile-guest case; never raises for device misbehaviour, reports it."""
    result = CaseResult(trace=trace if trace is not None else [])
    rig = ConsoleRig(chooser, loop=loop, trace=result.trace)
    try:
        hostile = HostileGuest(rig)
        try:
            hostile.setup()
        except Exception as exc:
            result.failures.append(f"initial bring-up failed: {exc!r}\n" + traceback.format_exc())
            return result
        count = chooser.int(0, max_ops)
        hostile.run(count)
        result.ops = count
        rig.settle()
        collect(rig, result)
        check_state(rig, result)
        result.refused_accesses = rig.memory.refused
        try:
            rig.recover_and_check(result)
        except Exception as exc:  # whatever stops a proper driver is a failure
            result.failures.append(f"no recovery after reset: {exc!r}\n" + traceback.format_exc())
        rig.settle()
        collect(rig, result)
        check_state(rig, result)
        if rig.transport.failed:
            result.failures.append("NEEDS_RESET after the recovery exchange")
    finally:
        rig.entry("close", rig.device.close)
        if rig.manual:
            rig.loop.run()
    return result
