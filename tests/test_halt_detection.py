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
from microvmm.hostinfo import HostKind, host_quirks
from microvmm.kvm import Regs
from microvmm.memory import GuestMemory
from microvmm.run_monitor import RunMonitor
from microvmm.vcpu_runner import VcpuRunner

pytestmark = pytest.mark.usefixtures("kick_handler")

RAM_SIZE = 0x4000
CODE = 0x1000
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
        mem = GuestMemory([(0, RAM_SIZE)])
        vm.set_user_memory_region(0, 0, RAM_SIZE, mem.regions[0].host_addr)
        mem.write(CODE, code)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
            seg.base, seg.selector = 0, 0
        vcpu.set_sregs(sregs)
        vcpu.set_regs(Regs(rip=CODE, rsp=0x3000, rflags=0x2))
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
