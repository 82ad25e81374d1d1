"""Diagnostics without KVM: System.map symbols and the vCPU report (real x86
bytes decoded with capstone, decoding width from the control registers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvmm.diag.report import CpuSnapshot, decode_instruction, format_snapshot
from microvmm.diag.symbols import Symbol, SymbolMap, SymbolMapError, find_system_map

SYSTEM_MAP = """\
0000000000000000 D __per_cpu_start
0000000000001000 D cpu_number
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81000070 t verify_cpu
ffffffff81001000 T do_one_initcall
ffffffff810010f0 W arch_cpu_idle
ffffffff81200040 T entry_SYSCALL_64
ffffffff81400000 D init_task
ffffffff81400800 r some_rodata
ffffffff81500000 B bss_thing
ffffffff81600000 w weak_function
garbage line
xyz T not_an_address
"""


@pytest.fixture
def system_map(tmp_path: Path) -> Path:
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    return path


def test_symbol_map_keeps_text_symbols_only(system_map):
    symbols = SymbolMap.from_file(system_map)
    for name in ("startup_64", "verify_cpu", "do_one_initcall", "arch_cpu_idle",
                 "entry_SYSCALL_64", "weak_function"):
        assert symbols.address_of(name) is not None, name
    for name in ("__per_cpu_start", "cpu_number", "init_task", "some_rodata", "bss_thing",
                 "not_an_address"):
        assert symbols.address_of(name) is None, name
    assert symbols.address_of("do_one_initcall") == 0xFFFFFFFF81001000


def test_lookup_exact_inside_and_before_the_first_symbol(system_map):
    symbols = SymbolMap.from_file(system_map)
    assert symbols.lookup(0xFFFFFFFF81200040) == Symbol("entry_SYSCALL_64", 0xFFFFFFFF81200040, 0)
    inside = symbols.lookup(0xFFFFFFFF81001018)
    assert inside == Symbol("do_one_initcall", 0xFFFFFFFF81001000, 0x18)
    assert str(inside) == "do_one_initcall+0x18"
    assert symbols.lookup(0xFFFFFFFF81000075).name == "verify_cpu"
    # A data symbol between two text symbols does not take over their range.
    assert symbols.lookup(0xFFFFFFFF81400010).name == "entry_SYSCALL_64"
    assert symbols.lookup(0xFFFFFFFF80FFFFFF) is None
    assert symbols.lookup(0x1000) is None  # user space / per-cpu offsets are not text
    # Past the last symbol: still the last one, with a (visibly) large offset.
    assert symbols.lookup(0xFFFFFFFF81700000) == Symbol("weak_function", 0xFFFFFFFF81600000, 0x100000)


def test_describe(system_map):
    symbols = SymbolMap.from_file(system_map)
    assert symbols.describe(0xFFFFFFFF81001018) == "0xffffffff81001018 <do_one_initcall+0x18>"
    assert symbols.describe(0x1234) == "0x1234"


def test_aliases_at_one_address_resolve_to_a_name_at_that_address(system_map):
    symbol = SymbolMap.from_file(system_map).lookup(0xFFFFFFFF81000010)
    assert symbol.name in ("_stext", "startup_64")
    assert symbol.offset == 0x10


def test_symbol_map_errors(tmp_path):
    with pytest.raises(SymbolMapError, match="cannot read"):
        SymbolMap.from_file(tmp_path / "missing.map")
    data_only = tmp_path / "data.map"
    data_only.write_text("ffffffff81400000 D init_task\n")
    with pytest.raises(SymbolMapError, match="no text symbols"):
        SymbolMap.from_file(data_only)
    with pytest.raises(SymbolMapError):
        SymbolMap([])


def test_find_system_map_beside_the_kernel(tmp_path, system_map):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"")
    assert find_system_map(kernel) == system_map


def test_find_system_map_in_a_build_tree(tmp_path):
    top = tmp_path / "linux"
    boot = top / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    (boot / "bzImage").write_bytes(b"")
    assert find_system_map(boot / "bzImage") is None
    (top / "System.map").write_text(SYSTEM_MAP)
    assert find_system_map(boot / "bzImage") == top / "System.map"
    assert find_system_map(str(boot / "bzImage")) == top / "System.map"


def test_find_system_map_none(tmp_path):
    (tmp_path / "images").mkdir()
    assert find_system_map(tmp_path / "images" / "vmlinux") is None


# -- instruction decoding and the report -------------------------------------

EFER_LMA = 1 << 10
CR0_PE = 1


def snapshot(**overrides) -> CpuSnapshot:
    values = dict(
        index=0, rip=0xFFFFFFFF81001018, rflags=0x246,
        gprs={"rax": 0x1122334455667788, "rsp": 0xFFFFC90000013E40, "r15": 0xF},
        cr0=0x80050033, cr2=0xFFFF888005A1AC00, cr3=0x180A000, cr4=0x6B0, efer=0xD01,
        cs_selector=0x10, cs_long=True, cs_db=False, code=bytes.fromhex("480fae2f"))
    values.update(overrides)
    return CpuSnapshot(**values)


@pytest.mark.parametrize("code, bits, text", [
    (bytes.fromhex("480fae2f"), 64, "xrstor64 ptr [rdi]"),
    (bytes.fromhex("0f0b"), 64, "ud2"),
    (bytes.fromhex("cc"), 64, "int3"),
    (bytes.fromhex("0f01ca"), 64, "clac"),
    (bytes.fromhex("f3480fb8c7"), 64, "popcnt rax, rdi"),
    (bytes.fromhex("9b"), 64, "wait"),
    (bytes.fromhex("65488b042500ac0100"), 64, "mov rax, qword ptr gs:[0x1ac00]"),
    (bytes.fromhex("b84200"), 16, "mov ax, 0x42"),       # 16-bit: imm16
    (bytes.fromhex("b842000000"), 32, "mov eax, 0x42"),  # 32-bit: imm32
])
def test_decode_real_instructions(code, bits, text):
    decoded = decode_instruction(code + b"\x90" * 4, 0x1000, bits)
    assert decoded is not None
    insn, _, raw = decoded.partition("  (")
    assert insn == text
    assert raw == code.hex(" ") + ")"


def test_decode_garbage_and_empty():
    assert decode_instruction(b"", 0, 64) is None
    assert decode_instruction(b"\x06", 0, 64) is None  # push es: invalid in 64-bit mode
    assert decode_instruction(b"\x48", 0, 64) is None  # a lone REX prefix


@pytest.mark.parametrize("overrides, bits", [
    ({}, 64),                                                        # long mode, L=1
    ({"cs_long": False, "cs_db": True}, 32),                         # compatibility mode
    ({"cs_long": True, "cs_db": True, "efer": 0}, 32),               # L ignored without LMA
    ({"cs_long": True, "cs_db": False, "efer": 0}, 16),
    ({"cs_long": False, "cs_db": True, "efer": 0, "cr0": CR0_PE}, 32),
    ({"cs_long": False, "cs_db": False, "efer": 0, "cr0": CR0_PE}, 16),  # 16-bit protected
    ({"cs_long": False, "cs_db": False, "efer": 0, "cr0": 0x60000010}, 16),  # real mode
    ({"cs_long": False, "cs_db": True, "efer": 0, "cr0": 0x60000010}, 16),   # real mode, D ignored
])
def test_mode_bits_from_cr0_efer_and_cs(overrides, bits):
    assert snapshot(**overrides).mode_bits == bits


def test_format_snapshot_long_mode_with_symbols(tmp_path):
    (tmp_path / "System.map").write_text(SYSTEM_MAP)
    symbols = SymbolMap.from_file(tmp_path / "System.map")
    text = format_snapshot(snapshot(extra={"exit": "emulation failure"}), symbols)
    lines = text.splitlines()
    assert lines[0] == "vCPU 0: RIP 0xffffffff81001018 <do_one_initcall+0x18>  CPL 0  64-bit"
    assert lines[1] == "  instruction: xrstor64 ptr [rdi]  (48 0f ae 2f)"
    assert lines[2] == ("  RAX=1122334455667788 RBX=0000000000000000 "
                        "RCX=0000000000000000 RDX=0000000000000000")
    assert lines[3].split()[3] == "RSP=ffffc90000013e40"
    assert lines[5].split()[3] == "R15=000000000000000f"
    assert lines[6] == ("  RFLAGS=00000246 CR0=80050033 CR2=ffff888005a1ac00 CR3=000000000180a000"
                        " CR4=000006b0 EFER=d01 CS=0010")
    assert lines[7] == "  exit: emulation failure"
    assert len(lines) == 8


def test_format_snapshot_real_mode_user_cpl_and_no_symbols():
    snap = snapshot(rip=0x1000, cr0=0x10, efer=0, cs_long=False, cs_db=False,
                    cs_selector=0x33, code=bytes.fromhex("0f0b"))
    lines = format_snapshot(snap).splitlines()
    assert lines[0] == "vCPU 0: RIP 0x1000  CPL 3  16-bit"
    assert lines[1] == "  instruction: ud2  (0f 0b)"


def test_format_snapshot_undecodable_and_missing_code():
    lines = format_snapshot(snapshot(code=b"\x06\x07")).splitlines()
    assert lines[1] == "  instruction bytes: 06 07 (not decodable)"
    lines = format_snapshot(snapshot(code=b"")).splitlines()
    assert lines[1].startswith("  RAX=")  # no instruction line at all


def test_format_snapshot_symbol_outside_text(tmp_path):
    (tmp_path / "System.map").write_text(SYSTEM_MAP)
    symbols = SymbolMap.from_file(tmp_path / "System.map")
    first = format_snapshot(snapshot(rip=0x401000), symbols).splitlines()[0]
    assert first.startswith("vCPU 0: RIP 0x401000  CPL 0")
