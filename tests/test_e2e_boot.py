"""The default guest on real KVM: boots to the init marker, runs commands on
the serial console, answers SIGUSR1 with where it is, powers off with 0.

One boot serves the whole module (a boot costs about a minute on an
emulating KVM host); the tests run in file order and the last one powers off.
"""

import json
import re
import signal
import time

import pytest

from tests.e2e_support import GUEST_TEST_TIMEOUT, IMAGES, boot

# A guest boot and its commands; nothing may hang the run.
pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    return tmp_path_factory.mktemp("profile") / "boot.prof"


@pytest.fixture(scope="module")
def guest(profile_path):
    # A low sampling rate: each sample kicks the vCPU out of KVM_RUN, which
    # is costly on an emulating host.
    vm = boot("--profile", str(profile_path), "--profile-rate", "20", "--stats")
    yield vm
    vm.kill()


def test_shell_runs_commands_with_their_status(guest):
    status, out = guest.run("uname -r")
    assert status == 0
    # the kernel the images were built from: Debian's linux-source-6.1 version
    version = json.loads((IMAGES / "manifest.json").read_text())["versions"]["linux-source-6.1"]
    assert out.strip() == version.split("-")[0]
    status, _ = guest.run("false")
    assert status == 1
    status, out = guest.run("echo $((6 * 7)) > /tmp/x && cat /tmp/x")
    assert (status, out.strip()) == (0, "42")


def test_guest_sees_configured_hardware(guest):
    status, out = guest.run("grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo")
    assert status == 0
    cpus, mem = out.strip().splitlines()
    assert cpus == "1"
    total_kib = int(mem.split()[1])
    assert 40_000 < total_kib <= 65_536  # 64 MiB guest minus the kernel's own share


def test_serial_input_reaches_guest_in_order(guest):
    data = "".join(chr(ord("a") + i % 26) for i in range(300))
    guest.send(f"read -r line\n{data}\n")
    status, out = guest.run("echo ${#line} $line")
    assert status == 0
    assert out.strip() == f"300 {data}"


def test_console_shell_has_job_control_and_ctrl_c_interrupts(guest):
    # /init gives the shell the console as its controlling tty (setsid -c on
    # the console named in sysfs): tty names it, and ^C reaches the foreground job.
    status, out = guest.run("tty")
    assert (status, out.strip()) == (0, "/dev/ttyS0")
    started = time.monotonic()
    guest.send("sleep 60\n")
    time.sleep(5)  # the sleep is running in the foreground by now (a fork+exec takes ~1 s here)
    guest.send("\x03")
    status, out = guest.run("echo alive", timeout=40)
    assert (status, out.strip()) == (0, "alive")
    assert time.monotonic() - started < 45  # not the 60 s the sleep wanted


def test_sigusr1_reports_symbolized_vcpu_state(guest):
    start = guest.stderr.mark()
    guest.proc.send_signal(signal.SIGUSR1)
    match = guest.stderr.expect(r"vCPU 0: RIP (0x[0-9a-f]+) <(\w+)\+0x[0-9a-f]+>.*\n(.*\n){1,8}.*CR3=",
                                timeout=30, start=start)
    rip = int(match.group(1), 16)
    assert rip >= 0xFFFFFFFF80000000  # in the kernel: an idle guest sits in its idle loop
    names = {line.split()[2] for line in (IMAGES / "System.map").read_text().splitlines()
             if len(line.split()) == 3}
    assert match.group(2).decode() in names
    status, _ = guest.run("true")  # still alive after the dump
    assert status == 0


# Where an idle x86 Linux guest's vCPU is found: halted in the idle routine
# (which one depends on the CPU model and paravirt ops).
IDLE_ROUTINES = {"default_idle", "native_safe_halt", "pv_native_safe_halt", "arch_cpu_idle",
                 "default_idle_call", "amd_e400_idle", "do_idle", "cpu_idle_poll", "halt"}


def test_idle_guest_sits_in_its_idle_loop(guest):
    # The shell waits for input and nothing else runs: the vCPU halts in the
    # kernel's idle routine, and a dump says so. A timer interrupt may be
    # in progress at the instant of one dump: a few tries.
    seen = []
    for _ in range(6):
        time.sleep(1)
        start = guest.stderr.mark()
        guest.proc.send_signal(signal.SIGUSR1)
        match = guest.stderr.expect(r"vCPU 0: RIP 0x[0-9a-f]+ <(\w+)\+0x", timeout=30, start=start)
        seen.append(match.group(1).decode())
        if seen[-1] in IDLE_ROUTINES:
            break
    assert seen[-1] in IDLE_ROUTINES, seen


def test_poweroff_ends_vm_with_status_zero(guest):
    guest.send("poweroff\n")
    assert guest.wait(120) == 0
    assert "guest stopped: the guest halted" in guest.stderr.text  # init: /sbin/poweroff, poweroff -f
    # --stats: exits by reason and the UART's share of port accesses
    assert re.search(r"vCPU exits by reason: io \d+", guest.stderr.text)
    assert re.search(r"pio accesses by device: .*com1 \d+r/\d+w", guest.stderr.text)
    assert re.search(r"first KVM_RUN at CLOCK_MONOTONIC \d+\.\d+ s", guest.stderr.text)


def test_profile_names_functions_that_really_ran(profile_path):
    report = profile_path.read_text()
    assert re.match(r"microvmm guest profile: (\d+) samples", report)
    names = {line.split()[2] for line in (IMAGES / "System.map").read_text().splitlines()
             if len(line.split()) == 3}
    top = re.findall(r"^\s+\d+\s+[\d.]+%  (\S+)$", report.split("phases")[0], re.M)
    assert top and all(name in names or name == "[user]" for name in top), top
    # the idle loop of the idle guest (sleep 5 above) shows up among the functions.
    # Which routine halts depends on the CPU (select_idle_routine): default_idle,
    # mwait_idle where MWAIT is preferred, amd_e400_idle on AMD CPUs with erratum
    # 400 such as QEMU's qemu64 (the real-KVM lane's L1), each with the halt inlined.
    idle = {"default_idle", "native_safe_halt", "pv_native_safe_halt", "arch_cpu_idle", "default_idle_call",
            "mwait_idle", "amd_e400_idle"}
    folded = (profile_path.parent / "boot.prof.folded").read_text()
    assert any(f";{name} " in folded for name in idle), folded[-2000:]
    # Phases are named by the console line printed last. The tests above left
    # the guest idle for seconds after lines its shell printed (the status
    # line `<MVMn:0>` of GuestProcess.run, e.g. before `sleep 60` and ^C):
    # such a phase holds well over the 2 % below which phases are folded.
    # (No kernel line is certain to name a phase: on real KVM the kernel's
    # `Run /init as init process` is followed by init's own output within
    # milliseconds, and its log reaches the host in bursts once its port is up.)
    phases = report.partition("\nphases (")[2]
    assert re.search(r"^\s+[\d.]+\s+\d+\s+[\d.]+%  <MVM\d+:0>$", phases, re.M), report
