"""--timeout, --boot-timeout and --idle-timeout: which one, if any, has expired."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microvmm.run.monitor import RunMonitor
    from microvmm.vmconfig import VmConfig


def expired_timeout(config: "VmConfig", started: float, monitor: "RunMonitor", now: float) -> str | None:
    """What expired, said for the verdict ("--timeout 5 s expired"), or None.
    `started` and `now` are time.monotonic() values; the monitor says when the
    guest reached init and when it last printed."""
    if config.timeout is not None and now - started > config.timeout:
        return f"--timeout {config.timeout:g} s expired"
    if config.boot_timeout is not None and monitor.boot_time is None and now - started > config.boot_timeout:
        return f"--boot-timeout {config.boot_timeout:g} s expired before the guest reached init"
    if config.idle_timeout is not None and now - monitor.last_output > config.idle_timeout:
        return f"--idle-timeout: no console output for {config.idle_timeout:g} s"
    return None
