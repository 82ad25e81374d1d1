"""Recognising a guest that has halted for good, on real KVM with an in-kernel
irqchip (where HLT never exits to the VMM), and the run monitor's report of
the kernel's "reboot: System halted" / "reboot: Power down" lines.

The vCPU is asked from another thread, as the VMM does after such a line:
halted with interrupts off (Linux's stop_this_cpu) is final; halted with
interrupts on (the idle loop) or running is not. Skipped without /dev/kvm.
"""

from __future__ import annotations

import queue
import time

import pytest

from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
from microvmm.host.hostinfo import HostKind, host_quirks
from microvmm.memory import GuestMemory
from microvmm.run.monitor import RunMonitor
from microvmm.vcpu_runner import VcpuRunner
from tests.tiny_guest import RAM_SIZE, real_mode_guest

pytestmark = pytest.mark.usefixtures("kick_handler")

ANSWER_TIMEOUT = 5.0

CLI_HLT = bytes([0xFA, 0xF4, 0xEB, 0xFD])          # cli; hlt; jmp back to hlt
STI_HLT = bytes([0xFB, 0xF4, 0xEB, 0xFD])          # sti; hlt; jmp back (an idle loop)
SPIN = bytes([0xFA, 0xEB, 0xFE])                   # cli; jmp $ (busy, never halts)


@pytest.fixture
def run_guest(kvm):
    made = []

    def run(code: bytes) -> VcpuRunner:
        vm = kvm.create_vm()
        vm.set_tss_addr(0xFFFB_D000)
        vm.create_irqchip()  # as the VMM has it: HLT stays in the kernel
        mem, vcpu = real_mode_guest(vm, code)
        stops: queue.SimpleQueue = queue.SimpleQueue()
        runner = VcpuRunner(0, vcpu, mem, Bus("pio", PIO_ADDRESS_LIMIT), Bus("mmio"),
                            host_quirks(HostKind.HARDWARE, "test"), on_stop=stops.put)
        made.append((runner, vm, mem))
        runner.start()
        return runner

    yield run
    for runner, vm, mem in made:
        runner.stop()
        runner.thread.join(ANSWER_TIMEOUT)
        vm.close()
        mem.close()


def _settled_answer(runner: VcpuRunner) -> bool | None:
    time.sleep(0.3)  # a few instructions: long done, even emulated
    return runner.request_stopped_for_good(ANSWER_TIMEOUT)


def test_halt_with_interrupts_off_is_final(run_guest):
    runner = run_guest(CLI_HLT)
    assert _settled_answer(runner) is True
    assert runner.request_stopped_for_good(ANSWER_TIMEOUT) is True  # and stays so when asked again
    assert runner.thread.is_alive()  # asking does not end the vCPU: the VMM decides


def test_idle_halt_with_interrupts_on_is_not_final(run_guest):
    assert _settled_answer(run_guest(STI_HLT)) is False


def test_a_running_vcpu_is_not_halted(run_guest):
    assert _settled_answer(run_guest(SPIN)) is False


def test_monitor_reports_the_kernels_stop_lines():
    seen = []
    monitor = RunMonitor(on_kernel_stop=seen.append)
    monitor.feed("serial", b"[   24.4] sysrq: Power Off\r\n[   24.5] reboot: Power down\r\n")
    monitor.feed("serial", b"[   30.1] reboot: System halted\r\n")
    monitor.feed("serial", b"reboot: Restarting system\r\n")  # a reset ends the VM its own way
    assert seen == ["Power down", "System halted"]


def test_an_ap_never_started_counts_as_stopped(kvm):
    """With --cpus 2 and a kernel that never brings the AP up (nosmp), the AP
    waits for INIT/SIPI for ever: it must not keep a halted VM alive."""
    vm = kvm.create_vm()
    mem = GuestMemory([(0, RAM_SIZE)])
    runners = []
    try:
        vm.set_tss_addr(0xFFFB_D000)
        vm.create_irqchip()
        vm.set_user_memory_region(0, 0, RAM_SIZE, mem.regions[0].host_addr)
        vm.create_vcpu(0)  # the BSP exists (an AP needs one) but is not run here
        ap = vm.create_vcpu(1)
        runner = VcpuRunner(1, ap, mem, Bus("pio", PIO_ADDRESS_LIMIT), Bus("mmio"),
                            host_quirks(HostKind.HARDWARE, "test"), on_stop=lambda stop: None)
        runners.append(runner)
        runner.start()
        assert _settled_answer(runner) is True
    finally:
        for runner in runners:
            runner.stop()
            runner.thread.join(ANSWER_TIMEOUT)
        vm.close()
        mem.close()


class _FakeRunner:
    """Answers the VMM's question from a script (last answer repeats)."""

    def __init__(self, answers: list[bool | None]):
        self.answers = list(answers)
        self.asked = 0

    def request_stopped_for_good(self, timeout: float = 1.0) -> bool | None:
        self.asked += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def stop(self) -> None:
        pass


def _vmm_with(monkeypatch, *runners: _FakeRunner):
    from pathlib import Path

    from microvmm import vmm as vmm_module
    from microvmm.run import halt as halt_module
    from microvmm.vmconfig import VmConfig
    monkeypatch.setattr(halt_module, "HALT_CONFIRM_SECONDS", 1.0)
    monkeypatch.setattr(halt_module, "HALT_POLL_SECONDS", 0.01)
    vmm = vmm_module.Vmm(VmConfig(kernel=Path("vmlinux"), initrd=None, cmdline="console=ttyS0"))
    vmm.runners = list(runners)
    return vmm


@pytest.mark.parametrize("line, reason, summary", [
    ("System halted", "HALTED", "the guest halted"),
    ("Power down", "POWER_OFF", "the guest powered off"),
])
def test_vmm_ends_the_run_when_every_vcpu_stopped_for_good(monkeypatch, line, reason, summary):
    from microvmm.vcpu_runner import StopReason
    bsp, ap = _FakeRunner([False, True]), _FakeRunner([True])  # the BSP still on its way to HLT
    vmm = _vmm_with(monkeypatch, bsp, ap)
    vmm.monitor.feed("serial", f"[   12.3] reboot: {line}\r\n".encode())
    vmm._halt.thread.join(5)
    assert vmm._stop is not None and vmm._stop.reason is StopReason[reason]
    assert bsp.asked >= 3  # not at the first look: halted twice in a row
    outcome = vmm._outcome()
    assert outcome.exit_code == 0 and f"guest stopped: {summary}" in outcome.summary


def test_vmm_goes_on_when_a_vcpu_keeps_running(monkeypatch):
    """The kernel's words typed in a shell: the vCPU is running (or idles with
    interrupts on), or one vCPU does not answer: the VM is not stopped."""
    running, silent = _FakeRunner([False]), _FakeRunner([None])
    for runners in ((running,), (_FakeRunner([True]), silent)):
        vmm = _vmm_with(monkeypatch, *runners)
        # typed at a shell that shares the kernel's console: not the kernel's form, not even looked at
        vmm.monitor.feed("serial", b"microvmm# echo 'reboot: System halted'\r\nreboot: System halted\r\n")
        assert vmm._halt.thread is None
        # the kernel's form (or such a line printed with a timestamp): the vCPUs are looked at
        vmm.monitor.feed("serial", b"[   12.345678] reboot: System halted\r\n")
        vmm._halt.thread.join(5)
        assert not vmm._halt.thread.is_alive()
        assert vmm._stop is None and not vmm._stopped.is_set()
    assert running.asked > 10  # it kept looking for the whole window
