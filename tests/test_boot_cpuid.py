"""Per-vCPU CPUID derived from KVM's supported entries."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from microvmm.boot.cpuid import CpuidEntry, KvmPvFeature, vcpu_cpuid


@dataclass
class KvmEntry:  # stands in for the KVM binding's dataclass (same field names)
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


SUPPORTED = [
    KvmEntry(0x0, 0, 0, 0x1F, 0x68747541, 0x444D4163, 0x69746E65),
    KvmEntry(0x1, 0, 0, 0x00830F10, 0x00000800, 0x01202000, 0x178BFBFF),
    KvmEntry(0x4, 0, 1, 0x00000121, 0x01C0003F, 0x3F, 0),
    KvmEntry(0x4, 1, 1, 0x00000122, 0x01C0003F, 0x3F, 0),
    KvmEntry(0xB, 0, 1, 1, 2, 0x100, 7),
    KvmEntry(0xB, 1, 1, 4, 16, 0x201, 7),
    KvmEntry(0xB, 2, 1, 0, 0, 2, 7),
    KvmEntry(0x4000_0000, 0, 0, 0x4000_0001, 0x4B4D564B, 0x564B4D56, 0x4D),
    KvmEntry(0x4000_0001, 0, 0, 0x0100_7AFB, 0, 0, 0),
    KvmEntry(0x8000_0008, 0, 0, 0x3030, 0, 0x0000_700F, 0),
]


def by_key(entries):
    return {(e.function, e.index): e for e in entries}


def test_leaf1_identity_and_hypervisor_bit():
    for index in range(3):
        leaf1 = by_key(vcpu_cpuid(SUPPORTED, index, 3))[(1, 0)]
        assert leaf1.ebx >> 24 == index  # initial APIC id
        assert leaf1.ebx >> 16 & 0xFF == 3  # logical processors
        assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH size etc. kept
        assert leaf1.ecx == 0x01202000 | (1 << 31)
        assert leaf1.edx & (1 << 28)  # HTT with >1 logical processor
        assert leaf1.eax == 0x00830F10


def test_single_vcpu_clears_htt():
    leaf1 = by_key(vcpu_cpuid(SUPPORTED, 0, 1))[(1, 0)]
    assert not leaf1.edx & (1 << 28)
    assert leaf1.ebx >> 16 & 0xFF == 1


def test_extended_topology_leaf():
    entries = by_key(vcpu_cpuid(SUPPORTED, 2, 3))
    smt, core, end = entries[(0xB, 0)], entries[(0xB, 1)], entries[(0xB, 2)]
    assert (smt.eax, smt.ebx, smt.ecx >> 8 & 0xFF, smt.ecx & 0xFF, smt.edx) == (0, 1, 1, 0, 2)
    assert (core.eax, core.ebx, core.ecx >> 8 & 0xFF, core.ecx & 0xFF, core.edx) == (2, 3, 2, 1, 2)
    assert (end.ebx, end.ecx >> 8 & 0xFF, end.edx) == (0, 0, 2)


def test_core_count_fields():
    entries = by_key(vcpu_cpuid(SUPPORTED, 0, 3))
    assert entries[(0x4, 0)].eax >> 26 == 3  # 4 addressable core ids - 1
    assert entries[(0x4, 0)].eax & 0x03FF_FFFF == 0x121
    assert entries[(0x8000_0008, 0)].ecx == 0x7002


def test_kvm_leaves_and_others_untouched_and_input_not_modified():
    before = [KvmEntry(**vars(e)) for e in SUPPORTED]
    entries = vcpu_cpuid(SUPPORTED, 1, 2)
    assert [vars(e) for e in SUPPORTED] == [vars(e) for e in before]
    assert all(type(e) is KvmEntry for e in entries)
    assert not any(a is b for a, b in zip(entries, SUPPORTED))  # copies
    out = by_key(entries)
    for key in [(0, 0), (0x4000_0000, 0), (0x4000_0001, 0)]:
        assert vars(out[key]) == vars(by_key(SUPPORTED)[key])
    assert len(entries) == len(SUPPORTED)


def test_hidden_kvm_features_are_cleared_from_the_kvm_leaf_only():
    hidden = KvmPvFeature.PV_SEND_IPI | KvmPvFeature.PV_TLB_FLUSH
    supported = by_key(SUPPORTED)
    out = by_key(vcpu_cpuid(SUPPORTED, 0, 2, hidden_kvm_features=hidden))
    assert supported[(0x4000_0001, 0)].eax & hidden == hidden  # offered by "KVM"
    assert out[(0x4000_0001, 0)].eax == supported[(0x4000_0001, 0)].eax & ~int(hidden)
    for key in [(0, 0), (0x4000_0000, 0)]:
        assert vars(out[key]) == vars(supported[key])
    # Hiding a feature KVM does not offer changes nothing.
    absent = KvmPvFeature.MIGRATION_CONTROL
    assert not supported[(0x4000_0001, 0)].eax & absent
    assert vars(by_key(vcpu_cpuid(SUPPORTED, 0, 2, absent))[(0x4000_0001, 0)]) == vars(supported[(0x4000_0001, 0)])


def test_frozen_entries_left_as_they_are_are_not_copied():
    """The KVM binding's CpuidEntry is frozen: an unchanged leaf can be handed back
    itself (no copy per leaf at start-up); a changed one is a new entry of that type."""
    from microvmm.kvm import CpuidEntry as KvmCpuidEntry
    supported = [KvmCpuidEntry(**vars(e)) for e in SUPPORTED]
    out = vcpu_cpuid(supported, 1, 2)
    assert all(type(e) is KvmCpuidEntry for e in out)
    unchanged = [(a, b) for a, b in zip(supported, out) if a.function in (0, 0x4000_0000, 0x4000_0001)]
    assert unchanged and all(a is b for a, b in unchanged)
    leaf1 = next(i for i, e in enumerate(supported) if e.function == 1)
    assert out[leaf1] is not supported[leaf1] and out[leaf1] != supported[leaf1]
    assert supported[leaf1].ebx == 0x00000800  # input not modified


def test_bad_indices():
    with pytest.raises(ValueError):
        vcpu_cpuid(SUPPORTED, 2, 2)
    with pytest.raises(ValueError):
        vcpu_cpuid(SUPPORTED, 0, 0)


def test_dataclass_entries_keep_their_type():
    @dataclass
    class BindingEntry(KvmEntry):
        def to_c(self):  # what a KVM binding needs for KVM_SET_CPUID2
            return (self.function, self.ebx)

    supported = [BindingEntry(**vars(e)) for e in SUPPORTED]
    out = vcpu_cpuid(supported, 1, 2)
    assert all(type(e) is BindingEntry for e in out)
    leaf1 = by_key(out)[(1, 0)]
    assert leaf1.to_c() == (1, (1 << 24) | (2 << 16) | 0x0800)
    assert supported[1].ebx == 0x00000800  # input not modified


def test_plain_objects_become_cpuid_entries():
    class Plain:
        def __init__(self, e):
            self.__dict__.update(vars(e))

    out = vcpu_cpuid([Plain(e) for e in SUPPORTED], 0, 1)
    assert all(isinstance(e, CpuidEntry) for e in out)
