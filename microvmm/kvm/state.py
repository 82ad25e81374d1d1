"""vCPU state as dataclasses, with cheap conversion to and from cffi structs.

Conversions copy fields by name from precomputed tuples: a get_regs() plus
conversion costs a few microseconds, fine for a ~100 Hz sampling profiler.
Pending events (struct kvm_vcpu_events) live in kvm/events.py: nothing needs
them before a guest runs, and each dataclass costs start-up time to create.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields

from microvmm.kvm._ffi import ffi


def field_names(cls) -> tuple[str, ...]:
    """A dataclass's field names in order (for by-name struct copies)."""
    return tuple(f.name for f in fields(cls))


@dataclass
class Regs:
    """General-purpose registers (struct kvm_regs)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2  # bit 1 is reserved and always set

    @classmethod
    def from_c(cls, c) -> "Regs":
        return cls(*[getattr(c, n) for n in _REGS_NAMES])

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "Regs":
        """From the raw bytes of a struct kvm_regs (e.g. a copy of the
        registers KVM synced into kvm_run at an exit)."""
        return cls(*_REGS_LAYOUT.unpack_from(data))

    def to_bytes(self) -> bytes:
        """The raw bytes of the struct kvm_regs these registers make."""
        return _REGS_LAYOUT.pack(*[getattr(self, n) for n in _REGS_NAMES])

    def to_c(self, c) -> None:
        for n in _REGS_NAMES:
            setattr(c, n, getattr(self, n))


_REGS_NAMES = field_names(Regs)
_REGS_LAYOUT = struct.Struct(f"<{len(_REGS_NAMES)}Q")  # struct kvm_regs: 18 u64 in field order


@dataclass
class Segment:
    """A segment register's hidden state (struct kvm_segment)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the kernel's field name (64-bit code segment)
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @classmethod
    def from_c(cls, c) -> "Segment":
        return cls(c.base, c.limit, c.selector, c.type, c.present, c.dpl, c.db, c.s,
                   c.l, c.g, c.avl, c.unusable)

    def to_c(self, c) -> None:
        for n in _SEGMENT_NAMES:
            setattr(c, n, getattr(self, n))
        c.padding = 0


_SEGMENT_NAMES = field_names(Segment)


@dataclass
class DTable:
    """A descriptor-table register, GDTR or IDTR (struct kvm_dtable)."""

    base: int = 0
    limit: int = 0xFFFF

    @classmethod
    def from_c(cls, c) -> "DTable":
        return cls(c.base, c.limit)

    def to_c(self, c) -> None:
        c.base = self.base
        c.limit = self.limit


_SEGMENT_REGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_DTABLE_REGS = ("gdt", "idt")
_SREGS_SCALARS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@dataclass
class Sregs:
    """Special registers (struct kvm_sregs)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    # Pending external interrupt as a 256-bit map (at most one bit set).
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    @classmethod
    def from_c(cls, c) -> "Sregs":
        seg = Segment.from_c
        dt = DTable.from_c
        return cls(seg(c.cs), seg(c.ds), seg(c.es), seg(c.fs), seg(c.gs), seg(c.ss),
                   seg(c.tr), seg(c.ldt), dt(c.gdt), dt(c.idt), c.cr0, c.cr2, c.cr3,
                   c.cr4, c.cr8, c.efer, c.apic_base, tuple(c.interrupt_bitmap))

    def to_c(self, c) -> None:
        for n in _SEGMENT_REGS:
            getattr(self, n).to_c(getattr(c, n))
        for n in _DTABLE_REGS:
            getattr(self, n).to_c(getattr(c, n))
        for n in _SREGS_SCALARS:
            setattr(c, n, getattr(self, n))
        if len(self.interrupt_bitmap) != 4:
            raise ValueError("interrupt_bitmap must have 4 words")
        c.interrupt_bitmap = list(self.interrupt_bitmap)


@dataclass
class Fpu:
    """x87/SSE state (struct kvm_fpu). The defaults are the reset state
    (FCW 0x37f, MXCSR 0x1f80), so ``vcpu.set_fpu(Fpu())`` initialises the FPU.

    KVM_GET_FPU/KVM_SET_FPU do not transfer ``mxcsr`` (KVM ignores it and
    reports 0); the kernel initialises a new vCPU's MXCSR to 0x1f80."""

    fpr: bytes = bytes(128)  # 8 registers x 16 bytes (FXSAVE layout)
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0  # abridged tag word, FXSAVE format
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: bytes = bytes(256)  # 16 registers x 16 bytes
    mxcsr: int = 0x1F80

    @classmethod
    def from_c(cls, c) -> "Fpu":
        return cls(bytes(ffi.buffer(c.fpr)), c.fcw, c.fsw, c.ftwx, c.last_opcode,
                   c.last_ip, c.last_dp, bytes(ffi.buffer(c.xmm)), c.mxcsr)

    def to_c(self, c) -> None:
        if len(self.fpr) != 128 or len(self.xmm) != 256:
            raise ValueError("fpr must be 128 bytes and xmm 256 bytes")
        ffi.buffer(c.fpr)[:] = self.fpr
        ffi.buffer(c.xmm)[:] = self.xmm
        c.fcw = self.fcw
        c.fsw = self.fsw
        c.ftwx = self.ftwx
        c.last_opcode = self.last_opcode
        c.last_ip = self.last_ip
        c.last_dp = self.last_dp
        c.mxcsr = self.mxcsr


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf (struct kvm_cpuid_entry2)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @classmethod
    def from_c(cls, c) -> "CpuidEntry":
        return cls(c.function, c.index, c.flags, c.eax, c.ebx, c.ecx, c.edx)

    def to_c(self, c) -> None:
        c.function = self.function
        c.index = self.index
        c.flags = self.flags
        c.eax = self.eax
        c.ebx = self.ebx
        c.ecx = self.ecx
        c.edx = self.edx
