"""The default guest with more than one vCPU: it boots, sees them all online,
runs a command and returns its status (one boot).

On the emulating development host this needs the host workaround that hides
KVM's hypercall-based paravirt features (hostinfo.py): without it, vCPU 1
stays for ever in the PV send-IPI hypercall and vCPU 0 spins on a lock.
"""

from __future__ import annotations

import subprocess
import sys

from microvmm.host.hostinfo import HostKind, detect_host_kind
from tests.e2e_support import BOOT_TIMEOUT, IMAGES, REPO, require_images, require_kvm


def test_two_vcpus_boot_and_run_a_command():
    require_kvm()
    require_images()
    # --timeout ends a hung boot with 124 and the vCPUs' positions; the
    # subprocess bound only catches a VMM that ignores it.
    result = subprocess.run(
        [sys.executable, "-m", "microvmm", "run", "--kernel", str(IMAGES / "vmlinux"),
         "--initrd", str(IMAGES / "initramfs.cpio"), "--cpus", "2", "--timeout", str(BOOT_TIMEOUT),
         "--", "sh", "-c", "nproc; cat /sys/devices/system/cpu/online; exit 5"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60)
    assert result.returncode == 5, result.stderr[-4000:]
    assert result.stdout.split() == ["2", "0-1"], result.stdout
    hidden = "KVM PV features using hypercalls hidden: PV_UNHALT|PV_SEND_IPI|PV_SCHED_YIELD"
    emulating = detect_host_kind()[0] is HostKind.EMULATING
    assert (hidden in result.stderr) == emulating, result.stderr[-3000:]
    assert ("microvmm: 2 vCPUs on " in result.stderr) == emulating  # what SMP costs there
