"""Shared by the benchmarks: one figure per line, `name: value unit`."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python3 bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))


def report(name: str, value: float | str, unit: str) -> None:
    """Print one figure; a string value is printed as is (e.g. 'timeout>240')."""
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
    else:
        text = str(value)
    print(f"{name}: {text} {unit}", flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)
