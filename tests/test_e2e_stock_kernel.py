"""Debian's stock amd64 kernel as the guest (issue 11, "Bring your own
kernel, really"): a bzImage with an XZ payload, KASLR, and virtio as modules,
booted with `--modules` and the default initramfs.

Runs where KVM runs guest kernels for real (hardware KVM, or the real-KVM
lane: kvm_amd in an L1 Linux). On an emulating host (kvm_pvm) it is skipped:
the stock kernel's syscall entry needs the default guest's patch there, and
its SLUB allocator stops at a `lock cmpxchg16b` that host cannot emulate,
before any console output (measured: 1-2 minutes after the start, 256 MiB).

The kernel is fetched by scripts/fetch-debian-kernel (into
/var/cache/microvmm/debian-kernel as root; the lane's unpacked copy reused
when there), with its progress on the terminal; without apt or network the
tests skip, saying so. The lane's L1 has no network: run that script on the
host first, and in L1 it finds the cache.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from microvmm.boot.payload import decompress_bzimage
from microvmm.host.hostinfo import HostKind, detect_host_kind
from tests.e2e_support import REPO, require_images, require_kvm
from microvmm.testing import GuestProcess, GuestTimeout

# In the lane the stock kernel's boot to a command's status took ~32 s (with
# its 512 MiB); this bounds a hang, it is not a speed check.
RUN_TIMEOUT = 600
STOCK_MEM = "512M"
DONE_WHEN_COMMAND = "uname -r; cat /sys/class/virtio-ports/*/name; exit 3"


@dataclass(frozen=True)
class StockKernel:
    vmlinuz: Path
    modules: Path  # lib/modules/VERSION
    release: str


@pytest.fixture(scope="module")
def stock_kernel() -> StockKernel:
    require_kvm()
    require_images()
    kind, why = detect_host_kind()
    if kind is HostKind.EMULATING:
        pytest.skip(f"emulating KVM host ({why}): Debian's stock kernel cannot boot here (its syscall "
                    "entry and SLUB's cmpxchg16b need real KVM); runs in the real-KVM lane")
    print("fetching Debian's stock kernel (scripts/fetch-debian-kernel) ...", file=sys.stderr, flush=True)
    fetched = subprocess.run([str(REPO / "scripts" / "fetch-debian-kernel")], stdout=subprocess.PIPE,
                             text=True, timeout=1800)  # stderr: the script's progress, on the terminal
    if fetched.returncode != 0 or not fetched.stdout.strip():
        pytest.skip(f"Debian's stock kernel could not be fetched (scripts/fetch-debian-kernel exit "
                    f"{fetched.returncode}: no apt or no network? In the real-KVM lane, whose L1 has "
                    f"no network, run scripts/fetch-debian-kernel on the host first)")
    root = Path(fetched.stdout.strip().splitlines()[-1])
    (modules,) = (root / "lib" / "modules").iterdir()
    return StockKernel(root / "boot" / f"vmlinuz-{modules.name}", modules, modules.name)


def run_stock(kernel: StockKernel, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "microvmm", "-v", "run", "--kernel", str(kernel.vmlinuz),
         "--modules", str(kernel.modules), "--mem", STOCK_MEM, "--timeout", str(RUN_TIMEOUT), *args],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT + 60)


def link_text_address(vmlinuz: Path) -> int:
    """The kernel's link address of _text: its ELF's first PT_LOAD p_vaddr
    (the payload decompressed on the host, as microvmm does on emulating hosts)."""
    elf = decompress_bzimage(vmlinuz.read_bytes(), str(vmlinuz)).payload.elf
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        p_type, _flags, _offset, p_vaddr = struct.unpack_from("<IIQQ", elf, phoff + index * phentsize)
        if p_type == 1:  # PT_LOAD
            return p_vaddr
    raise AssertionError(f"{vmlinuz}: no PT_LOAD segment")


def kallsyms_address(output: str, name: str) -> int:
    match = re.search(rf"^([0-9a-f]{{16}}) [Tt] {re.escape(name)}$", output, re.M)
    assert match, f"no {name} in the guest's /proc/kallsyms output:\n{output[-2000:]}"
    return int(match.group(1), 16)


def test_stock_kernel_with_its_modules_runs_a_command(stock_kernel):
    """The Done-when command: the stock kernel, its console modules, -- CMD."""
    result = run_stock(stock_kernel, "--", "sh", "-c", DONE_WHEN_COMMAND)
    assert result.returncode == 3, result.stderr[-4000:]
    lines = result.stdout.split()
    assert lines[0] == stock_kernel.release
    assert {"microvmm.stdout", "microvmm.stderr", "microvmm.status"} <= set(lines[1:]), result.stdout
    assert "--modules: virtio_pci_legacy_dev, virtio_pci_modern_dev, virtio_ring, virtio, virtio_pci, " \
           "virtio_console from" in result.stderr
    assert "nokaslr" in result.stderr


def require_ptys() -> None:
    try:
        master, slave = os.openpty()
    except OSError as err:
        pytest.skip(f"no ptys on this machine (os.openpty: {err.strerror}; the real-KVM lane's L1 "
                    f"had no /dev/ptmx)")
    os.close(master)
    os.close(slave)


def test_stock_kernel_console_on_a_pty(stock_kernel):
    """@pty console: /dev/console is hvc0 once the modules are loaded (init's marker goes there)."""
    require_ptys()
    result = run_stock(stock_kernel, "--serial", "off", "--console", "@pty:p0",
                       "--expect", "microvmm: init reached", "--expect-port", "p0")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "virt-console backend redirected to /dev/pts/" in result.stderr


def test_stock_kernel_shell_on_stdio_and_nokaslr_symbols(stock_kernel, tmp_path):
    """@stdio console: the default guest's shell on hvc0. Under the default
    nokaslr the running kernel is at its link addresses, so its
    /proc/kallsyms is a System.map for later boots."""
    serial = tmp_path / "serial.log"
    guest = GuestProcess("--kernel", str(stock_kernel.vmlinuz), "--modules", str(stock_kernel.modules),
                         "--mem", STOCK_MEM, "--timeout", str(RUN_TIMEOUT), "--serial", f"file:{serial}",
                         "--console", "@stdio:con", cwd=REPO)
    try:
        try:
            guest.wait_for_shell(RUN_TIMEOUT)
        except GuestTimeout as err:
            log = serial.read_text(errors="replace")[-3000:] if serial.exists() else "(none)"
            raise AssertionError(f"{err}\nmicrovmm's stderr:\n{guest.stderr.text[-3000:]}\n"
                                 f"serial console:\n{log}") from None
        status, out = guest.run("uname -r; cat /sys/class/virtio-ports/*/name")
        assert status == 0 and out.split() == [stock_kernel.release, "con"], out
        status, out = guest.run("grep -E ' [Tt] (_text|start_kernel)$' /proc/kallsyms")
        assert status == 0, out
        assert kallsyms_address(out, "_text") == link_text_address(stock_kernel.vmlinuz)
        guest.send("poweroff\n")
        assert guest.proc.wait(timeout=120) == 0
    finally:
        guest.kill()


def test_stock_kernel_with_kaslr_is_symbolized_at_its_running_addresses(stock_kernel, tmp_path):
    """--kaslr: the offset microvmm reads from the guest's page tables is the
    one the guest itself shows (/proc/kallsyms _text minus its link address).
    The System.map is that kernel's /proc/kallsyms from a nokaslr boot
    (Debian ships only a placeholder)."""
    dump = run_stock(stock_kernel, "--", "sh", "-c", "grep -E '^[0-9a-f]+ [Tt] ' /proc/kallsyms")
    assert dump.returncode == 0, dump.stderr[-4000:]
    system_map = tmp_path / "System.map"
    system_map.write_text(dump.stdout)
    link_text = kallsyms_address(dump.stdout, "_text")
    assert link_text == link_text_address(stock_kernel.vmlinuz)

    result = run_stock(stock_kernel, "--kaslr", "--system-map", str(system_map), "--profile",
                       str(tmp_path / "boot.prof"), "--", "sh", "-c", "grep -E ' T _text$' /proc/kallsyms")
    assert result.returncode == 0, result.stderr[-4000:]
    running_text = kallsyms_address(result.stdout, "_text")
    found = re.search(r"--kaslr: the kernel runs (-?0x[0-9a-f]+) bytes from its System.map addresses "
                      r"\(_text at (0x[0-9a-f]+)", result.stderr)
    assert found, result.stderr[-4000:]
    assert int(found.group(1), 16) == running_text - link_text
    assert int(found.group(2), 16) == running_text
    report = (tmp_path / "boot.prof").read_text()
    assert "top functions:" in report
