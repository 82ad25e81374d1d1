"""Host detection (from a fake /sys/module and /proc/cpuinfo) and the emulating
host's workarounds: when they apply, and that they never override the user."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvmm.boot.cpuid import KvmPvFeature
from microvmm.host.hostinfo import (
    CLEARCPUID_MAX_LENGTH,
    EMULATING_HOST_CLEARCPUID,
    EMULATING_HOST_CLEARCPUID_FEATURES,
    EMULATING_HOST_HIDDEN_FEATURES,
    NOXSAVE_HIDES,
    HostKind,
    HostQuirks,
    detect_host_kind,
    emulated_smp_note,
    host_quirks,
    merge_cmdline,
)

CPUINFO_TEMPLATE = """processor\t: {n}
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 (SVM-less cloud vCPU)
flags\t\t: {flags}
bugs\t\t: sysret_ss_attrs spectre_v1
"""
PLAIN_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov sse sse2 ht syscall nx lm"


def fake_host(tmp_path: Path, modules: tuple[str, ...], flags: str | None) -> tuple[Path, Path]:
    sys_module = tmp_path / "sys-module"
    sys_module.mkdir()
    for name in modules:
        (sys_module / name / "parameters").mkdir(parents=True)
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text("\n".join(CPUINFO_TEMPLATE.format(n=n, flags=flags) for n in range(2)))
    return sys_module, cpuinfo


@pytest.mark.parametrize("modules, flags, kind", [
    (("kvm", "kvm_pvm"), PLAIN_FLAGS, HostKind.EMULATING),
    (("kvm", "kvm_pvm"), PLAIN_FLAGS + " vmx", HostKind.EMULATING),  # the module decides first
    (("kvm", "kvm_intel"), PLAIN_FLAGS + " vmx ept vpid", HostKind.HARDWARE),
    (("kvm", "kvm_amd"), PLAIN_FLAGS + " svm npt", HostKind.HARDWARE),
    (("kvm",), "vmx " + PLAIN_FLAGS, HostKind.HARDWARE),              # first flag in the list
    (("kvm",), PLAIN_FLAGS, HostKind.EMULATING),                      # no vmx/svm flag
])
def test_detect_host_kind(tmp_path, modules, flags, kind):
    sys_module, cpuinfo = fake_host(tmp_path, modules, flags)
    detected, reason = detect_host_kind(sys_module, cpuinfo)
    assert detected is kind
    assert reason
    if "kvm_pvm" in modules:
        assert "kvm_pvm" in reason
    elif kind is HostKind.EMULATING:
        assert "vmx" in reason and "svm" in reason


def test_pvm_module_alone_is_enough(tmp_path):
    sys_module, cpuinfo = fake_host(tmp_path, ("kvm_pvm",), None)  # no cpuinfo at all
    assert detect_host_kind(sys_module, cpuinfo)[0] is HostKind.EMULATING


def test_the_real_host_is_classified():
    kind, reason = detect_host_kind()
    assert kind in (HostKind.HARDWARE, HostKind.EMULATING) and reason
    if Path("/sys/module/kvm_pvm").exists():
        assert kind is HostKind.EMULATING


def _clearcpuid(quirks: HostQuirks) -> list[str]:
    (token,) = [t for t in quirks.cmdline_additions if t.startswith("clearcpuid=")]
    return token.split("=", 1)[1].split(",")


def test_quirks_on_an_emulating_host():
    quirks = host_quirks(HostKind.EMULATING, "kvm_pvm (software KVM) is loaded")
    assert quirks.active
    assert quirks.inject_bp_on_int3 and quirks.skip_fwait
    assert quirks.reason == "kvm_pvm (software KVM) is loaded"
    keys = {t.split("=", 1)[0] for t in quirks.cmdline_additions}
    assert {"noxsave", "nogbpages", "mitigations", "clearcpuid"} <= keys
    cleared = _clearcpuid(quirks)
    assert all(item.isdigit() for item in cleared), cleared  # bit numbers: short
    by_bit = {str(bit): name for name, bit in EMULATING_HOST_CLEARCPUID_FEATURES}
    hidden = {by_bit[item] for item in cleared} | set(NOXSAVE_HIDES)
    # Instructions this host's emulator fails on are hidden from the guest.
    assert {"xsave", "smap", "popcnt", "pdpe1gb", "clflushopt", "x2apic"} <= hidden
    assert hidden == set(EMULATING_HOST_HIDDEN_FEATURES)
    assert len(cleared) == len(set(cleared))
    assert len({name for name, _ in EMULATING_HOST_CLEARCPUID_FEATURES}) == len(cleared)
    # KVM paravirt features that work by hypercall are withheld (SMP guests hang otherwise).
    hidden_pv = quirks.hidden_kvm_pv_features
    assert hidden_pv == KvmPvFeature.PV_SEND_IPI | KvmPvFeature.PV_SCHED_YIELD | KvmPvFeature.PV_UNHALT


def test_clearcpuid_value_fits_the_kernels_buffer():
    """Linux 6.1 copies clearcpuid's value into `char arg[128]` and honours only
    the last clearcpuid=: anything past 127 characters was silently never hidden."""
    assert len(EMULATING_HOST_CLEARCPUID) <= CLEARCPUID_MAX_LENGTH
    token = next(t for t in host_quirks(HostKind.EMULATING, "x").cmdline_additions
                 if t.startswith("clearcpuid="))
    assert len(token.split("=", 1)[1]) <= CLEARCPUID_MAX_LENGTH


def test_feature_numbers_are_those_of_linux_cpufeatures():
    """A few anchors from arch/x86/include/asm/cpufeatures.h (word * 32 + bit)
    that the e2e test cannot tell apart by name alone."""
    numbers = dict(EMULATING_HOST_CLEARCPUID_FEATURES)
    assert numbers["pni"] == 4 * 32 + 0          # CPUID 1 ECX bit 0
    assert numbers["popcnt"] == 4 * 32 + 23
    assert numbers["x2apic"] == 4 * 32 + 21
    assert numbers["smap"] == 9 * 32 + 20        # CPUID 7.0 EBX bit 20
    assert numbers["pdpe1gb"] == 1 * 32 + 26     # CPUID 0x80000001 EDX bit 26
    assert numbers["umip"] == 16 * 32 + 2        # CPUID 7.0 ECX bit 2


def test_erms_and_fsrm_stay_visible():
    """Without ERMS/FSRM Linux's memmove takes an unrolled loop this host
    mis-executes (it corrupted the direct-map page tables: the page-fault loop
    in shared/HOST-KVM.md); with them it uses `rep movsb`, which works."""
    cleared = _clearcpuid(host_quirks(HostKind.EMULATING, "test"))
    erms, fsrm = 9 * 32 + 9, 18 * 32 + 4
    assert str(erms) not in cleared
    assert str(fsrm) not in cleared
    assert "erms" not in EMULATING_HOST_HIDDEN_FEATURES
    assert "fsrm" not in EMULATING_HOST_HIDDEN_FEATURES


@pytest.mark.parametrize("kind, enabled", [
    (HostKind.HARDWARE, True),
    (HostKind.HARDWARE, False),
    (HostKind.EMULATING, False),   # --no-host-workarounds
])
def test_no_quirks_on_hardware_or_when_disabled(kind, enabled):
    quirks = host_quirks(kind, "why", enabled=enabled)
    assert quirks.kind is kind
    assert quirks.cmdline_additions == ()
    assert not quirks.inject_bp_on_int3
    assert not quirks.skip_fwait
    assert not quirks.hidden_kvm_pv_features
    assert not quirks.active


ADDITIONS = ("noxsave", "nogbpages", "mitigations=off", "lpj=2000000",
             f"clearcpuid={EMULATING_HOST_CLEARCPUID}")


def test_merge_appends_the_workarounds():
    merged = merge_cmdline("console=ttyS0 reboot=k panic=-1", ADDITIONS)
    assert merged == "console=ttyS0 reboot=k panic=-1 " + " ".join(ADDITIONS)


def test_merge_never_overrides_a_key_the_user_set():
    user = "console=ttyS0 clearcpuid=sse4_2 mitigations=auto lpj=123 noxsave"
    merged = merge_cmdline(user, ADDITIONS)
    tokens = merged.split()
    assert tokens[:5] == user.split()          # the user's words, unchanged and first
    assert [t for t in tokens if t.startswith("clearcpuid=")] == ["clearcpuid=sse4_2"]
    assert [t for t in tokens if t.startswith("mitigations=")] == ["mitigations=auto"]
    assert [t for t in tokens if t.startswith("lpj=")] == ["lpj=123"]
    assert tokens.count("noxsave") == 1
    assert "nogbpages" in tokens                # what the user did not set is still added


def test_merge_with_nothing_to_add_and_odd_spacing():
    assert merge_cmdline("  console=ttyS0   quiet ", ()) == "console=ttyS0   quiet"
    assert merge_cmdline("", ("noxsave",)) == "noxsave"


def test_merge_keeps_workarounds_before_init_arguments():
    """Linux hands everything after a bare '--' to init: workarounds appended
    after it would never reach the kernel, and init's own words are not
    kernel keys the user set."""
    merged = merge_cmdline("console=ttyS0 -- noxsave single", ADDITIONS)
    kernel_part, sep, init_part = merged.partition(" -- ")
    assert sep
    assert init_part == "noxsave single"
    kernel_tokens = kernel_part.split()
    assert kernel_tokens[0] == "console=ttyS0"
    for addition in ADDITIONS:
        assert addition in kernel_tokens


def test_bzimage_payload_is_decompressed_on_the_host_only_when_emulating():
    assert host_quirks(HostKind.EMULATING, "kvm_pvm").decompress_bzimage_on_host
    assert not host_quirks(HostKind.EMULATING, "kvm_pvm", enabled=False).decompress_bzimage_on_host
    assert not host_quirks(HostKind.HARDWARE, "vmx").decompress_bzimage_on_host
    # That workaround alone makes the quirks active (announced at start).
    alone = HostQuirks(HostKind.EMULATING, "why", decompress_bzimage_on_host=True)
    assert alone.active


def test_hidden_kvm_features_alone_make_the_quirks_active():
    alone = HostQuirks(HostKind.EMULATING, "why", hidden_kvm_pv_features=KvmPvFeature.PV_SEND_IPI)
    assert alone.active


def test_smp_on_an_emulating_host_is_announced_with_its_cost():
    assert emulated_smp_note(1, 2) is None
    note = emulated_smp_note(4, 2)
    assert note.startswith("4 vCPUs on 2 host CPUs: each vCPU is emulated")
    assert "timer ticks" in note
    assert emulated_smp_note(2, None).startswith("2 vCPUs on the host's CPUs")


def test_every_workaround_comes_from_one_row_of_the_quirk_table():
    """The table is the one place a workaround is declared: what an emulating
    host gets is exactly the rows that detect it, and each row's action is
    what ends up set."""
    from microvmm.host.hostinfo import HOST_QUIRK_TABLE
    quirks = host_quirks(HostKind.EMULATING, "kvm_pvm")
    assert quirks.applied == tuple(q for q in HOST_QUIRK_TABLE if HostKind.EMULATING in q.hosts)
    assert len({q.name for q in HOST_QUIRK_TABLE}) == len(HOST_QUIRK_TABLE)
    for quirk in quirks.applied:
        for name, value in quirk.action:
            got = getattr(quirks, name)
            assert (set(value) <= set(got)) if isinstance(value, tuple) else got == value, quirk.name
    assert [line.split(":")[0] for line in quirks.describe()] == [q.name for q in quirks.applied]
    assert host_quirks(HostKind.HARDWARE, "vmx").describe() == []


def test_a_new_table_row_is_applied_and_a_bad_one_refused():
    from microvmm.host.hostinfo import HOST_QUIRK_TABLE, HostQuirk
    extra = HostQuirk("test-option", frozenset({HostKind.EMULATING}),
                      (("cmdline_additions", ("test_option=1",)),), "a test option")
    quirks = host_quirks(HostKind.EMULATING, "x", table=HOST_QUIRK_TABLE + (extra,))
    assert quirks.cmdline_additions[-1] == "test_option=1"
    assert "noxsave" in quirks.cmdline_additions           # earlier rows' additions kept
    assert quirks.describe()[-1] == "test-option: a test option"
    hardware_only = HostQuirk("hw", frozenset({HostKind.HARDWARE}), (("skip_fwait", True),), "hw")
    assert host_quirks(HostKind.HARDWARE, "vmx", table=(hardware_only,)).skip_fwait
    typo = HostQuirk("typo", frozenset({HostKind.EMULATING}), (("skip_fwiat", True),), "typo")
    with pytest.raises(ValueError, match="skip_fwiat"):
        host_quirks(HostKind.EMULATING, "x", table=(typo,))
