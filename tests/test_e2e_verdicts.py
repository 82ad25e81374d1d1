"""Verdicts CI can trust, with the real default guest on KVM: kernel reports
are matched on the kernel's own log only (its port microvmm.kmsg), so text a
program prints or a user types never fails a run, while a real panic does;
a `-- CMD` of any length runs and returns its own status, its stdout and
stderr its own.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.e2e_support import BOOT_TIMEOUT, GUEST_TEST_TIMEOUT, IMAGES, REPO, boot, require_images, require_kvm

# A guest boot and its commands; nothing may hang the run.
pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

# What a kernel report looks like, printed by user space.
REPORT_TEXT = ("BUG: only text", "Kernel panic - not syncing: only text", "WARNING: only text",
               "Oops: 0000 [#1] only text", "[    1.234567] BUG: only text with a kernel timestamp")
KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d{6}\] ", re.M)


def _run_command(*args: str, timeout: float = BOOT_TIMEOUT + 300) -> subprocess.CompletedProcess:
    require_kvm()
    require_images()
    return subprocess.run(
        [sys.executable, "-m", "microvmm", "run", "--kernel", str(IMAGES / "vmlinux"),
         "--initrd", str(IMAGES / "initramfs.cpio"), "--timeout", str(BOOT_TIMEOUT), *args],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def test_a_64k_command_printing_report_text_returns_its_own_status(tmp_path):
    # 64 KiB of script: 32 times the kernel command line's limit
    padding = "".join(f": line {index:05d} {'x' * 48}\n" for index in range(1100))
    prints = "".join(f"echo '{text}'\n" for text in REPORT_TEXT)
    script = padding + prints + "echo 'WARNING: on stderr' >&2\nexit 7\n"
    assert len(script.encode()) >= 64 * 1024
    log = tmp_path / "run.log"
    result = _run_command("--fail-on", "warn", "--log", str(log), "--", "sh", "-c", script)
    assert result.returncode == 7, result.stderr[-3000:]
    # stdout is the command's alone: exactly what it printed, no kernel line
    assert result.stdout == "".join(f"{text}\n" for text in REPORT_TEXT)
    assert "WARNING: on stderr" in result.stderr
    assert "command exited with status 7" in result.stderr
    assert not KERNEL_LINE.search(result.stderr), result.stderr[-3000:]
    # the kernel's log is in --log, tagged as the kernel's, each line once
    # (the early part read from guest RAM, the rest from its port)
    kernel_lines = re.findall(r"^\[\s*\d+\.\d{3}\] kmsg: (.*)$", log.read_text(), re.M)
    assert re.match(r"\[\s*\d+\.\d{6}\] Linux version", kernel_lines[0]), kernel_lines[:3]
    assert any("Run /init as init process" in line for line in kernel_lines)
    assert len(kernel_lines) == len(set(kernel_lines)), [l for l in kernel_lines if kernel_lines.count(l) > 1]


@pytest.fixture(scope="module")
def shell_guest(tmp_path_factory):
    serial = tmp_path_factory.mktemp("verdicts") / "serial.log"
    guest = boot("--console", "@stdio:con", "--serial", f"file:{serial}", "--fail-on", "warn")
    guest.serial_path = serial
    yield guest
    guest.kill()


def test_report_text_typed_at_the_shell_does_not_end_the_vm(shell_guest):
    guest = shell_guest
    status, _ = guest.run("stty echo")  # typed lines are echoed, as for a user
    assert status == 0
    for text in REPORT_TEXT:
        status, out = guest.run(f"echo '{text}'")
        assert status == 0 and text in out, out
    guest.run("stty -echo")
    time.sleep(3)  # a matched report ends the VM a second after its line
    status, out = guest.run("echo alive")
    assert (status, out.strip()) == (0, "alive")
    assert guest.proc.poll() is None
    # the shell's console never carried a kernel line
    assert not KERNEL_LINE.search(guest.stdout.text.replace("\r", "").replace(REPORT_TEXT[-1], "")), \
        guest.stdout.text[-2000:]


def test_a_real_panic_still_fails_the_run(shell_guest):
    guest = shell_guest
    guest.send("echo c > /proc/sysrq-trigger\n")
    assert guest.wait(300) == 126, guest.stderr.text[-3000:]
    assert "guest kernel panic" in guest.stderr.text
    assert "Kernel panic - not syncing: sysrq triggered crash" in guest.stderr.text
    log = guest.serial_path.read_text(errors="replace")
    assert "sysrq: Trigger a crash" in log and "Kernel panic - not syncing: sysrq triggered crash" in log


def test_a_real_panic_fails_also_with_quiet():
    result = _run_command("--append", "quiet", "--", "sh", "-c", "echo c > /proc/sysrq-trigger; exit 0")
    assert result.returncode == 126, result.stderr[-3000:]
    assert "Kernel panic - not syncing: sysrq triggered crash" in result.stderr


def test_a_panic_before_the_log_port_came_up_is_read_from_guest_ram(tmp_path):
    # The virtio-console driver never starts, so the kernel's log port never
    # comes up; without an init the kernel panics (and panic=-1 resets). The
    # VMM reads the log from the kernel's ring buffer in guest RAM: the panic
    # is named and fails the run, not a silent "stopped".
    log = tmp_path / "run.log"
    result = _run_command("--append", "initcall_blacklist=virtio_console_init rdinit=/nonexistent",
                          "--log", str(log))
    assert result.returncode == 126, result.stderr[-3000:]
    assert re.search(r"guest kernel panic at [\d.]+ s: .*Kernel panic - not syncing", result.stderr), \
        result.stderr[-3000:]
    kernel_lines = re.findall(r"^\[\s*\d+\.\d{3}\] kmsg: (.*)$", log.read_text(), re.M)
    assert any("Linux version" in line for line in kernel_lines)
    assert any("Kernel panic - not syncing" in line for line in kernel_lines)
