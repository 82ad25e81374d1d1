"""Boot benchmarks on real KVM: time to the guest's init marker (ELF vmlinux and
bzImage), the VMM's own memory with a booted guest, and vCPU exits per boot.

Times are from process start: the parent's time.time() just before it spawns
`python3 -m microvmm run` to the moment the marker line arrives on the child's
stdout (so they include the ~0.3 s to the first KVM_RUN that bench_startup.py
measures). The `*_from_first_run` figures time the guest alone: from vCPU 0's
first KVM_RUN (the CLOCK_MONOTONIC instant `--stats` prints) to the marker's
arrival on the same clock; they matter where the VMM's Python start-up is slow
(QEMU TCG in the real-KVM lane: ~20 s there, none of it the guest's boot).
Each guest is powered off cleanly (`poweroff` at its shell) after.

Figures:
  boot_to_init_vmlinux: S s           boot_to_init_bzimage: S s (or timeout>N s)
  boot_to_prompt_vmlinux: S s         (the shell's `microvmm# ` prompt on the console; target <= 30)
  vmm_cpu_share_to_prompt: P %        (target <= 5) the VMM's own CPU time from process start
                                      to the prompt, as a share of that wall time: user time of
                                      every thread minus guest time, plus system time of the
                                      threads that are not vCPUs. A vCPU thread's system time is
                                      KVM_RUN, i.e. the guest itself on this emulating host
                                      (vcpu_thread_system_to_prompt shows it).
  vmm_rss_total: M MiB                vmm_rss_excluding_guest_ram: M MiB
  guest_ram_rss: M MiB                boot_exits_<reason>: N exits (from --stats)
  boot_to_init_vmlinux_quiet: S s     (the same boot with `--append quiet`)
  boot_to_init_vmlinux_from_first_run: S s   boot_to_init_vmlinux_quiet_from_first_run: S s
                                      (from the first KVM_RUN; target <= 3 s in the real-KVM lane)
  boot_kernel_log_lines[_quiet]: N lines  the kernel's lines the VMM's --log captured (its log
                                      port) up to the power-off: the full log, `quiet` or not
  vmm_cpu_per_exit: U us              the VMM's own CPU time to the prompt over the userspace
                                      exits of the whole run (boot, prompt, poweroff): an upper
                                      bound of what one exit costs, as the VMM does other work too
  boot_exits_total: N exits           (target <= 2,000 to the shell)

`--prefix realkvm_` names every figure with that prefix (run_all.py --realkvm
runs this script inside scripts/realkvm's L1 with real kvm_amd).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO
from common import report as common_report

from microvmm.testing import BOOT_MARKER, PROMPT, GuestProcess, GuestTimeout

IMAGES = Path(os.environ.get("MICROVMM_IMAGES", REPO / "images"))
MEM_MIB = 64


@dataclass
class ThreadCpu:
    comm: str
    user_s: float
    system_s: float
    guest_s: float


def thread_cpu(pid: int) -> list[ThreadCpu]:
    """utime, stime and guest_time of every thread (proc(5), /proc/PID/task/TID/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = []
    for stat_file in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
        threads.append(ThreadCpu(comm, int(fields[11]) / ticks, int(fields[12]) / ticks, int(fields[40]) / ticks))
    return threads


def vmm_own_cpu_s(threads: list[ThreadCpu]) -> tuple[float, float]:
    """(the VMM's own CPU seconds, the vCPU threads' system seconds): see the module docstring."""
    vcpu_system = other_system = 0.0
    for t in threads:
        if re.fullmatch(r"vcpu\d+", t.comm):
            vcpu_system += t.system_s
        else:
            other_system += t.system_s
    own = sum(max(0.0, t.user_s - t.guest_s) for t in threads) + other_system
    return own, vcpu_system


@dataclass
class BootResult:
    init_s: float | None  # None: the marker did not come within the timeout
    #: From vCPU 0's first KVM_RUN to the marker (None: not known).
    init_from_first_run_s: float | None = None
    kernel_log_lines: int | None = None
    prompt_s: float | None = None
    vmm_cpu_s: float | None = None  # the VMM's own CPU time up to the prompt
    vcpu_system_s: float | None = None
    rss: "RssFigures | None" = None
    exits: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None


@dataclass
class RssFigures:
    total_kib: int
    guest_ram_kib: int
    #: Size of the mapping taken as guest RAM beyond --mem: the kernel merges an
    #: adjacent anonymous mapping (e.g. a 1 MiB Python arena) into the same VMA,
    #: whose pages then count as guest RAM here. None: no mapping found.
    merged_extra_kib: int | None


#: How much larger than --mem a VMA may be and still be taken as guest RAM (merged with a neighbour).
MERGE_SLACK_KIB = 8 * 1024


def smaps_rss(pid: int, guest_ram_kib: int) -> RssFigures:
    """Rss of every mapping, and of the guest RAM mapping: the private anonymous
    read-write mapping of --mem bytes (GuestMemory's mmap). The kernel may have
    merged it with an adjacent anonymous mapping, so a VMA up to MERGE_SLACK_KIB
    larger qualifies; of several, the one with the most resident pages (glibc's
    thread arenas are 64 MiB reservations too, but mostly ---p and unpopulated)."""
    total = 0
    candidates: list[tuple[int, int]] = []  # (rss, size)
    size = rss = 0
    header: list[str] = []

    def close_mapping() -> None:
        if (header and len(header) < 6 and header[1].startswith("rw")
                and guest_ram_kib <= size <= guest_ram_kib + MERGE_SLACK_KIB):
            candidates.append((rss, size))

    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as handle:
        for line in handle:
            first = line.split(None, 1)[0]
            if not first.endswith(":"):  # a mapping header: "start-end perms offset dev inode [path]"
                close_mapping()
                header = line.split()
                size = rss = 0
            elif first == "Size:":
                size = int(line.split()[1])
            elif first == "Rss:":
                rss = int(line.split()[1])
                total += rss
    close_mapping()
    if not candidates:
        return RssFigures(total, 0, None)
    rss, size = max(candidates)
    return RssFigures(total, rss, size - guest_ram_kib)


def parse_exit_stats(stderr: str) -> dict[str, int]:
    match = re.search(r"vCPU exits by reason: (.*)", stderr)
    if not match:
        return {}
    exits = {}
    for item in match.group(1).split(","):
        parts = item.split()
        if len(parts) == 2 and parts[1].isdigit():
            exits[parts[0]] = int(parts[1])
    return exits


def first_kvm_run(stderr: str) -> float | None:
    """vCPU 0's first KVM_RUN on CLOCK_MONOTONIC, from --stats."""
    match = re.search(r"first KVM_RUN at CLOCK_MONOTONIC ([\d.]+) s", stderr)
    return float(match.group(1)) if match else None


def kernel_log_lines(log: Path) -> int:
    """Lines of the kernel's log in a --log file: those of its log port
    (`kmsg: `), or, without one, the kernel's timestamped lines on the UART."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return (len(re.findall(r"^\[[\s\d.]+\] kmsg: ", text, re.M))
            or len(re.findall(r"^\[[\s\d.]+\] serial: \[\s*\d+\.\d+\] ", text, re.M)))


def boot_once(kernel: Path, timeout: float, measure_rss: bool, extra: tuple[str, ...] = ()) -> BootResult:
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as scratch:
        log = Path(scratch) / "console.log"
        args = ["--kernel", str(kernel), "--initrd", str(IMAGES / "initramfs.cpio"),
                "--mem", f"{MEM_MIB}M", "--timeout", str(timeout + 180), "--stats", "--log", str(log), *extra]
        result = _boot_and_power_off(args, timeout, measure_rss)
        result.kernel_log_lines = kernel_log_lines(log)
        return result


def _boot_and_power_off(args: list[str], timeout: float, measure_rss: bool) -> BootResult:
    started = time.time()
    guest = GuestProcess(*args)
    try:
        try:
            guest.expect(re.escape(BOOT_MARKER), timeout)
        except GuestTimeout:
            return BootResult(None)
        marker_at = time.monotonic()  # CLOCK_MONOTONIC, as the VMM's first-KVM_RUN instant
        result = BootResult(time.time() - started)
        guest.expect(re.escape(PROMPT), 120)
        result.prompt_s = time.time() - started
        result.vmm_cpu_s, result.vcpu_system_s = vmm_own_cpu_s(thread_cpu(guest.proc.pid))
        if measure_rss:
            result.rss = smaps_rss(guest.proc.pid, MEM_MIB * 1024)
        guest.send("poweroff\n")
        result.exit_code = guest.wait(120)
        result.exits = parse_exit_stats(guest.stderr.text)
        first_run = first_kvm_run(guest.stderr.text)
        if first_run is not None:
            result.init_from_first_run_s = marker_at - first_run
        return result
    finally:
        guest.kill()


def warm_file_cache() -> None:
    """Read the package's files and the images once, so that no boot pays
    for a cold file cache. In the real-KVM lane the tree is on 9p and the
    first boot would import the device modules (while vCPU 0 waits at the
    device gate) from a cold cache: ~1.6 s more than the next boot, which
    made the first (default) boot look slower than the quiet one."""
    for path in [*(REPO / "microvmm").rglob("*"), *IMAGES.glob("*")]:
        if path.is_file():
            path.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bzimage-timeout", type=float, default=300.0,
                        help="give up on the bzImage boot after this many seconds (default 300)")
    parser.add_argument("--skip-bzimage", action="store_true")
    parser.add_argument("--prefix", default="", help="put this before every figure's name, e.g. realkvm_")
    args = parser.parse_args()
    prefix = args.prefix

    def report(name: str, value, unit: str) -> None:
        common_report(prefix + name, value, unit)

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench_boot: no usable /dev/kvm: skipped", file=sys.stderr)
        return 0

    warm_file_cache()
    vmlinux = boot_once(IMAGES / "vmlinux", 600, measure_rss=True)
    if vmlinux.init_s is None:
        report("boot_to_init_vmlinux", "timeout>600", "s")
    else:
        report("boot_to_init_vmlinux", vmlinux.init_s, "s")
    if vmlinux.init_from_first_run_s is not None:
        report("boot_to_init_vmlinux_from_first_run", vmlinux.init_from_first_run_s, "s")
    if vmlinux.kernel_log_lines is not None:
        report("boot_kernel_log_lines", vmlinux.kernel_log_lines, "lines")
    if vmlinux.prompt_s is not None:
        report("boot_to_prompt_vmlinux", vmlinux.prompt_s, "s")
        report("vmm_cpu_to_prompt", vmlinux.vmm_cpu_s, "s")
        report("vmm_cpu_share_to_prompt", 100 * vmlinux.vmm_cpu_s / vmlinux.prompt_s, "%")
        report("vcpu_thread_system_to_prompt", vmlinux.vcpu_system_s, "s")
    if vmlinux.rss is not None:
        rss = vmlinux.rss
        report("vmm_rss_total", rss.total_kib / 1024, "MiB")
        report("guest_ram_rss", rss.guest_ram_kib / 1024, "MiB")
        report("vmm_rss_excluding_guest_ram", (rss.total_kib - rss.guest_ram_kib) / 1024, "MiB")
        if rss.merged_extra_kib is None:
            print(f"bench_boot: no guest RAM mapping of {MEM_MIB} MiB found in smaps: "
                  "vmm_rss_excluding_guest_ram includes guest RAM", file=sys.stderr)
        elif rss.merged_extra_kib:
            print(f"bench_boot: guest RAM shares its VMA with {rss.merged_extra_kib} KiB of another anonymous "
                  f"mapping: vmm_rss_excluding_guest_ram may be low by up to that much", file=sys.stderr)
    if vmlinux.exit_code is not None and vmlinux.exit_code != 0:
        print(f"bench_boot: vmlinux guest exited with {vmlinux.exit_code} after poweroff", file=sys.stderr)
    # vCPU exits by reason over the whole run: boot, the shell prompt, poweroff.
    for reason, count in sorted(vmlinux.exits.items(), key=lambda kv: -kv[1]):
        report(f"boot_exits_{reason}", count, "exits")
    if vmlinux.exits:
        total = sum(vmlinux.exits.values())
        report("boot_exits_total", total, "exits")
        if vmlinux.vmm_cpu_s is not None and total:
            report("vmm_cpu_per_exit", 1e6 * vmlinux.vmm_cpu_s / total, "us")

    quiet = boot_once(IMAGES / "vmlinux", 600, measure_rss=False, extra=("--append", "quiet"))
    report("boot_to_init_vmlinux_quiet", "timeout>600" if quiet.init_s is None else quiet.init_s, "s")
    if quiet.init_from_first_run_s is not None:
        report("boot_to_init_vmlinux_quiet_from_first_run", quiet.init_from_first_run_s, "s")
    if quiet.kernel_log_lines is not None:
        report("boot_kernel_log_lines_quiet", quiet.kernel_log_lines, "lines")

    if not args.skip_bzimage:
        bz = boot_once(IMAGES / "bzImage", args.bzimage_timeout, measure_rss=False)
        if bz.init_s is None:
            report("boot_to_init_bzimage", f"timeout>{args.bzimage_timeout:g}", "s")
        else:
            report("boot_to_init_bzimage", bz.init_s, "s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
