"""Every way a user stops the default guest ends microvmm with 0, at once.

The default guest has no ACPI: `poweroff -f`, `halt -f` and the `poweroff`
applet end in Linux's final halt ("reboot: System halted", every CPU in HLT
with interrupts off), sysrq o in "reboot: Power down" and then the same halt
(microvmm/guestbuild/guest/patches/0002-*); microvmm recognises that state. `reboot -f` is an
i8042 reset (reboot=k). Each test boots its own guest (the stop ends it).
"""

from __future__ import annotations

import time

import pytest

from microvmm.host.hostinfo import EMULATING_HOST_HIDDEN_FEATURES, HostKind, detect_host_kind
from tests.e2e_support import GUEST_TEST_TIMEOUT, boot

# A guest boot and its commands; nothing may hang the run.
pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

# No wall-clock bound here (a loaded emulating host took 6.5 s for `poweroff`,
# mostly busybox's fork and exec): what ends the run "at once" is the VMM's
# halt detection, which the summary names; a VMM that only stopped at a
# timeout or a kill says otherwise, and guest.wait's bound catches a hang.


def _stop_and_time(guest, command: str) -> float:
    sent = time.monotonic()
    guest.send(command + "\n")
    status = guest.wait(120)
    elapsed = time.monotonic() - sent
    assert status == 0, guest.stderr.text[-3000:]
    return elapsed


@pytest.mark.parametrize("command, summary", [
    ("poweroff -f", "the guest halted"),
    ("halt -f", "the guest halted"),
    ("echo o > /proc/sysrq-trigger", "the guest powered off"),
    ("poweroff", "the guest halted"),          # busybox applet: init's trap runs /sbin/poweroff
    ("reboot -f", "the guest requested a reset"),
])
def test_guest_stop_ends_microvmm_with_zero(command, summary):
    guest = boot()
    try:
        elapsed = _stop_and_time(guest, command)
        assert f"guest stopped: {summary}" in guest.stderr.text, \
            f"{command!r}, ended {elapsed:.1f} s after it: " + guest.stderr.text[-2000:]
    finally:
        guest.kill()


def test_typed_halt_text_does_not_stop_the_vm_and_features_are_hidden():
    """The kernel's words on the console alone stop nothing (the vCPUs still
    run); the host workarounds really hide every feature they name."""
    guest = boot()
    try:
        status, out = guest.run("echo 'reboot: System halted'; echo 'reboot: Power down'")
        assert status == 0 and "reboot: Power down" in out
        time.sleep(11)  # longer than the VMM looks at the vCPUs after such a line (10 s)
        assert guest.proc.poll() is None, guest.stderr.text[-2000:]
        status, out = guest.run("echo alive")
        assert (status, out.strip()) == (0, "alive")

        if detect_host_kind()[0] is HostKind.EMULATING:
            status, out = guest.run("dmesg | grep 'Clearing CPUID bits'; grep -m1 ^flags /proc/cpuinfo")
            assert status == 0, out
            clearing, flags_line = out.strip().splitlines()[-2:]
            assert "unknown" not in clearing, clearing
            flags = set(flags_line.split(":", 1)[1].split())
            assert flags, flags_line
            visible = sorted(set(EMULATING_HOST_HIDDEN_FEATURES) & flags)
            assert not visible, f"features the workarounds should hide: {visible}"

        _stop_and_time(guest, "poweroff -f")
    finally:
        guest.kill()
