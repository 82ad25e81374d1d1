"""The headline command's kernel: the default guest's bzImage, with a pty
console port, running a command (one boot)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from microvmm.host.hostinfo import HostKind, detect_host_kind
from tests.e2e_support import BOOT_TIMEOUT, GUEST_TEST_TIMEOUT, IMAGES, REPO, require_images, require_kvm

# A guest boot and its commands; nothing may hang the run.
pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)


def test_bzimage_with_a_pty_console_runs_a_command():
    require_kvm()
    require_images()
    result = subprocess.run(
        [sys.executable, "-m", "microvmm", "run", "--kernel", str(IMAGES / "bzImage"),
         "--initrd", str(IMAGES / "initramfs.cpio"), "--console", "@pty:p0",
         "--timeout", str(BOOT_TIMEOUT), "--", "uname", "-r"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60)
    assert result.returncode == 0, result.stderr[-3000:]
    version = json.loads((IMAGES / "manifest.json").read_text())["versions"]["linux-source-6.1"]
    assert result.stdout.strip() == version.split("-")[0]
    # ACRN's announcement of the pty port
    assert "virt-console backend redirected to /dev/pts/" in result.stderr
    announced = "host workaround: bzImage: lz4 payload" in result.stderr
    # Decompressed on the host exactly where the guest would emulate its decompressor.
    assert announced == (detect_host_kind()[0] is HostKind.EMULATING), result.stderr[-3000:]
