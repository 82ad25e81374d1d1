"""Shared pieces of the end-to-end tests that boot the real guest under KVM."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from microvmm.testing import GuestProcess

REPO = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("MICROVMM_IMAGES", REPO / "images"))
# A boot takes ~1 minute on the emulating KVM of the development machines and
# well under a second on hardware KVM; this bound only stops a hung test.
BOOT_TIMEOUT = 600


def require_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not accessible to this user")


def require_images() -> None:
    # Not a skip: `make test` builds the images first, so their absence is a bug.
    missing = [name for name in ("vmlinux", "initramfs.cpio", "System.map")
               if not (IMAGES / name).is_file()]
    assert not missing, f"guest images missing in {IMAGES}: {missing} (run `make images`)"


def boot(*run_args: str) -> GuestProcess:
    """Start the default guest with extra `microvmm run` arguments, shell ready."""
    require_kvm()
    require_images()
    guest = GuestProcess("--kernel", str(IMAGES / "vmlinux"), "--initrd", str(IMAGES / "initramfs.cpio"),
                         "--timeout", str(BOOT_TIMEOUT + 300), *run_args)
    try:
        guest.wait_for_shell(BOOT_TIMEOUT)
    except BaseException:
        guest.kill()
        raise
    return guest


def virtio_ports(guest: GuestProcess) -> dict[str, str]:
    """Port name -> /dev/vportNpM as the guest sees them."""
    status, out = guest.run("for d in /sys/class/virtio-ports/*; do echo \"$(cat $d/name) ${d##*/}\"; done")
    assert status == 0, out
    ports = {}
    for line in out.splitlines():
        match = re.fullmatch(r"(\S+) (vport\d+p\d+)", line.strip())
        if match:
            ports[match.group(1)] = "/dev/" + match.group(2)
    return ports
