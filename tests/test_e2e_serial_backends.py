"""`--serial pty` and `--serial socket:PATH:server` with the default guest: its
shell is on the serial console, reached through the backend a user names;
a command typed there answers there. A SIGTERM leaves no pty or socket file."""

from __future__ import annotations

import os
import re
import select
import signal
import time

import pytest

from microvmm.testing import PROMPT, GuestTimeout
from tests.e2e_support import (BOOT_TIMEOUT, GUEST_TEST_TIMEOUT, assert_no_stray_processes, connect_unix, launch,
                               open_pty_slave, socket_path_in, wait_for_path)

pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)
SERIAL_PTY = re.compile(r"serial console redirected to (/dev/pts/\d+)")


def read_until(fd: int, pattern: bytes, timeout: float, guest, seen: bytearray) -> bytes:
    """Read the non-blocking `fd` into `seen` until `pattern` (a regex) matches."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        if guest.proc.poll() is not None:
            raise AssertionError(f"microvmm exited ({guest.proc.returncode}); stderr:\n{guest.stderr.text[-2000:]}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestTimeout(f"{pattern!r} not seen within {timeout:g} s; last bytes: {bytes(seen[-300:])!r}")
        if select.select([fd], [], [], min(left, 1.0))[0]:
            try:
                seen += os.read(fd, 65536)
            except BlockingIOError:
                pass
    return bytes(seen)


def type_a_command(fd: int, guest) -> None:
    """At the shell's prompt: a command whose answer is not in its echo."""
    seen = bytearray()
    read_until(fd, re.escape(PROMPT.encode()), BOOT_TIMEOUT, guest, seen)
    seen.clear()
    os.write(fd, b"echo $((6 * 7))x\n")
    read_until(fd, rb"\n42x\r?\n", 120, guest, seen)


def stop_with_sigterm(guest) -> None:
    guest.proc.send_signal(signal.SIGTERM)
    assert guest.proc.wait(60) == 128 + signal.SIGTERM, guest.stderr.text[-2000:]
    guest.kill()
    assert_no_stray_processes(guest)


def test_serial_pty_carries_the_shell():
    guest = launch("--serial", "pty")
    try:
        deadline = time.monotonic() + 60
        while not SERIAL_PTY.search(guest.stderr.text) and time.monotonic() < deadline:
            assert guest.proc.poll() is None, guest.stderr.text
            time.sleep(0.1)
        path = SERIAL_PTY.search(guest.stderr.text).group(1)
        fd = open_pty_slave(path)
        try:
            type_a_command(fd, guest)
            assert guest.stdout.text == "", "--serial pty: nothing of the guest belongs on stdout"
            stop_with_sigterm(guest)
        finally:
            os.close(fd)
        assert not os.path.exists(path), f"{path} outlived the VMM"
    finally:
        guest.kill()


def test_serial_socket_server_carries_the_shell(tmp_path):
    path = socket_path_in(tmp_path, "serial.sock")
    guest = launch("--serial", f"socket:{path}:server")
    try:
        wait_for_path(path, 60, guest)
        sock = connect_unix(str(path), 60)
        try:
            type_a_command(sock.fileno(), guest)
            stop_with_sigterm(guest)
        finally:
            sock.close()
        assert not path.exists(), "the serial socket file was left behind"
    finally:
        guest.kill()
