"""--share in the booted default guest: two host directories over virtio-9p,
one read-write and one read-only, mounted by /init at /mnt/TAG.

The guest reads a host file, writes files the host then sees, gets EROFS on
the read-only share, and its escape attempts (`..`, symlinks to /etc and to
the host's canary directory, renames and moves out) never reach the host's
canary directory beside the shares, whose files, contents and times must be
unchanged at the end. One boot shared by the tests, in file order.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from microvmm.testing import GuestProcess
from tests.e2e_support import GUEST_TEST_TIMEOUT, assert_no_stray_processes, boot

pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)


@dataclass
class ShareGuest:
    guest: GuestProcess
    rw: Path
    ro: Path
    canary: Path
    canary_state: list


def _canary_state(canary: Path) -> list:
    state = []
    for path in sorted(canary.rglob("*")):
        st = path.lstat()
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME) if path.is_file() else None
        try:
            data = os.read(fd, 1 << 16) if fd is not None else b""
        finally:
            if fd is not None:
                os.close(fd)
        state.append((path.name, st.st_size, st.st_mtime_ns, st.st_atime_ns, data))
    return state + [sorted(os.listdir(canary.parent))]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    work = tmp_path_factory.mktemp("share")
    rw, ro, canary = work / "rw", work / "ro", work / "canary"
    for d in (rw, ro, canary):
        d.mkdir()
    (canary / "secret").write_text("host secret\n")
    os.utime(canary / "secret", (1, time.time()))  # a read would move the atime (relatime)
    (rw / "from-host.txt").write_text("written on the host\n")
    (rw / "sub").mkdir()
    os.symlink("../canary/secret", rw / "up")
    os.symlink(str(canary / "secret"), rw / "abs")
    os.symlink("/etc/passwd", rw / "etc-passwd")
    (ro / "readme").write_text("read-only share\n")
    guest = boot("--share", str(rw), "--share", f"{ro}:docs:ro")
    try:
        yield ShareGuest(guest, rw, ro, canary, _canary_state(canary))
    finally:
        guest.kill()
        assert_no_stray_processes(guest)


def test_both_shares_are_mounted_at_their_tags(vm):
    status, out = vm.guest.run("grep ' 9p ' /proc/mounts")
    assert status == 0, out
    mounts = {line.split()[1]: line.split()[0] for line in out.splitlines() if " 9p " in line}
    assert mounts == {"/mnt/rw": "rw", "/mnt/docs": "docs"}, out


def test_the_guest_reads_a_host_file(vm):
    status, out = vm.guest.run("cat /mnt/rw/from-host.txt; cat /mnt/docs/readme; ls /mnt/rw")
    assert status == 0, out
    assert "written on the host" in out and "read-only share" in out
    assert {"from-host.txt", "sub", "up", "abs", "etc-passwd"} <= set(out.split())


def test_the_host_sees_what_the_guest_writes(vm):
    status, out = vm.guest.run("echo written in the guest > /mnt/rw/from-guest.txt && "
                               "mkdir /mnt/rw/made && echo x > /mnt/rw/made/f && "
                               "mv /mnt/rw/made/f /mnt/rw/sub/moved && rm /mnt/rw/from-host.txt && "
                               "echo appended >> /mnt/rw/from-guest.txt && ls /mnt/rw/sub")
    assert status == 0, out
    assert (vm.rw / "from-guest.txt").read_text() == "written in the guest\nappended\n"
    assert (vm.rw / "sub" / "moved").read_text() == "x\n"
    assert (vm.rw / "made").is_dir() and not (vm.rw / "from-host.txt").exists()


def test_the_read_only_share_refuses_writes_with_erofs(vm):
    status, out = vm.guest.run("echo x > /mnt/docs/new; echo x >> /mnt/docs/readme; "
                               "mkdir /mnt/docs/d; rm /mnt/docs/readme; true")
    assert out.count("Read-only file system") >= 4, out
    assert sorted(p.name for p in vm.ro.iterdir()) == ["readme"]
    assert (vm.ro / "readme").read_text() == "read-only share\n"


def test_escapes_never_reach_the_host(vm):
    # Symlinks are resolved by the guest, in the guest: ../canary is the
    # guest's /mnt/canary (absent), the host's absolute path is absent in the
    # guest, and /etc/passwd is the guest's own.
    status, out = vm.guest.run("cat /mnt/rw/up; cat /mnt/rw/abs; echo pwned > /mnt/rw/up; "
                               "ls /mnt/rw/../; cat /mnt/rw/etc-passwd | head -1; "
                               "mv /mnt/rw/from-guest.txt /mnt/rw/../stolen; ls /mnt/stolen; "
                               "ln -s /mnt /mnt/rw/sub/l && ls /mnt/rw/sub/l/; true")
    assert "host secret" not in out, out
    assert "No such file or directory" in out
    assert out.count("root:") >= 1  # the guest's own passwd
    # The move left the share for the guest's own /mnt: gone from the host, on no host path.
    assert not (vm.rw / "from-guest.txt").exists()
    assert _canary_state(vm.canary) == vm.canary_state
    assert sorted(os.listdir(vm.canary.parent)) == ["canary", "ro", "rw"]


def test_rootfs_host_runs_a_host_program():
    """--rootfs host: the host's python3 runs in the guest, over 9p and the
    overlay, with writes landing in the guest's tmpfs, never on the host."""
    import subprocess
    import sys

    from tests.e2e_support import BOOT_TIMEOUT, IMAGES, REPO, require_images, require_kvm
    require_kvm()
    require_images()
    # Not under /tmp, /run or /mnt (the guest's own there): a host path the overlay covers.
    marker = Path("/var/tmp") / f"microvmm-rootfs-test-{os.getpid()}"
    result = subprocess.run(
        [sys.executable, "-m", "microvmm", "run", "--kernel", str(IMAGES / "vmlinux"),
         "--initrd", str(IMAGES / "initramfs.cpio"), "--rootfs", "host", "--timeout", str(BOOT_TIMEOUT),
         "--", "sh", "-c", f"python3 -c 'print(1)' && echo x > {marker} && cat {marker} && "
                           "grep -qx microvmm /proc/sys/kernel/hostname && exit 3"],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60)
    assert result.returncode == 3, result.stderr[-4000:]
    assert result.stdout.split() == ["1", "x"], result.stdout
    assert not marker.exists()  # the write went to the overlay's tmpfs
    # (and /proc is the guest's: its hostname, not the host's)
