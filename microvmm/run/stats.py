"""Where the VMM's work came from: exit counts and bus accesses (--stats), and
the --profile files."""

from __future__ import annotations

import logging
import sys
from typing import Iterable

logger = logging.getLogger(__name__)


def exit_statistics(runners: Iterable, buses: Iterable) -> str:
    """Exits by reason and port/MMIO accesses by device."""
    exits: dict[str, int] = {}
    for runner in runners:
        for name, count in runner.exit_counts.items():
            exits[name] = exits.get(name, 0) + count
    lines = ["vCPU exits by reason: " + ", ".join(
        f"{name} {count}" for name, count in sorted(exits.items(), key=lambda kv: -kv[1]))]
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
