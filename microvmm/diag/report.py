"""Human-readable reports of a vCPU's state: registers, decoded instruction, symbols.

Pure formatting over plain dataclasses, so it is testable without KVM and the
same text serves fatal exits, SIGUSR1 "where are you" dumps and timeouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from microvmm.diag.symbols import KaslrSymbols, SymbolMap

_GPR_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# Where an x86 CPU starts after RESET/INIT: CS selector f000 (base ffff0000),
# IP fff0, real mode.
RESET_VECTOR_IP = 0xFFF0
RESET_CS_SELECTOR = 0xF000


@dataclass
class CpuSnapshot:
    """The architectural state worth printing, copied out of KVM."""

    index: int
    rip: int
    rflags: int
    gprs: dict[str, int]
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    cs_selector: int
    cs_long: bool
    cs_db: bool
    #: Bytes at RIP when they could be read (guest-physical after translation).
    code: bytes = b""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def mode_bits(self) -> int:
        """Decoding width: 64 in long mode, 32 in protected mode, else 16."""
        if self.cs_long and self.efer & (1 << 10):
            return 64
        if self.cr0 & 1:
            return 32 if self.cs_db else 16
        return 16

    @property
    def cpl(self) -> int:
        return self.cs_selector & 3


@dataclass
class LastSeen:
    """A vCPU's general registers at its last exit to the VMM before it
    stopped, as KVM synced them into kvm_run (no control or segment state)."""

    index: int
    rip: int
    rflags: int
    gprs: dict[str, int]
    #: The exit's reason ("io", "mmio", ...); None: the state the VMM set
    #: before the vCPU's first KVM_RUN (it stopped in that very first run).
    exit_name: str | None
    seconds_before: float


def is_reset_state(snapshot: CpuSnapshot) -> bool:
    """True if the vCPU holds the x86 reset state (real mode at f000:fff0).

    After KVM_EXIT_SHUTDOWN that means KVM reset the vCPU (AMD SVM clears the
    VMCB and INITs it: svm.c shutdown_interception), so the registers say
    nothing about where the guest faulted; VMX and kvm_pvm leave them as they
    were at the fault."""
    return (snapshot.rip == RESET_VECTOR_IP and snapshot.cs_selector == RESET_CS_SELECTOR
            and not snapshot.cr0 & 1)


def _gpr_rows(gprs: dict[str, int]) -> list[str]:
    regs = [f"{name.upper():>3}={gprs.get(name, 0):016x}" for name in _GPR_ORDER]
    return ["  " + " ".join(regs[row:row + 4]) for row in range(0, len(regs), 4)]


def format_last_seen(seen: LastSeen, symbols: SymbolMap | None = None) -> str:
    """Where the vCPU was last seen, saying when: the only position known once
    KVM has reset it."""
    where = symbols.describe(seen.rip) if symbols else f"{seen.rip:#x}"
    ms = seen.seconds_before * 1000
    if seen.exit_name is None:
        when = f"before its first KVM_RUN, {ms:.1f} ms before it stopped (the state the VMM set)"
    else:
        when = f"at its last exit to the VMM ({seen.exit_name}), {ms:.1f} ms before it stopped"
    lines = [f"vCPU {seen.index}: last seen at RIP {where} {when}"]
    lines += _gpr_rows(seen.gprs)
    lines.append(f"  RFLAGS={seen.rflags:08x} (control registers and mode: not recorded at exits)")
    return "\n".join(lines)


def decode_instruction(code: bytes, address: int, bits: int) -> str | None:
    """The first instruction of `code` in Intel syntax, or None if undecodable."""
    if not code:
        return None
    try:
        import capstone  # deferred: only diagnostics need it, and it is slow to import
    except ImportError:
        return None
    mode = {64: capstone.CS_MODE_64, 32: capstone.CS_MODE_32, 16: capstone.CS_MODE_16}[bits]
    decoder = capstone.Cs(capstone.CS_ARCH_X86, mode)
    for insn in decoder.disasm(code, address):
        return f"{insn.mnemonic} {insn.op_str}".strip() + f"  ({insn.bytes.hex(' ')})"
    return None


def format_snapshot(snapshot: CpuSnapshot, symbols: SymbolMap | KaslrSymbols | None = None) -> str:
    where = symbols.describe(snapshot.rip) if symbols else f"{snapshot.rip:#x}"
    lines = [f"vCPU {snapshot.index}: RIP {where}  CPL {snapshot.cpl}  {snapshot.mode_bits}-bit"]
    insn = decode_instruction(snapshot.code, snapshot.rip, snapshot.mode_bits)
    if insn:
        lines.append(f"  instruction: {insn}")
    elif snapshot.code:
        lines.append(f"  instruction bytes: {snapshot.code.hex(' ')} (not decodable)")
    lines += _gpr_rows(snapshot.gprs)
    lines.append(f"  RFLAGS={snapshot.rflags:08x} CR0={snapshot.cr0:08x} CR2={snapshot.cr2:016x}"
                 f" CR3={snapshot.cr3:016x} CR4={snapshot.cr4:08x} EFER={snapshot.efer:x}"
                 f" CS={snapshot.cs_selector:04x}")
    for key, value in snapshot.extra.items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)
