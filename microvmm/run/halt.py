"""After the kernel's "reboot: System halted" / "reboot: Power down" line:
are all vCPUs halted for good? A kernel without a power-off method (no ACPI:
the default guest) halts every CPU with interrupts off and never exits to the
VMM (the in-kernel irqchip handles HLT), so the VMM asks the vCPUs. The same
words typed in a shell leave the vCPUs running: nothing happens then."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from microvmm.vcpu_runner import StopReason

logger = logging.getLogger(__name__)

#: After the line, how long the vCPUs get to reach their final HLT, and how
#: often they are looked at. Generous: the kernel halts right after printing
#: the line, but a loaded host may hold the vCPU thread back; a running guest
#: only pays a kick per poll.
HALT_CONFIRM_SECONDS = 10.0
HALT_POLL_SECONDS = 0.05


class HaltConfirmation:
    """Looks at the vCPUs off the console thread and calls `ended` once they
    all stopped for good. `runners()` gives the vCPU runners, `stopped` is set
    once the run is stopping, `stop_requested()` says a stop was asked for."""

    def __init__(self, runners: Callable[[], Sequence], stopped: threading.Event,
                 stop_requested: Callable[[], bool], ended: Callable[[StopReason, str], None]):
        self._runners = runners
        self._stopped = stopped
        self._stop_requested = stop_requested
        self._ended = ended
        self._lock = threading.Lock()
        #: The thread looking, once a line was seen (tests join it).
        self.thread: threading.Thread | None = None

    def kernel_stopping(self, what: str) -> None:
        """The console showed `reboot: <what>` in the kernel's form."""
        with self._lock:
            if self._stop_requested() or (self.thread is not None and self.thread.is_alive()):
                return
            self.thread = threading.Thread(target=self._confirm, args=(what,),
                                           name="microvmm-halt-check", daemon=True)
            self.thread.start()

    def _confirm(self, what: str) -> None:
        deadline = time.monotonic() + HALT_CONFIRM_SECONDS
        halted_in_a_row = 0
        while not self._stopped.is_set() and time.monotonic() < deadline:
            if all(runner.request_stopped_for_good() for runner in self._runners()):
                halted_in_a_row += 1
                if halted_in_a_row == 2:  # still so a moment later: stopped for good
                    reason = StopReason.POWER_OFF if what == "Power down" else StopReason.HALTED
                    self._ended(reason, f"kernel: 'reboot: {what}', every vCPU halted with interrupts off")
                    return
            else:
                halted_in_a_row = 0
            time.sleep(HALT_POLL_SECONDS)
        if not self._stopped.is_set():
            logger.info("the console showed 'reboot: %s' but the vCPUs kept running "
                        "(typed text, or a kernel without a power-off method): the VM goes on", what)
