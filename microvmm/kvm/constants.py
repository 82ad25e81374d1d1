"""KVM constants: ioctl numbers, capabilities, exit reasons and flags.

Ioctl numbers are computed (never hard-coded) with ``ioctl_opt`` from the
sizes cffi gives for the kernel structures; ``tests/test_kvm_abi.py`` checks
every value here against the system's <linux/kvm.h>.
"""

from __future__ import annotations

import enum

import ioctl_opt

from microvmm.kvm._ffi import ffi

KVMIO = 0xAE
KVM_API_VERSION = 12

# Direction letters as in the kernel macros: "" = _IO, "R" = _IOR,
# "W" = _IOW, "WR" = _IOWR. The C type is the one the kernel's macro names
# (its sizeof goes into the number); None for _IO.
IOCTLS: tuple[tuple[str, str, int, str | None], ...] = (
    # /dev/kvm
    ("KVM_GET_API_VERSION", "", 0x00, None),
    ("KVM_CREATE_VM", "", 0x01, None),
    ("KVM_CHECK_EXTENSION", "", 0x03, None),
    ("KVM_GET_VCPU_MMAP_SIZE", "", 0x04, None),
    ("KVM_GET_SUPPORTED_CPUID", "WR", 0x05, "struct kvm_cpuid2"),
    # VM
    ("KVM_CREATE_VCPU", "", 0x41, None),
    ("KVM_SET_USER_MEMORY_REGION", "W", 0x46, "struct kvm_userspace_memory_region"),
    ("KVM_SET_TSS_ADDR", "", 0x47, None),
    ("KVM_SET_IDENTITY_MAP_ADDR", "W", 0x48, "uint64_t"),
    ("KVM_CREATE_IRQCHIP", "", 0x60, None),
    ("KVM_IRQ_LINE", "W", 0x61, "struct kvm_irq_level"),
    ("KVM_IRQ_LINE_STATUS", "WR", 0x67, "struct kvm_irq_level"),
    ("KVM_SET_GSI_ROUTING", "W", 0x6A, "struct kvm_irq_routing"),
    ("KVM_IRQFD", "W", 0x76, "struct kvm_irqfd"),
    ("KVM_CREATE_PIT2", "W", 0x77, "struct kvm_pit_config"),
    ("KVM_IOEVENTFD", "W", 0x79, "struct kvm_ioeventfd"),
    ("KVM_SIGNAL_MSI", "W", 0xA5, "struct kvm_msi"),
    # vCPU
    ("KVM_RUN", "", 0x80, None),
    ("KVM_GET_REGS", "R", 0x81, "struct kvm_regs"),
    ("KVM_SET_REGS", "W", 0x82, "struct kvm_regs"),
    ("KVM_GET_SREGS", "R", 0x83, "struct kvm_sregs"),
    ("KVM_SET_SREGS", "W", 0x84, "struct kvm_sregs"),
    ("KVM_TRANSLATE", "WR", 0x85, "struct kvm_translation"),
    ("KVM_GET_MSRS", "WR", 0x88, "struct kvm_msrs"),
    ("KVM_SET_MSRS", "W", 0x89, "struct kvm_msrs"),
    ("KVM_GET_FPU", "R", 0x8C, "struct kvm_fpu"),
    ("KVM_SET_FPU", "W", 0x8D, "struct kvm_fpu"),
    ("KVM_GET_LAPIC", "R", 0x8E, "struct kvm_lapic_state"),
    ("KVM_SET_LAPIC", "W", 0x8F, "struct kvm_lapic_state"),
    ("KVM_SET_CPUID2", "W", 0x90, "struct kvm_cpuid2"),
    ("KVM_GET_MP_STATE", "R", 0x98, "struct kvm_mp_state"),
    ("KVM_SET_MP_STATE", "W", 0x99, "struct kvm_mp_state"),
    ("KVM_SET_GUEST_DEBUG", "W", 0x9B, "struct kvm_guest_debug"),
    ("KVM_GET_VCPU_EVENTS", "R", 0x9F, "struct kvm_vcpu_events"),
    ("KVM_SET_VCPU_EVENTS", "W", 0xA0, "struct kvm_vcpu_events"),
)

_DIRECTIONS = {
    "": ioctl_opt.IOC_NONE,
    "R": ioctl_opt.IOC_READ,
    "W": ioctl_opt.IOC_WRITE,
    "WR": ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE,
}


def _ioctl_number(direction: str, nr: int, ctype: str | None) -> int:
    # ioctl_opt.IOR/IOW/IOWR want a ctypes type for the size; the sizes here
    # come from cffi, so the generic IOC() is used with the same direction
    # bits those helpers would pass.
    if ctype is None:
        return ioctl_opt.IO(KVMIO, nr)
    return ioctl_opt.IOC(_DIRECTIONS[direction], KVMIO, nr, ffi.sizeof(ctype))


Ioctl = enum.IntEnum(
    "Ioctl",
    [(name, _ioctl_number(direction, nr, ctype)) for name, direction, nr, ctype in IOCTLS],
    module=__name__,
)
Ioctl.__doc__ = "KVM ioctl request numbers, named as in <linux/kvm.h>."


