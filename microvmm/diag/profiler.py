"""Where does a guest spend its time? Sample every vCPU's RIP at a fixed rate,
symbolize against System.map, and report top functions overall and per boot
phase (the console line most recently printed when the sample was taken).

Sampling asks each vCPU thread for its RIP between two KVM_RUNs (a signal
kicks it out); the cost is one KVM_GET_REGS per vCPU per sample.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from microvmm.diag.symbols import KaslrSymbols, SymbolMap

logger = logging.getLogger(__name__)

USER_SPACE = "[user]"
UNKNOWN = "[unknown]"


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since profiling started
    vcpu: int
    rip: int
    user: bool
    phase: str


class GuestProfiler:
    """Samples vCPUs on its own thread from start() to stop()."""

    def __init__(self, runners, phase: Callable[[], str], symbols: SymbolMap | KaslrSymbols | None,
                 rate_hz: float = 100.0, clock: Callable[[], float] = time.monotonic):
        self._runners = runners
        self._phase = phase
        self._symbols = symbols
        self._interval = 1.0 / rate_hz
        self.rate_hz = rate_hz
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="microvmm-profiler", daemon=True)
        self.samples: list[Sample] = []
        self.started = 0.0
        self.duration = 0.0

    def start(self) -> None:
        self.started = self._clock()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.duration = self._clock() - self.started

    def _run(self) -> None:
        next_at = self._clock()
        while not self._stop.is_set():
            for runner in self._runners:
                sample = runner.request_rip(timeout=0.5)
                if sample is not None:
                    rip, user = sample
                    self.samples.append(Sample(self._clock() - self.started, runner.index, rip, user,
                                               self._phase()))
            next_at += self._interval
            delay = next_at - self._clock()
            if delay < 0:  # fell behind (slow vCPU exits): don't burst to catch up
                next_at = self._clock()
                delay = 0
            self._stop.wait(delay)

    # -- reports ------------------------------------------------------------

    def function_of(self, sample: Sample) -> str:
        if sample.user:
            return USER_SPACE
        if self._symbols is None:
            return f"{sample.rip:#x}"
        symbol = self._symbols.lookup(sample.rip)
        return symbol.name if symbol else UNKNOWN

    def top_functions(self, samples: list[Sample] | None = None) -> list[tuple[str, int]]:
        counts = collections.Counter(self.function_of(s) for s in (self.samples if samples is None else samples))
        return counts.most_common()

    def phases(self) -> list[tuple[str, float, list[Sample]]]:
        """Consecutive runs of samples under the same console line, in time order."""
        runs: list[tuple[str, float, list[Sample]]] = []
        for sample in self.samples:
            if runs and runs[-1][0] == sample.phase:
                runs[-1][2].append(sample)
            else:
                runs.append((sample.phase, sample.at, [sample]))
        return runs

    def report(self, top: int = 25, min_phase_share: float = 0.02) -> str:
        total = len(self.samples)
        lines = [f"microvmm guest profile: {total} samples over {self.duration:.1f} s "
                 f"at {self.rate_hz:g} Hz, {len(self._runners)} vCPU(s)"]
        if not total:
            return "\n".join(lines + ["(no samples)"])
        lines += ["", "top functions:", f"{'samples':>8} {'share':>6}  function"]
        for name, count in self.top_functions()[:top]:
            lines.append(f"{count:8d} {100 * count / total:5.1f}%  {name}")
        lines += ["", "phases (the console line printed last, in time order; "
                      f"phases under {100 * min_phase_share:g}% of samples folded into the next):",
                  f"{'start s':>8} {'samples':>8} {'share':>6}  phase -> top functions"]
        for phase, start, samples in self.phases():
            if len(samples) < min_phase_share * total:
                continue
            hot = ", ".join(f"{name} {100 * n / len(samples):.0f}%"
                            for name, n in self.top_functions(samples)[:3])
            label = phase if len(phase) <= 70 else phase[:67] + "..."
            lines.append(f"{start:8.1f} {len(samples):8d} {100 * len(samples) / total:5.1f}%  "
                         f"{label or '(before any output)'}\n{'':26}-> {hot}")
        return "\n".join(lines)

    def folded(self) -> str:
        """Brendan Gregg's folded format (flamegraph.pl, speedscope): phase;function count."""
        counts = collections.Counter(
            f"{_folded_safe(s.phase) or 'boot'};{self.function_of(s)}" for s in self.samples)
        return "\n".join(f"{stack} {count}" for stack, count in sorted(counts.items())) + "\n"


def _folded_safe(text: str) -> str:
    return text.replace(";", ",").replace(" ", "_")[:80]
