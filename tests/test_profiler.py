import threading

from microvmm.diag.symbols import SymbolMap
from microvmm.diag.profiler import USER_SPACE, GuestProfiler

SYMBOLS = SymbolMap([(0xFFFFFFFF81000000, "start_kernel"), (0xFFFFFFFF81001000, "default_idle"),
                     (0xFFFFFFFF81002000, "memcpy")])


class FakeRunner:
    """Answers request_rip from a script of RIPs, like a vCPU thread would."""

    def __init__(self, index, rips):
        self.index = index
        self._rips = list(rips)
        self.done = threading.Event()

    def request_rip(self, timeout):
        if not self._rips:
            self.done.set()
            return None
        rip = self._rips.pop(0)
        return rip, rip < 0x8000_0000_0000_0000


def test_samples_are_symbolized_and_grouped_by_phase():
    phase = ["[ 0.1] early"]
    rips = [0xFFFFFFFF81000010] * 3 + [0xFFFFFFFF81001004] * 6 + [0x401000]
    runner = FakeRunner(0, rips)
    profiler = GuestProfiler([runner], lambda: phase[0], SYMBOLS, rate_hz=2000)
    original = runner.request_rip

    def switching(timeout):
        if len(runner._rips) == 7:  # after the three start_kernel samples
            phase[0] = "[ 1.0] Run /init as init process"
        return original(timeout)
    runner.request_rip = switching
    profiler.start()
    assert runner.done.wait(5)
    profiler.stop()
    assert profiler.top_functions()[:3] == [("default_idle", 6), ("start_kernel", 3), (USER_SPACE, 1)]
    phases = profiler.phases()
    assert [(name, len(samples)) for name, _, samples in phases] == [
        ("[ 0.1] early", 3), ("[ 1.0] Run /init as init process", 7)]
    report = profiler.report()
    assert "10 samples" in report and "default_idle" in report and "Run /init" in report
    folded = profiler.folded().splitlines()
    assert "[_1.0]_Run_/init_as_init_process;default_idle 6" in folded
    assert "[_0.1]_early;start_kernel 3" in folded


def test_without_symbols_raw_addresses_are_reported():
    runner = FakeRunner(0, [0xFFFFFFFF81000010])
    profiler = GuestProfiler([runner], lambda: "", None, rate_hz=1000)
    profiler.start()
    assert runner.done.wait(5)
    profiler.stop()
    assert profiler.top_functions() == [("0xffffffff81000010", 1)]
