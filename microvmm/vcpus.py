"""The vCPUs of a VM in their boot state, ready to run.

Each vCPU gets the CPUID the boot code computed from what KVM supports, the
MSRs a loader sets up, and vCPU 0 the long-mode state at the kernel's entry
(boot/): the translation from the boot loader's pure state to KVM's registers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from microvmm.vcpu_runner import DeviceGate, VcpuRunner, VcpuStop

if TYPE_CHECKING:
    from microvmm.boot import BootInfo
    from microvmm.host.hostinfo import HostQuirks
    from microvmm.kvm import Vcpu, Vm
    from microvmm.memory import GuestMemory

# x86 MSRs Linux expects a loader to have set up (as on a real BSP after firmware).
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1


def create_vcpu_runners(vm: "Vm", memory: "GuestMemory", boot: "BootInfo", count: int, supported,
                        quirks: "HostQuirks", gate: DeviceGate, on_stop: Callable[[VcpuStop], None],
                        closers: list) -> list[VcpuRunner]:
    """`count` vCPUs, each with its runner (not started); their closers go to `closers`.
    `supported`: KVM's CPUID leaves (KVM_GET_SUPPORTED_CPUID)."""
    from microvmm.boot import vcpu_cpuid
    from microvmm.kvm import KVM_SYNC_X86_REGS, Cap
    # Each exit's registers in kvm_run, for where a vCPU that KVM resets on a
    # triple fault (AMD) was last seen.
    sync_regs = bool(vm.check_extension(Cap.SYNC_REGS) & KVM_SYNC_X86_REGS)
    runners = []
    for index in range(count):
        vcpu = vm.create_vcpu(index)
        closers.append(vcpu.close)
        # KVM's own CpuidEntry objects in, the same type out (boot/cpuid.py).
        vcpu.set_cpuid2(vcpu_cpuid(supported, index, count, quirks.hidden_kvm_pv_features))
        vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING})
        if index == 0:
            set_boot_state(vcpu, boot)
        runners.append(VcpuRunner(index, vcpu, memory, None, None, quirks, on_stop=on_stop, gate=gate,
                                  sync_exit_regs=sync_regs))
    return runners


def set_boot_state(vcpu: "Vcpu", boot: "BootInfo") -> None:
    """Long mode at the kernel's 64-bit entry, as the boot loader computed it."""
    from microvmm.kvm import DTable, Fpu, Regs, Segment
    state = boot.cpu_state
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        seg = getattr(state, name)
        setattr(sregs, name, Segment(base=seg.base, limit=seg.limit, selector=seg.selector,
                                     type=seg.type, present=seg.present, dpl=seg.dpl, db=seg.db,
                                     s=seg.s, l=seg.l, g=seg.g, avl=seg.avl))
    sregs.gdt = DTable(state.gdt.base, state.gdt.limit)
    sregs.idt = DTable(state.idt.base, state.idt.limit)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=state.rip, rsp=state.rsp, rsi=state.rsi, rflags=state.rflags))
    vcpu.set_fpu(Fpu())
