"""A one-page real-mode guest for tests that drive a VcpuRunner directly:
guest RAM at 0, the code at CODE, flat segments, a stack below 0x3000."""

from __future__ import annotations

from microvmm.kvm import Regs
from microvmm.memory import GuestMemory

RAM_SIZE = 0x4000
CODE = 0x1000


def real_mode_guest(vm, code: bytes):
    """Guest RAM registered with `vm`, `code` at CODE and vCPU 0 about to run
    it in flat real mode: (memory, vcpu). The caller closes both."""
    mem = GuestMemory([(0, RAM_SIZE)])
    vm.set_user_memory_region(0, 0, RAM_SIZE, mem.regions[0].host_addr)
    mem.write(CODE, code)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.base, seg.selector = 0, 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=CODE, rsp=0x3000, rflags=0x2))
    return mem, vcpu
