"""Where the VMM's work came from: exit counts and bus accesses (--stats), and
the --profile files."""

from __future__ import annotations

import logging
import sys
from typing import Iterable

logger = logging.getLogger(__name__)


def exit_statistics(runners: Iterable, buses: Iterable,
                    first_run: tuple[float, float] | None = None) -> str:
    """Exits by reason and port/MMIO accesses by device; `first_run`: vCPU 0's
    first KVM_RUN (CLOCK_MONOTONIC, seconds after the VMM started)."""
    runners = list(runners)
    exits: dict[str, int] = {}
    for runner in runners:
        for name, count in runner.exit_counts.items():
            exits[name] = exits.get(name, 0) + count
    lines = ["vCPU exits by reason: " + ", ".join(
        f"{name} {count}" for name, count in sorted(exits.items(), key=lambda kv: -kv[1]))]
    if first_run is not None:
        # CLOCK_MONOTONIC is system-wide: a benchmark times the guest's boot
        # from here, not from the VMM's (Python's) start-up.
        lines.append(f"first KVM_RUN at CLOCK_MONOTONIC {first_run[0]:.6f} s, "
                     f"{first_run[1]:.3f} s after the VMM started")
    waits = ", ".join(f"vCPU {r.index} {r.gate_wait_s:.3f} s ({r.gate_exit})" for r in runners if r.gate_exit)
    if waits:
        lines.append(f"waited at the device gate (the devices still being built): {waits}")
    for bus in buses:
        stats = bus.stats()
        per_device = sorted(stats.devices.items(), key=lambda kv: -(kv[1].reads + kv[1].writes))
        lines.append(f"{bus.name} accesses by device: " + ", ".join(
            f"{name} {c.reads}r/{c.writes}w" for name, c in per_device if c.reads or c.writes))
        if stats.unclaimed:
            top = sorted(stats.unclaimed.items(), key=lambda kv: -(kv[1].reads + kv[1].writes))[:8]
            lines.append(f"{bus.name} unclaimed: " + ", ".join(
                f"{addr:#x} {c.reads}r/{c.writes}w" for addr, c in top))
    return "\n".join(lines)


def write_profile(path, profiler, statistics: str) -> None:
    """The profiler's report (with the exit statistics) and its flame-graph input."""
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(profiler.report() + "\n\n" + statistics + "\n")
        with open(f"{path}.folded", "w", encoding="utf-8") as handle:
            handle.write(profiler.folded())
    except OSError as err:
        logger.error("--profile %s: %s", path, err.strerror)
        return
    print(f"microvmm: profile written to {path} (flame-graph input: {path}.folded)", file=sys.stderr)
