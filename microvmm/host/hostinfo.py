"""What kind of KVM this is, and the workarounds an emulating host needs.

Hardware KVM (vmx/svm) needs nothing here. A software hypervisor such as
kvm_pvm emulates guest kernel code and fails on some instructions; the
workarounds below are what made a stock Linux guest reach user space on such a
host (see docs/host-kvm.md). They are applied visibly and can be turned off.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from microvmm.boot.cpuid import KvmPvFeature

logger = logging.getLogger(__name__)


class HostKind(enum.Enum):
    HARDWARE = "hardware"
    EMULATING = "emulating"


# CPU features whose instructions the emulating host cannot execute in guest
# kernel mode, hidden from Linux so it never patches them in: (the name
# /proc/cpuinfo shows, Linux's X86_FEATURE number = 32 * word + bit from
# arch/x86/include/asm/cpufeatures.h). The kernel reads clearcpuid= into a
# 128-byte buffer (cpu_parse_early_param, Linux 6.1) and honours only the last
# clearcpuid= given, so the names (~300 characters) were cut off at "clflus"
# and every later feature stayed visible. Bit numbers (accepted by every Linux
# that has clearcpuid) fit; the words they index hold CPUID registers and do
# not move between kernel versions. The kernel logs them by name
# ("Clearing CPUID bits: pni pclmulqdq ...").
#
# erms and fsrm are deliberately NOT here: without them Linux's memmove uses
# an unrolled loop that this host mis-executes (it overran its buffer and
# corrupted the direct-map page tables), while `rep movsb` works.
EMULATING_HOST_CLEARCPUID_FEATURES: tuple[tuple[str, int], ...] = (
    ("pdpe1gb", 58), ("pni", 128), ("pclmulqdq", 129), ("ssse3", 137), ("cx16", 141),
    ("pcid", 145), ("sse4_1", 147), ("sse4_2", 148), ("x2apic", 149), ("movbe", 150),
    ("popcnt", 151), ("aes", 153), ("f16c", 157), ("rdrand", 158), ("abm", 197),
    ("misalignsse", 199), ("3dnowprefetch", 200), ("fsgsbase", 288), ("bmi1", 291),
    ("smep", 295), ("bmi2", 296), ("invpcid", 298), ("rdseed", 306), ("adx", 307),
    ("smap", 308), ("clflushopt", 311), ("clwb", 312), ("sha_ni", 317), ("umip", 514),
    ("rdpid", 534),
)
# `noxsave` clears XSAVE and with it (arch/x86/kernel/cpu/cpuid-deps.c) every
# feature that depends on it: these need no clearcpuid= entry.
NOXSAVE_HIDES = ("xsave", "xsaveopt", "xsavec", "xsaves", "avx", "avx2", "fma", "pku")
#: Every feature the workarounds hide from an emulating host's guest.
EMULATING_HOST_HIDDEN_FEATURES = tuple(sorted(
    NOXSAVE_HIDES + tuple(name for name, _ in EMULATING_HOST_CLEARCPUID_FEATURES)))
EMULATING_HOST_CLEARCPUID = ",".join(str(bit) for _, bit in EMULATING_HOST_CLEARCPUID_FEATURES)
#: Linux copies clearcpuid's value into `char arg[128]`: longer values are cut.
CLEARCPUID_MAX_LENGTH = 127


# KVM paravirt features a Linux guest uses through hypercalls (`vmcall`):
# on kvm_pvm a hypercall never completes (the vCPU stays on the vmcall: seen
# for KVM_HC_SEND_IPI in an SMP boot, and for any hypercall number in
# tests/test_kvm_run.py), so an SMP guest hangs at its first PV IPI. Hidden
# from the guest, it sends IPIs through its APIC and never yields or kicks by
# hypercall. (Only SMP guests use these: a 1-vCPU boot is unchanged.)
EMULATING_HOST_HIDDEN_KVM_FEATURES = (
    KvmPvFeature.PV_SEND_IPI        # KVM_HC_SEND_IPI
    | KvmPvFeature.PV_SCHED_YIELD   # KVM_HC_SCHED_YIELD, when an IPI's target is preempted
    | KvmPvFeature.PV_UNHALT        # KVM_HC_KICK_CPU (paravirt spinlocks)
)


@dataclass(frozen=True)
class HostQuirks:
    """Workarounds to apply for this host; all off on hardware KVM."""

    kind: HostKind
    reason: str
    cmdline_additions: tuple[str, ...] = ()
    #: Inject #BP when `int3` fails emulation (Linux's int3 self-test).
    inject_bp_on_int3: bool = False
    #: Step over `fwait` when it fails emulation (it only checks x87 exceptions).
    skip_fwait: bool = False
    #: Decompress a bzImage's payload on the host and boot its ELF: the
    #: kernel's own decompressor would run emulated (~20 s for LZ4, minutes for XZ).
    decompress_bzimage_on_host: bool = False
    #: KVM paravirt features withheld from the guest (CPUID 0x4000_0001).
    hidden_kvm_pv_features: KvmPvFeature = KvmPvFeature(0)
    #: The rows of HOST_QUIRK_TABLE that were applied, in table order.
    applied: tuple["HostQuirk", ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def active(self) -> bool:
        return self.kind is HostKind.EMULATING and (
            bool(self.cmdline_additions) or self.inject_bp_on_int3 or self.skip_fwait
            or self.decompress_bzimage_on_host or bool(self.hidden_kvm_pv_features))

    def describe(self) -> list[str]:
        """One line per applied workaround: its name and what it does."""
        return [f"{quirk.name}: {quirk.message}" for quirk in self.applied]


@dataclass(frozen=True)
class HostQuirk:
    """One host workaround as data: which hosts need it, what it sets, what it says.

    `action` names HostQuirks fields and the values this row gives them
    (tuples are appended to, everything else is set), so a new workaround is
    a new row here plus the code that reads its field.
    """

    name: str
    #: Detection: the host kinds (from detect_host_kind) that get this row.
    hosts: frozenset[HostKind]
    action: tuple[tuple[str, object], ...]
    #: What is announced when it is applied (and listed by check-host).
    message: str


_EMULATING = frozenset({HostKind.EMULATING})

#: Every host workaround microvmm knows. Order is the order they are announced.
HOST_QUIRK_TABLE: tuple[HostQuirk, ...] = (
    HostQuirk("cmdline", _EMULATING, (("cmdline_additions", (
        "noxsave", "nogbpages", "mitigations=off", "tsc=reliable", "lpj=2000000",
        f"clearcpuid={EMULATING_HOST_CLEARCPUID}")),),
        "extra kernel command line options (noxsave, nogbpages, mitigations=off, "
        "tsc=reliable, lpj=, clearcpuid= for the instructions the host cannot emulate)"),
    HostQuirk("int3-as-bp", _EMULATING, (("inject_bp_on_int3", True),),
              "#BP injected for an int3 the host fails to emulate"),
    HostQuirk("skip-fwait", _EMULATING, (("skip_fwait", True),),
              "an fwait the host fails to emulate is stepped over"),
    HostQuirk("host-decompress", _EMULATING, (("decompress_bzimage_on_host", True),),
              "a bzImage's payload is decompressed on the host and booted as its ELF"),
    HostQuirk("hide-pv-hypercalls", _EMULATING,
              (("hidden_kvm_pv_features", EMULATING_HOST_HIDDEN_KVM_FEATURES),),
              "KVM PV features using hypercalls hidden: "
              f"{EMULATING_HOST_HIDDEN_KVM_FEATURES.name} (the host never completes a vmcall)"),
)


def detect_host_kind(sys_module: Path = Path("/sys/module"),
                     cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[HostKind, str]:
    if (sys_module / "kvm_pvm").exists():
        return HostKind.EMULATING, "kvm_pvm (software KVM) is loaded"
    try:
        flags = cpuinfo.read_text()
    except OSError:
        flags = ""
    if flags and " vmx" not in flags and " svm" not in flags:
        return HostKind.EMULATING, "the CPU shows no vmx/svm flag"
    return HostKind.HARDWARE, "hardware virtualization"


@dataclass(frozen=True)
class KvmDeviceStatus:
    """Whether `microvmm run` could use the KVM device, as check-host reports it."""

    path: str
    usable: bool
    detail: str
    api_version: int | None = None

    @property
    def summary(self) -> str:
        if self.usable:
            return f"{self.path}: usable (KVM API version {self.api_version})"
        return f"{self.path}: not usable: {self.detail}"


def check_kvm_device(path: str = "/dev/kvm") -> KvmDeviceStatus:
    """Open the device and ask its API version, exactly as a run starts."""
    from microvmm.kvm import Kvm, KvmUnavailableError  # deferred: cffi
    try:
        kvm = Kvm(path)
    except KvmUnavailableError as err:
        return KvmDeviceStatus(path, False, f"{err.strerror}: {err.fix}")
    try:
        return KvmDeviceStatus(path, True, "opens read-write", kvm.api_version)
    finally:
        kvm.close()


def host_quirks(kind: HostKind, reason: str, enabled: bool = True,
                table: tuple[HostQuirk, ...] = HOST_QUIRK_TABLE) -> HostQuirks:
    """The workarounds this host gets: every table row whose detection matches."""
    if not enabled:
        return HostQuirks(kind, reason)
    settings: dict[str, object] = {}
    applied = []
    for quirk in table:
        if kind not in quirk.hosts:
            continue
        applied.append(quirk)
        for name, value in quirk.action:
            if name not in _QUIRK_FIELDS:
                raise ValueError(f"host quirk {quirk.name!r} sets unknown field {name!r}")
            settings[name] = settings.get(name, ()) + value if isinstance(value, tuple) else value
    return HostQuirks(kind, reason, applied=tuple(applied), **settings)


_QUIRK_FIELDS = frozenset(HostQuirks.__dataclass_fields__) - {"kind", "reason", "applied", "notes"}


def emulated_smp_note(vcpus: int, host_cpus: int | None) -> str | None:
    """What a user of an emulating host should know before an SMP boot, or None.

    Every vCPU is emulated and takes its guest's timer ticks in host time:
    measured on 2 shared cores, --cpus 2 took 2.5-3x a 1-vCPU boot, and
    --cpus 4 spent all its time in scheduler ticks (no progress in 25 min)
    while other jobs kept the cores busy."""
    if vcpus <= 1:
        return None
    cores = f"{host_cpus} host CPUs" if host_cpus else "the host's CPUs"
    return (f"{vcpus} vCPUs on {cores}: each vCPU is emulated and handles its timer ticks in "
            "host time, so an SMP boot takes several times longer here, and more vCPUs than "
            "idle host CPUs can leave the guest doing nothing but timer ticks")


def merge_cmdline(cmdline: str, additions: tuple[str, ...]) -> str:
    """Append additions whose key the user did not set already.

    Linux passes everything after a bare `--` to init, so additions go before
    it, and init's arguments do not count as keys the user set.
    """
    kernel_part, *init_part = re.split(r"(?:^|\s)--(?:\s|$)", cmdline, maxsplit=1)
    present = {token.split("=", 1)[0] for token in kernel_part.split()}
    extra = [token for token in additions if token.split("=", 1)[0] not in present]
    merged = " ".join([kernel_part.strip(), *extra]).strip()
    if init_part:
        merged = f"{merged} -- {init_part[0].strip()}".strip()
    return merged
