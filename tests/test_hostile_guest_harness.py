"""Self-tests of the hostile-guest harness's instruments (the harness is
microvmm/testing/fakes/hostile/): they must catch what they claim to catch."""

from __future__ import annotations

import pytest

from microvmm.memory import GuestMemory, GuestMemoryError
from microvmm.testing.fakes.hostile import (GAP, REGIONS, AuditedGuestMemory, ConsoleRig, ManualLoop, RandomChooser,
                                            run_case)
from microvmm.virtio_console.device import VirtioConsole


# ---------------------------------------------------------------------------
# Self-tests of the instruments: they must catch what they claim to catch


def test_audited_memory_flags_an_escaping_view(monkeypatch):
    memory = AuditedGuestMemory(REGIONS)
    with pytest.raises(GuestMemoryError):
        memory.view(GAP[0] - 8, 16)  # straddles the gap
    assert memory.refused == 1 and not memory.violations
    # A GuestMemory that forgot its bounds check must be caught.
    monkeypatch.setattr(GuestMemory, "_locate", lambda self, gpa, length: (0, gpa))
    memory.view(GAP[0] - 8, 16)
    assert memory.violations and "outside guest RAM succeeded" in memory.violations[0]


def test_manual_loop_records_callback_exceptions():
    loop = ManualLoop()
    loop.call_soon_threadsafe(lambda: 1 / 0)
    loop.call_soon_threadsafe(lambda: loop.call_soon_threadsafe(lambda: None))
    assert loop.run()
    assert len(loop.errors) == 1 and "ZeroDivisionError" in loop.errors[0]


def test_harness_detects_a_device_that_raises(monkeypatch):
    """If an entry point lets an exception out, the case fails."""
    monkeypatch.setattr(VirtioConsole, "read_config", lambda self, offset, size: 1 / 0)
    rig = ConsoleRig(RandomChooser(1))
    rig.gbus.io_read(rig.bar0 + 20, 1)  # device config read, bus decoding on by firmware
    rig.restore_pci()
    rig.gbus.io_read(rig.bar0 + 20, 1)
    assert any("ZeroDivisionError" in e for e in rig.escapes)


def test_harness_detects_a_device_that_stops_working(monkeypatch):
    """A device whose output path is broken must fail the recovery check."""
    # Both ways out: single writes and the batched (vectored) transmit path.
    monkeypatch.setattr(VirtioConsole, "_write_out", lambda self, port, data: 0)
    monkeypatch.setattr(VirtioConsole, "_write_out_vectored", lambda self, port, views: 0)
    result = run_case(RandomChooser(7), max_ops=0)
    assert any("never reached the backend" in f for f in result.failures), result.failures


def test_clean_case_passes():
    for seed in range(5):
        result = run_case(RandomChooser(seed), max_ops=0)
        assert result.ok, (seed, result.failures)
