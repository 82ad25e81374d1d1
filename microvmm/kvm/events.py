"""Pending and injected vCPU events (struct kvm_vcpu_events) as dataclasses.

Apart from kvm/state.py because only a running guest needs them (the #BP
injection workaround, diagnostics): importing them costs start-up time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from microvmm.kvm.state import field_names


@dataclass
class ExceptionEvent:
    """kvm_vcpu_events.exception."""

    injected: int = 0
    nr: int = 0
    has_error_code: int = 0
    pending: int = 0
    error_code: int = 0


@dataclass
class InterruptEvent:
    """kvm_vcpu_events.interrupt."""

    injected: int = 0
    nr: int = 0
    soft: int = 0
    shadow: int = 0


@dataclass
class NmiEvent:
    """kvm_vcpu_events.nmi."""

    injected: int = 0
    pending: int = 0
    masked: int = 0


@dataclass
class SmiEvent:
    """kvm_vcpu_events.smi."""

    smm: int = 0
    pending: int = 0
    smm_inside_nmi: int = 0
    latched_init: int = 0


# (kvm_vcpu_events member, dataclass, its field names)
_EVENT_PARTS = tuple(
    (name, cls, field_names(cls))
    for name, cls in (("exception", ExceptionEvent), ("interrupt", InterruptEvent),
                      ("nmi", NmiEvent), ("smi", SmiEvent)))


@dataclass
class VcpuEvents:
    """Pending/injected exceptions, interrupts, NMI and SMI (struct kvm_vcpu_events).

    ``flags`` (VcpuEventValid) says which optional parts KVM_SET_VCPU_EVENTS
    should apply; get + modify + set keeps the kernel's own flags.
    """

    exception: ExceptionEvent = field(default_factory=ExceptionEvent)
    interrupt: InterruptEvent = field(default_factory=InterruptEvent)
    nmi: NmiEvent = field(default_factory=NmiEvent)
    sipi_vector: int = 0
    flags: int = 0
    smi: SmiEvent = field(default_factory=SmiEvent)
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0

    @classmethod
    def from_c(cls, c) -> "VcpuEvents":
        parts = {}
        for name, part_cls, part_fields in _EVENT_PARTS:
            src = getattr(c, name)
            parts[name] = part_cls(*[getattr(src, f) for f in part_fields])
        return cls(sipi_vector=c.sipi_vector, flags=c.flags,
                   triple_fault_pending=c.triple_fault.pending,
                   exception_has_payload=c.exception_has_payload,
                   exception_payload=c.exception_payload, **parts)

    def to_c(self, c) -> None:
        for name, _part_cls, part_fields in _EVENT_PARTS:
            dst = getattr(c, name)
            src = getattr(self, name)
            for f in part_fields:
                setattr(dst, f, getattr(src, f))
        c.sipi_vector = self.sipi_vector
        c.flags = self.flags
        c.triple_fault.pending = self.triple_fault_pending
        c.exception_has_payload = self.exception_has_payload
        c.exception_payload = self.exception_payload
