"""Thin KVM bindings: /dev/kvm, VM and vCPU fds, and the kvm_run page.

No VMM policy and no devices live here. Structures come from cffi (ABI mode,
no compiler at run time); ioctl numbers are computed with ioctl_opt.
"""

from microvmm.kvm.constants import (
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_PIT_SPEAKER_DUMMY,
    KVM_SYNC_X86_REGS,
    Cap,
    ExitReason,
    GuestDebugFlag,
    InternalErrorSuberror,
    IoDirection,
    IoeventfdFlag,
    Ioctl,
    Irqchip,
    IrqfdFlag,
    IrqRoutingType,
    MemFlag,
    MpState,
    SystemEvent,
    VcpuEventValid,
)
from microvmm.kvm.errors import KvmError, KvmExitDataError, KvmUnavailableError, SoftExceptionError
from microvmm.kvm.state import CpuidEntry, DTable, Fpu, Regs, Segment, Sregs
from microvmm.kvm.system import Kvm
from microvmm.kvm.vcpu import (
    SOFT_EXCEPTION_VECTORS,
    DebugExit,
    EmulationFailure,
    FailEntry,
    InternalError,
    IoExit,
    MmioExit,
    SystemEventExit,
    Vcpu,
)
from microvmm.kvm.vm import IrqchipRoute, MsiRoute, Vm
from microvmm.lazyexports import lazy_exports

#: Loaded on first use (PEP 562): no guest needs them before it runs (issue 6).
__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    name: "events" for name in ("ExceptionEvent", "InterruptEvent", "NmiEvent", "SmiEvent", "VcpuEvents")})


__all__ = [
    "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES", "KVM_PIT_SPEAKER_DUMMY", "KVM_SYNC_X86_REGS",
    "Cap", "ExitReason", "GuestDebugFlag", "InternalErrorSuberror", "IoDirection",
    "IoeventfdFlag", "Ioctl", "Irqchip", "IrqfdFlag", "IrqRoutingType", "MemFlag",
    "MpState", "SystemEvent", "VcpuEventValid",
    "KvmError", "KvmExitDataError", "KvmUnavailableError", "SoftExceptionError",
    "CpuidEntry", "DTable", "ExceptionEvent", "Fpu", "InterruptEvent", "NmiEvent",
    "Regs", "Segment", "SmiEvent", "Sregs", "VcpuEvents",
    "Kvm", "Vm", "Vcpu", "IrqchipRoute", "MsiRoute",
    "DebugExit", "EmulationFailure", "FailEntry", "InternalError", "IoExit", "MmioExit",
    "SystemEventExit", "SOFT_EXCEPTION_VECTORS",
]
