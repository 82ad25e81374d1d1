"""`--modules` end to end with the default guest (one boot): the modules
archive microvmm appends to the initramfs in guest RAM is unpacked by the
guest's Linux next to the initramfs, and /init goes on to run the command.

The default kernel has virtio built in and no module support, so the
"modules" here are stand-ins that its insmod refuses (said on the serial
console); what is checked is that they arrived, in load order, byte for
byte. Debian's stock kernel really loading its modules:
tests/test_e2e_stock_kernel.py (real KVM only)."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e_support import BOOT_TIMEOUT, IMAGES, REPO, require_images, require_kvm
from test_guestmodules import elf_object, make_tree


def test_appended_modules_reach_the_guest_in_load_order(tmp_path):
    require_kvm()
    require_images()
    tree = make_tree(tmp_path / "mods", compress="xz")  # decompressed by microvmm on the way
    result = subprocess.run(
        [sys.executable, "-m", "microvmm", "run", "--kernel", str(IMAGES / "vmlinux"),
         "--initrd", str(IMAGES / "initramfs.cpio"), "--modules", str(tree),
         "--serial", f"file:{tmp_path / 'serial.log'}", "--timeout", str(BOOT_TIMEOUT),
         "--", "sh", "-c", "cd /lib/microvmm/modules && cat load-order && cat 05-virtio_console.ko; exit 7"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT + 60)
    assert result.returncode == 7, result.stderr.decode(errors="replace")[-3000:]
    listed = ["00-virtio_pci_legacy_dev.ko", "01-virtio_pci_modern_dev.ko", "02-virtio_ring.ko",
              "03-virtio.ko", "04-virtio_pci.ko", "05-virtio_console.ko"]
    assert result.stdout == ("\n".join(listed) + "\n").encode() + elf_object("virtio_console")
    serial = (tmp_path / "serial.log").read_text(errors="replace")
    assert "microvmm: insmod 00-virtio_pci_legacy_dev.ko failed" in serial  # tried, in order
