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
# pytest-timeout limit for a test in a module that boots guests (its module's
# boot included): a boot and a few minutes of commands.
GUEST_TEST_TIMEOUT = BOOT_TIMEOUT + 300
# How many guests a test may run at the same time. scripts/realkvm sets 1 in
# its L1: two guests at once under nested SVM in QEMU TCG hit emulator bugs
# (random L2 triple faults, guests that never print).
GUESTS_AT_ONCE = int(os.environ.get("MICROVMM_TEST_GUESTS_AT_ONCE", "2"))


def require_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not accessible to this user")


def require_guests_at_once(count: int) -> None:
    if GUESTS_AT_ONCE < count:
        pytest.skip(f"needs {count} guests at once; MICROVMM_TEST_GUESTS_AT_ONCE={GUESTS_AT_ONCE} here")


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


# --- Moving data through virtio-console ports of a booted guest -------------
# (used by test_e2e_console.py and test_e2e_two_vms.py)

import hashlib
import secrets
import select
import socket
import termios
import time
import tty
from dataclasses import dataclass

from microvmm.testing import GuestTimeout

PTY_ANNOUNCEMENT = re.compile(r"virt-console backend redirected to (/dev/pts/\d+)")


def launch(*run_args: str) -> GuestProcess:
    """Start the default guest like boot(), but return at once (no wait for the shell)."""
    require_kvm()
    require_images()
    return GuestProcess("--kernel", str(IMAGES / "vmlinux"), "--initrd", str(IMAGES / "initramfs.cpio"),
                        "--timeout", str(BOOT_TIMEOUT + 300), *run_args)


def announced_ptys(guest: GuestProcess) -> list[str]:
    """Slave paths of the guest's pty ports, in port order (from the VMM's stderr)."""
    return PTY_ANNOUNCEMENT.findall(guest.stderr.text)


@dataclass
class PendingCommand:
    """A guest shell command started with start_command(); the host acts meanwhile."""
    guest: GuestProcess
    command: str
    tag: str
    start: int

    def result(self, timeout: float = 120.0) -> tuple[int, str]:
        match = self.guest.expect(rf"<{self.tag}:(\d+)>", timeout, self.start)
        text = self.guest.stdout.slice(self.start, match.start()).replace("\r\n", "\n")
        return int(match.group(1)), text


def start_command(guest: GuestProcess, command: str) -> PendingCommand:
    """Send a shell command without waiting for it (GuestProcess.run, split in two)."""
    tag = "BG" + secrets.token_hex(4)
    start = guest.stdout.mark()
    guest.send(f"{command}; echo \"<{tag}:$?>\"\n")
    return PendingCommand(guest, command, tag, start)


def all_byte_values_command(path: str) -> str:
    """A guest shell command writing bytes 0..255 to path (ash's builtin printf, no forks)."""
    digits = " ".join("0123456789abcdef")
    return f"for h in {digits}; do for l in {digits}; do printf \"\\\\x$h$l\"; done; done > {path}"


def write_pattern(guest: GuestProcess, path: str, lines: int = 300) -> bytes:
    """Create a file in the guest with every byte value and text; return its expected bytes.

    Not periodic (so a lost or repeated chunk changes it) and with the bytes a
    terminal would translate (NUL, CR, LF, ^C, 0xff): a port must pass them as they are.
    """
    status, out = guest.run(f"{all_byte_values_command('/tmp/.bytes')} && "
                            f"{{ cat /tmp/.bytes; seq 1 {lines}; cat /tmp/.bytes; }} > {path}")
    assert status == 0, out
    expected = bytes(range(256)) + "".join(f"{i}\n" for i in range(1, lines + 1)).encode() + bytes(range(256))
    assert_guest_file(guest, path, expected)
    return expected


def assert_guest_file(guest: GuestProcess, path: str, expected: bytes) -> None:
    """The guest file holds exactly `expected` (size and md5; a hex dump on mismatch)."""
    status, out = guest.run(f"wc -c < {path}; md5sum < {path}")
    assert status == 0, out
    size, digest = out.split()[:2]
    if (int(size), digest) != (len(expected), hashlib.md5(expected).hexdigest()):
        _, dump = guest.run(f"od -An -tx1 -v {path} | head -40")
        raise AssertionError(f"guest {path}: {size} bytes, md5 {digest}; expected {len(expected)} bytes, "
                             f"md5 {hashlib.md5(expected).hexdigest()}\nfirst bytes in the guest:\n{dump}\n"
                             f"expected: {expected[:64].hex(' ')}")


def read_exact(fd: int, size: int, timeout: float, what: str) -> bytes:
    """Read `size` bytes from a (non-blocking) fd within `timeout` seconds."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestTimeout(f"{what}: {len(data)} of {size} bytes after {timeout:g} s; "
                               f"got {bytes(data[:200])!r}...")
        readable, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if not readable:
            continue
        try:
            chunk = os.read(fd, size - len(data))
        except BlockingIOError:
            continue
        if not chunk:
            raise AssertionError(f"{what}: end of stream after {len(data)} of {size} bytes: {bytes(data[:200])!r}")
        data += chunk
    return bytes(data)


def assert_no_more_data(fd: int, wait: float, what: str) -> None:
    readable, _, _ = select.select([fd], [], [], wait)
    if readable:
        try:
            extra = os.read(fd, 4096)
        except BlockingIOError:
            return
        assert not extra, f"{what}: unexpected extra bytes {extra[:200]!r}"


def write_all(fd: int, data: bytes, timeout: float, what: str) -> None:
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestTimeout(f"{what}: {len(data) - len(view)} of {len(data)} bytes written after {timeout:g} s")
        _, writable, _ = select.select([], [fd], [], min(remaining, 1.0))
        if writable:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                pass


def open_pty_slave(path: str) -> int:
    """Open a pty port's slave the way a terminal program would, in raw mode."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd, termios.TCSANOW)
    return fd


def connect_unix(path: str, timeout: float) -> socket.socket:
    """Connect to a socket port's server within `timeout` seconds (non-blocking socket)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise GuestTimeout(f"cannot connect to socket port {path} within {timeout:g} s: {exc}") from None
            time.sleep(0.2)
            continue
        sock.setblocking(False)
        return sock


def wait_for_path(path: str | os.PathLike, timeout: float, guest: GuestProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if guest is not None and guest.proc.poll() is not None:
            raise AssertionError(f"microvmm exited ({guest.proc.returncode}) before creating {path}; "
                                 f"stderr:\n{guest.stderr.text[-2000:]}")
        if time.monotonic() > deadline:
            raise GuestTimeout(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.1)


def assert_no_stray_processes(guest: GuestProcess) -> None:
    """After kill()/wait(): nothing is left of the VMM's process group (its own session)."""
    assert guest.proc.poll() is not None, "microvmm is still running"
    try:
        os.killpg(guest.proc.pid, 0)
    except ProcessLookupError:
        return
    raise AssertionError(f"processes of microvmm's group {guest.proc.pid} are still alive")


def socket_path_in(directory: Path, name: str) -> Path:
    """A socket path under a test's directory, checked against sun_path's 108 bytes."""
    path = directory / name
    assert len(os.fsencode(path)) < 108, (f"socket path {path} is too long for a unix socket; "
                                          f"run pytest with a shorter --basetemp")
    return path
