"""The cffi declarations and computed ioctl numbers match the system's <linux/kvm.h>.

A C program is generated from the same tables the package uses
(``IOCTLS``, ``_abi.CHECKED_FIELDS``, ``constants.HEADER_PREFIXES``),
compiled with the system compiler and run; every number it prints must equal
what the package computes.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from microvmm.kvm import _abi, _build_ffi
from microvmm.kvm._ffi import ffi
from microvmm.kvm.constants import HEADER_PREFIXES, HEADER_SCALARS, IOCTLS, Ioctl

CC = shutil.which("gcc") or shutil.which("cc")


def _field_type(struct: str, path: str):
    """cffi type of a dotted field path (anonymous-union members are flattened)."""
    ctype = ffi.typeof(struct)
    for part in path.split("."):
        ctype = dict(ctype.fields)[part].type
    return ctype


def _is_flexible_array(ctype) -> bool:
    return ctype.kind == "array" and ctype.length is None


def _expected() -> dict[str, int]:
    """Every number the package uses, keyed as the C program prints it."""
    values: dict[str, int] = {}
    for name, *_ in IOCTLS:
        values[name] = int(Ioctl[name])
    for struct, paths in _abi.CHECKED_FIELDS.items():
        values[f"sizeof {struct}"] = ffi.sizeof(struct)
        for path in paths:
            values[f"offsetof {struct} {path}"] = ffi.offsetof(struct, *path.split("."))
            ctype = _field_type(struct, path)
            if not _is_flexible_array(ctype):
                values[f"sizeof {struct} {path}"] = ffi.sizeof(ctype)
    for enum_cls, prefix in HEADER_PREFIXES.items():
        for member in enum_cls:
            values[prefix + member.name] = int(member)
    values.update(HEADER_SCALARS)
    return values


def _c_program(keys: list[str]) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for key in keys:
        words = key.split(" ")
        if words[0] == "offsetof":
            expr = f"offsetof({words[1]} {words[2]}, {words[3]})"
        elif words[0] == "sizeof" and len(words) == 3:
            expr = f"sizeof({words[1]} {words[2]})"
        elif words[0] == "sizeof":
            expr = f"sizeof((({words[1]} {words[2]} *)0)->{words[3]})"
        else:
            expr = key
        lines.append(f'    printf("%s=%llu\\n", "{key}", (unsigned long long)({expr}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header_values(tmp_path_factory) -> dict[str, int]:
    if CC is None:
        pytest.skip("no C compiler (gcc/cc) to read <linux/kvm.h> with")
    keys = sorted(_expected())
    workdir = tmp_path_factory.mktemp("kvm_abi")
    source = workdir / "kvm_abi.c"
    binary = workdir / "kvm_abi"
    source.write_text(_c_program(keys))
    subprocess.run([CC, "-Wall", "-Werror", "-o", str(binary), str(source)], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, number = line.rpartition("=")
        values[key] = int(number)
    assert sorted(values) == keys
    return values


def test_every_number_matches_the_header(header_values):
    expected = _expected()
    mismatches = {key: (expected[key], header_values[key])
                  for key in expected if expected[key] != header_values[key]}
    assert not mismatches, f"package vs <linux/kvm.h>: {mismatches}"


def test_the_check_covers_every_ioctl_and_struct(header_values):
    # Guard against the tables silently shrinking: every Ioctl member is
    # checked, and so is every struct the ioctls pass.
    assert {m.name for m in Ioctl} <= set(header_values)
    for _name, _direction, _nr, ctype in IOCTLS:
        if ctype is not None and ctype.startswith("struct "):
            assert f"sizeof {ctype}" in header_values


def test_kvm_run_union_views_are_where_the_kernel_puts_them(header_values):
    # The views the VMM's exit handling reads, spelled out.
    for path in ("io.data_offset", "mmio.data", "emulation_failure.insn_bytes",
                 "internal.data", "system_event.data"):
        key = f"offsetof struct kvm_run {path}"
        assert header_values[key] == ffi.offsetof("struct kvm_run", *path.split("."))


def test_committed_out_of_line_module_is_current():
    committed = _build_ffi.MODULE_PATH.read_text()
    assert committed == _build_ffi.generate(), (
        "microvmm/kvm/_kvm_cffi.py is stale: run python3 -m microvmm.kvm._build_ffi")


def test_out_of_line_module_is_the_one_in_use():
    from microvmm.kvm import _kvm_cffi
    assert ffi is _kvm_cffi.ffi


def test_in_line_fallback_gives_the_same_layouts_and_numbers():
    # If the committed module cannot be loaded, _ffi parses CDEF in-line;
    # the ioctl numbers computed from it must be the same.
    script = (
        "import sys, json\n"
        "sys.modules['microvmm.kvm._kvm_cffi'] = None  # makes its import fail\n"
        "from microvmm.kvm import _ffi\n"
        "from microvmm.kvm.constants import Ioctl\n"
        "assert type(_ffi.ffi).__module__.startswith('cffi'), type(_ffi.ffi)\n"
        "print(json.dumps({m.name: int(m) for m in Ioctl}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                            text=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert json.loads(result.stdout) == {m.name: int(m) for m in Ioctl}
    assert "parsing declarations in-line" in result.stderr