class Cap(enum.IntEnum):
    """KVM_CHECK_EXTENSION capabilities the VMM asks about (KVM_CAP_<name>)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    SYNC_REGS = 74
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    IRQFD_RESAMPLE = 82
    SPLIT_IRQCHIP = 121
    MAX_VCPU_ID = 128
    X2APIC_API = 129
    IMMEDIATE_EXIT = 136


class ExitReason(enum.IntEnum):
    """kvm_run.exit_reason (KVM_EXIT_<name>).

    ``INTR`` is also what ``Vcpu.run()`` returns when KVM_RUN was interrupted
    by a signal or by ``immediate_exit`` (EINTR/EAGAIN).
    """

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    WATCHDOG = 21
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    NOTIFY = 37


class InternalErrorSuberror(enum.IntEnum):
    """kvm_run.internal.suberror (KVM_INTERNAL_ERROR_<name>)."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


# kvm_run.emulation_failure.flags: insn_size/insn_bytes are valid.
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0


class IoDirection(enum.IntEnum):
    """kvm_run.io.direction (KVM_EXIT_IO_<name>)."""

    IN = 0
    OUT = 1


class SystemEvent(enum.IntEnum):
    """kvm_run.system_event.type (KVM_SYSTEM_EVENT_<name>)."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MpState(enum.IntEnum):
    """kvm_mp_state.mp_state (KVM_MP_STATE_<name>)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


class MemFlag(enum.IntFlag):
    """kvm_userspace_memory_region.flags (KVM_MEM_<name>)."""

    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1


class IrqfdFlag(enum.IntFlag):
    """kvm_irqfd.flags (KVM_IRQFD_FLAG_<name>)."""

    DEASSIGN = 1 << 0
    RESAMPLE = 1 << 1


class IoeventfdFlag(enum.IntFlag):
    """kvm_ioeventfd.flags (KVM_IOEVENTFD_FLAG_<name>)."""

    DATAMATCH = 1 << 0
    PIO = 1 << 1
    DEASSIGN = 1 << 2


class IrqRoutingType(enum.IntEnum):
    """kvm_irq_routing_entry.type (KVM_IRQ_ROUTING_<name>)."""

    IRQCHIP = 1
    MSI = 2


class Irqchip(enum.IntEnum):
    """kvm_irq_routing_irqchip.irqchip (KVM_IRQCHIP_<name>)."""

    PIC_MASTER = 0
    PIC_SLAVE = 1
    IOAPIC = 2


class GuestDebugFlag(enum.IntFlag):
    """kvm_guest_debug.control (KVM_GUESTDBG_<name>)."""

    ENABLE = 0x00000001
    SINGLESTEP = 0x00000002
    USE_SW_BP = 0x00010000
    USE_HW_BP = 0x00020000
    INJECT_DB = 0x00040000
    INJECT_BP = 0x00080000
    BLOCKIRQ = 0x00100000


class VcpuEventValid(enum.IntFlag):
    """kvm_vcpu_events.flags (KVM_VCPUEVENT_VALID_<name>)."""

    NMI_PENDING = 0x00000001
    SIPI_VECTOR = 0x00000002
    SHADOW = 0x00000004
    SMM = 0x00000008
    PAYLOAD = 0x00000010
    TRIPLE_FAULT = 0x00000020


# kvm_pit_config.flags
KVM_PIT_SPEAKER_DUMMY = 1

#: kvm_run.kvm_valid_regs: KVM copies struct kvm_regs into kvm_run.s at each exit.
KVM_SYNC_X86_REGS = 1 << 0


# Header macro prefix of each enum's members (``Cap.IRQCHIP`` is
# ``KVM_CAP_IRQCHIP``): lets the ABI test check every value against the header.
HEADER_PREFIXES: dict[type[enum.IntEnum] | type[enum.IntFlag], str] = {
    Cap: "KVM_CAP_",
    ExitReason: "KVM_EXIT_",
    InternalErrorSuberror: "KVM_INTERNAL_ERROR_",
    IoDirection: "KVM_EXIT_IO_",
    SystemEvent: "KVM_SYSTEM_EVENT_",
    MpState: "KVM_MP_STATE_",
    MemFlag: "KVM_MEM_",
    IrqfdFlag: "KVM_IRQFD_FLAG_",
    IoeventfdFlag: "KVM_IOEVENTFD_FLAG_",
    IrqRoutingType: "KVM_IRQ_ROUTING_",
    Irqchip: "KVM_IRQCHIP_",
    GuestDebugFlag: "KVM_GUESTDBG_",
    VcpuEventValid: "KVM_VCPUEVENT_VALID_",
}

# Plain constants checked the same way (header macro name -> value here).
HEADER_SCALARS: dict[str, int] = {
    "KVMIO": KVMIO,
    "KVM_API_VERSION": KVM_API_VERSION,
    "KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES":
        KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    "KVM_PIT_SPEAKER_DUMMY": KVM_PIT_SPEAKER_DUMMY,
    "KVM_SYNC_X86_REGS": KVM_SYNC_X86_REGS,
}
