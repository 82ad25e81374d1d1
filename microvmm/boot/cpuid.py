"""Per-vCPU CPUID: KVM's supported entries with each vCPU's identity filled in.

KVM_GET_SUPPORTED_CPUID describes what KVM can offer, not one CPU: the
topology fields are the host's or zero. Each vCPU needs its own APIC id, and
all vCPUs must agree on one topology. The topology presented is the simplest:
one package of `num_vcpus` cores, one thread each, APIC id = vCPU index (the
same ids the MP table lists).

Changed, and nothing else:
- leaf 0x1: EBX[31:24] initial APIC id, EBX[23:16] logical processors per
  package, EDX bit 28 (HTT) iff more than one; ECX bit 31 hypervisor present.
- leaf 0x4 (Intel cache topology), every subleaf: EAX[31:26] = addressable core
  ids per package - 1 (the next power of two of num_vcpus, minus 1).
- leaves 0xB and 0x1F (extended topology), when KVM offers them: subleaf 0 =
  SMT level (1 thread), subleaf 1 = core level (num_vcpus), later subleaves
  invalid; EDX = x2APIC id.
- leaf 0x8000_0008 (AMD): ECX[7:0] = cores per package - 1.
- leaf 0x4000_0001 (KVM paravirt features), only when the caller hides some:
  EAX loses the `hidden_kvm_features` bits (a host workaround, hostinfo.py).
The other KVM paravirt leaves pass through unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, is_dataclass, replace
from typing import Iterable, Protocol


class CpuidLike(Protocol):
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class CpuidEntry:
    """One struct kvm_cpuid_entry2 (padding omitted)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_EXT_TOPOLOGY = 0xB
LEAF_EXT_TOPOLOGY_V2 = 0x1F
LEAF_AMD_SIZE_IDS = 0x8000_0008
LEAF_KVM_FEATURES = 0x4000_0001

LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28

TOPOLOGY_LEVEL_INVALID = 0
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2


class KvmPvFeature(enum.IntFlag):
    """CPUID 0x4000_0001 EAX: the KVM paravirt features a guest may use
    (KVM_FEATURE_<name> in Linux's arch/x86/include/uapi/asm/kvm_para.h)."""

    CLOCKSOURCE = 1 << 0
    NOP_IO_DELAY = 1 << 1
    MMU_OP = 1 << 2
    CLOCKSOURCE2 = 1 << 3
    ASYNC_PF = 1 << 4
    STEAL_TIME = 1 << 5
    PV_EOI = 1 << 6
    PV_UNHALT = 1 << 7
    PV_TLB_FLUSH = 1 << 9
    ASYNC_PF_VMEXIT = 1 << 10
    PV_SEND_IPI = 1 << 11
    POLL_CONTROL = 1 << 12
    PV_SCHED_YIELD = 1 << 13
    ASYNC_PF_INT = 1 << 14
    MSI_EXT_DEST_ID = 1 << 15
    HC_MAP_GPA_RANGE = 1 << 16
    MIGRATION_CONTROL = 1 << 17
    CLOCKSOURCE_STABLE_BIT = 1 << 24


def _apic_id_shift(count: int) -> int:
    """Bits of APIC id needed to number `count` units (CPUID 0xB EAX[4:0])."""
    return max(0, (count - 1).bit_length())


def _topology_subleaf(entry, apic_id: int, num_vcpus: int):
    if entry.index == 0:
        eax, ebx, level = 0, 1, TOPOLOGY_LEVEL_SMT
    elif entry.index == 1:
        eax, ebx, level = _apic_id_shift(num_vcpus), num_vcpus, TOPOLOGY_LEVEL_CORE
    else:
        eax, ebx, level = 0, 0, TOPOLOGY_LEVEL_INVALID
    return replace(entry, eax=eax, ebx=ebx, ecx=(level << 8) | (entry.index & 0xFF), edx=apic_id)


def vcpu_cpuid(supported: Iterable[CpuidLike], vcpu_index: int, num_vcpus: int,
               hidden_kvm_features: KvmPvFeature = KvmPvFeature(0)) -> list:
    """The CPUID entries for vCPU `vcpu_index` of `num_vcpus`, derived from KVM's supported list.

    `hidden_kvm_features` are cleared from the KVM paravirt feature leaf, so
    the guest never uses them.

    Accepts any objects with function/index/flags/eax/ebx/ecx/edx attributes
    and leaves them untouched. Dataclass entries (such as the KVM binding's
    CpuidEntry) come back as the same type, so they can go straight to
    KVM_SET_CPUID2: a frozen entry this leaves as it is comes back itself (it
    cannot change), any other one as a modified copy; other objects come back
    as this module's CpuidEntry.
    """
    if not 1 <= num_vcpus <= 255:
        raise ValueError(f"{num_vcpus} vCPUs: APIC ids here are 8-bit (1..255 vCPUs)")
    if not 0 <= vcpu_index < num_vcpus:
        raise ValueError(f"vCPU index {vcpu_index} is outside 0..{num_vcpus - 1}")
    apic_id = vcpu_index
    result = []
    for src in supported:
        if is_dataclass(src) and not isinstance(src, type):
            # Most leaves pass unchanged: no copy of an immutable one (start-up time).
            entry = src if type(src).__dataclass_params__.frozen else replace(src)
        else:
            entry = CpuidEntry(function=src.function, index=src.index, flags=src.flags,
                               eax=src.eax, ebx=src.ebx, ecx=src.ecx, edx=src.edx)
        if entry.function == LEAF_FEATURES:
            ebx = (entry.ebx & 0x0000_FFFF) | (num_vcpus << 16) | (apic_id << 24)
            edx = entry.edx | LEAF1_EDX_HTT if num_vcpus > 1 else entry.edx & ~LEAF1_EDX_HTT
            entry = replace(entry, ebx=ebx, ecx=entry.ecx | LEAF1_ECX_HYPERVISOR, edx=edx)
        elif entry.function == LEAF_CACHE_PARAMS:
            core_ids = min((1 << _apic_id_shift(num_vcpus)) - 1, 0x3F)  # 6-bit field
            entry = replace(entry, eax=(entry.eax & 0x03FF_FFFF) | (core_ids << 26))
        elif entry.function in (LEAF_EXT_TOPOLOGY, LEAF_EXT_TOPOLOGY_V2):
            entry = _topology_subleaf(entry, apic_id, num_vcpus)
        elif entry.function == LEAF_AMD_SIZE_IDS:
            entry = replace(entry, ecx=(entry.ecx & ~0xFF) | (num_vcpus - 1))
        elif entry.function == LEAF_KVM_FEATURES and entry.eax & hidden_kvm_features:
            entry = replace(entry, eax=entry.eax & ~int(hidden_kvm_features))
        result.append(entry)
    return result
