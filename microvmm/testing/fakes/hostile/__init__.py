"""Hostile-guest harness: the real console device, legacy PCI transport and PCI bus
driven by a guest that lies about everything, with every entry point and every
guest-memory access checked.

Used by tests/test_hostile_guest.py (hypothesis, bounded) and fuzz/run_fuzz.py
(long random runs). One generator serves both: it asks a `Chooser` for every
decision, backed by hypothesis draws or by a seeded `random.Random`, so a fuzz
failure replays exactly from its seed.

A case is: random guest RAM (two regions with a gap) -> an optional partial or
full bring-up -> a sequence of hostile operations (register accesses of every
size at every offset, PCI config cycles, MSI-X table/PBA accesses, crafted
descriptor chains and control messages, ring scribbles, backend events,
interleaved I/O-thread work) -> invariants -> reset and proper bring-up by a
well-behaved driver -> data must flow both ways again.

Invariants checked (`CaseResult.failures` lists each violation):
* no exception escapes a device entry point (bus/BAR/MSI-X accesses, queue
  notify, backend callbacks, event-loop callbacks);
* no guest-memory access outside guest RAM succeeds (`AuditedGuestMemory`
  checks every view against the regions independently of GuestMemory);
* after bad input the device is either active or flagged NEEDS_RESET
  (never silently wedged), and host-side queues stay bounded;
* reset + proper bring-up works: data flows both ways, no NEEDS_RESET.

Self-tests of the instruments (they must catch what they claim to catch) are
in tests/test_hostile_guest_harness.py.
"""

from microvmm.testing.fakes.hostile.cases import check_state, collect, run_case
from microvmm.testing.fakes.hostile.guest import HostileGuest
from microvmm.testing.fakes.hostile.instruments import (
    CONTROL_BACKLOG_BOUND, CTRL, DESC, F_EMERG, F_MULTIPORT, F_SIZE, GAP, LOOP_BUDGET, PAGE, RAM_END, REG_QUEUE_NOTIFY,
    REG_QUEUE_PFN, REG_QUEUE_SEL, REG_STATUS, REGIONS, SLOT, AuditedGuestMemory, CaseResult, Chooser, GuardedBus,
    GuestGaveUp, HypothesisChooser, ManualLoop, RandomChooser, RecoveryError, ScriptedBackend, SlotDriver,
)
from microvmm.testing.fakes.hostile.rig import ConsoleGuest, ConsoleRig

__all__ = [
    "AuditedGuestMemory", "CONTROL_BACKLOG_BOUND", "CTRL", "CaseResult", "Chooser", "ConsoleGuest",
    "ConsoleRig", "DESC", "F_EMERG", "F_MULTIPORT", "F_SIZE", "GAP", "GuardedBus", "GuestGaveUp",
    "HostileGuest", "HypothesisChooser", "LOOP_BUDGET", "ManualLoop", "PAGE", "RAM_END", "REGIONS",
    "REG_QUEUE_NOTIFY", "REG_QUEUE_PFN", "REG_QUEUE_SEL", "REG_STATUS", "RandomChooser", "RecoveryError",
    "SLOT", "ScriptedBackend", "SlotDriver", "check_state", "collect", "run_case",
]
