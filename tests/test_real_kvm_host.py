"""The real-KVM lane (`make test-kvm`) really runs on hardware-semantics KVM.

scripts/test-kvm sets MICROVMM_EXPECT_HARDWARE_KVM=1 and runs this module
first: should the lane ever land on an emulating KVM (kvm_pvm), its results
would say nothing about hardware KVM, so the lane stops here instead.
Elsewhere (the host suite) these tests are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from microvmm.host.hostinfo import HostKind, detect_host_kind, host_quirks
from tests.e2e_support import BOOT_TIMEOUT, GUEST_TEST_TIMEOUT, IMAGES, require_images, require_kvm

pytestmark = [
    pytest.mark.skipif(os.environ.get("MICROVMM_EXPECT_HARDWARE_KVM") != "1",
                       reason="only in the real-KVM lane (make test-kvm)"),
    pytest.mark.timeout(GUEST_TEST_TIMEOUT),
]


def test_check_host_says_hardware():
    out = subprocess.run([sys.executable, "-m", "microvmm", "check-host"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if not out.stdout.startswith("hardware:"):
        # Every later result of the lane would be about the wrong kind of KVM.
        pytest.exit(f"the real-KVM lane is not on hardware-semantics KVM: check-host says "
                    f"{out.stdout.strip()!r}", returncode=1)
    kind, reason = detect_host_kind()
    assert kind is HostKind.HARDWARE, reason
    assert not host_quirks(kind, reason).active


def test_default_guest_boots_without_any_workaround():
    require_kvm()
    require_images()
    out = subprocess.run(
        [sys.executable, "-m", "microvmm", "run", "--kernel", str(IMAGES / "vmlinux"),
         "--initrd", str(IMAGES / "initramfs.cpio"), "--timeout", str(BOOT_TIMEOUT),
         "--", "cat", "/proc/cmdline"],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60)
    assert out.returncode == 0, out.stderr[-3000:]
    # what an emulating host would add to the guest's command line and say
    assert "clearcpuid" not in out.stdout and "noxsave" not in out.stdout, out.stdout
    assert "emulating KVM host" not in out.stderr, out.stderr
    assert "host workaround" not in out.stderr, out.stderr
