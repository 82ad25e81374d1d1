"""Reports on a run's vCPUs while it runs or once it stopped: where they are
(SIGUSR1, a timeout), what a fault looked like, with the kernel's symbols
loaded on first use. Light to import: its helpers load when a report is made."""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from microvmm.diag.symbols import KaslrSymbols, SymbolMap
    from microvmm.vcpu_runner import VcpuStop
    from microvmm.vmconfig import VmConfig


class LiveDiagnostics:
    """`memory()` and `runners()` give the run's guest RAM and vCPU runners
    (none yet early on); `raw_terminal()` says the VMM's terminal is in raw
    mode, where a report needs \\r\\n line ends."""

    def __init__(self, config: "VmConfig", memory: Callable[[], object], runners: Callable[[], Sequence],
                 raw_terminal: Callable[[], bool]):
        self._config = config
        self._memory = memory
        self._runners = runners
        self._raw_terminal = raw_terminal
        self._symbols: SymbolMap | KaslrSymbols | None = None
        self._symbols_loaded = False

    @property
    def symbols(self) -> "SymbolMap | KaslrSymbols | None":
        """The kernel's System.map, parsed on first use: only diagnostics and
        the profiler need it, and parsing costs ~20 ms of start-up."""
        if not self._symbols_loaded:
            from microvmm.diag.guest_symbols import load_running_symbols
            self._symbols_loaded = True
            self._symbols = load_running_symbols(self._config, self._memory, self._runners)
        return self._symbols

    def where(self) -> str:
        """Each vCPU's state, symbolized (it answers between two KVM_RUNs)."""
        from microvmm.diag.report import format_snapshot
        parts = []
        for runner in self._runners():
            snapshot = runner.request_snapshot()
            parts.append(format_snapshot(snapshot, self.symbols) if snapshot
                         else f"vCPU {runner.index}: not responding")
        return "\n".join(parts)

    def describe_stop(self, stop: "VcpuStop") -> list[str]:
        """What a vCPU that stopped abnormally looked like."""
        from microvmm.diag.report import format_last_seen, format_snapshot
        if stop.snapshot:
            return [format_snapshot(stop.snapshot, self.symbols)]
        if stop.vcpu_reset and stop.last_seen:
            return [format_last_seen(stop.last_seen, self.symbols)]
        return []

    def print(self, text: str) -> None:
        """On stderr, in one write."""
        out = text.replace("\n", "\r\n") if self._raw_terminal() else text
        os.write(sys.stderr.fileno(), (out + ("\r\n" if "\r\n" in out else "\n")).encode())

    def print_where_soon(self) -> None:
        """A SIGUSR1: the report from a thread of its own (a signal handler must not wait)."""
        threading.Thread(target=lambda: self.print(self.where()), name="microvmm-dump", daemon=True).start()
