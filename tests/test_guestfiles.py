"""`run --add HOST[:GUEST]`: what the archive appended to the initramfs holds
(read back with the newc reader), where GUEST paths land, and the inputs
refused before anything starts (one error line naming the input, status 2)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import microvmm.vmm
from microvmm import cli
from microvmm.run.exitcodes import ExitCode
from microvmm.initramfs.guestfiles import AddError, build_added_archive, parse_add_spec, plan_added_files
from microvmm.initramfs.newc import EntryKind, read_newc

REPO = Path(__file__).resolve().parent.parent


def archive_of(*specs: str) -> dict[str, tuple[EntryKind, int, bytes]]:
    """{guest path: (kind, permission bits, data or link target)} of the archive built for `specs`."""
    entries = read_newc(build_added_archive(plan_added_files(list(specs))))
    return {e.path: (e.kind, e.permissions, e.data) for e in entries}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small selftest-like tree: an executable, a data file, a subdirectory, symlinks."""
    root = tmp_path / "suite"
    (root / "sub").mkdir(parents=True)
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "data.txt").write_bytes(b"data\n")
    (root / "data.txt").chmod(0o640)
    (root / "sub" / "setuid").write_bytes(b"x")
    (root / "sub" / "setuid").chmod(0o4711)
    (root / "sub").chmod(0o750)
    (root / "link").symlink_to("sub/setuid")
    (root / "abs").symlink_to("/etc/hostname")
    return root


def test_a_directory_keeps_its_modes_types_and_symlinks(tree):
    assert archive_of(str(tree)) == {
        "suite": (EntryKind.DIRECTORY, stat.S_IMODE(tree.stat().st_mode), b""),
        "suite/abs": (EntryKind.SYMLINK, 0o777, b"/etc/hostname"),
        "suite/data.txt": (EntryKind.FILE, 0o640, b"data\n"),
        "suite/link": (EntryKind.SYMLINK, 0o777, b"sub/setuid"),
        "suite/run.sh": (EntryKind.FILE, 0o755, b"#!/bin/sh\necho hi\n"),
        "suite/sub": (EntryKind.DIRECTORY, 0o750, b""),
        "suite/sub/setuid": (EntryKind.FILE, 0o4711, b"x"),
    }


def test_entries_are_owned_by_root_and_keep_their_mtime(tree):
    os.utime(tree / "data.txt", (1_700_000_000, 1_700_000_000))
    entries = {e.path: e for e in read_newc(build_added_archive(plan_added_files([str(tree)])))}
    assert entries["suite/data.txt"].mtime == 1_700_000_000
    assert {(e.uid, e.gid) for e in entries.values()} == {(0, 0)}


def test_guest_paths_default_explicit_into_directory_and_root(tree):
    assert set(archive_of(f"{tree}/run.sh")) == {"run.sh"}
    # Parents GUEST needs are made 0755; the file keeps its mode.
    assert archive_of(f"{tree}/run.sh:/opt/t/go") == {
        "opt": (EntryKind.DIRECTORY, 0o755, b""), "opt/t": (EntryKind.DIRECTORY, 0o755, b""),
        "opt/t/go": (EntryKind.FILE, 0o755, b"#!/bin/sh\necho hi\n")}
    assert set(archive_of(f"{tree}/data.txt:/opt/")) == {"opt", "opt/data.txt"}
    # A directory added as '/' merges into the guest's root (the root itself untouched).
    assert set(archive_of(f"{tree}/sub:/")) == {"setuid"}
    assert set(archive_of(f"{tree}/.")) == {"suite", "suite/abs", "suite/data.txt", "suite/link",
                                             "suite/run.sh", "suite/sub", "suite/sub/setuid"}


def test_a_symlink_on_the_command_line_is_followed(tree, tmp_path):
    (tmp_path / "tool").symlink_to(tree / "run.sh")
    assert archive_of(str(tmp_path / "tool")) == {"tool": (EntryKind.FILE, 0o755, b"#!/bin/sh\necho hi\n")}


def test_several_adds_merge_and_a_later_one_replaces(tree, tmp_path):
    other = tmp_path / "other.txt"
    other.write_bytes(b"other")
    other.chmod(0o600)
    found = archive_of(str(tree), f"{other}:/suite/data.txt")
    assert found["suite/data.txt"] == (EntryKind.FILE, 0o600, b"other")
    assert found["suite/run.sh"][2] == b"#!/bin/sh\necho hi\n"


def test_the_archive_is_what_the_kernel_unpacks_concatenated(tree):
    """newc members are 4-byte aligned: an archive appended to another one
    starts on a header boundary (Linux's unpacker needs that)."""
    blob = build_added_archive(plan_added_files([str(tree)]))
    assert len(blob) % 4 == 0 and blob.startswith(b"070701")


@pytest.mark.parametrize("spec, words", [
    ("{missing}", ["no such file or directory"]),
    ("{file}:relative/path", ["must be absolute"]),
    ("{file}:", ["must be absolute"]),
    ("{file}:/a/../etc/passwd", ["'..'"]),
    ("{file}:/a//b", ["'//'"]),
    (":/x", ["no host path"]),
    ("{file}:/", ["only a directory"]),
    ("{fifo}", ["is a fifo", "only files, directories and symlinks"]),
])
def test_bad_adds_are_refused_naming_the_input(tmp_path, spec, words):
    file = tmp_path / "f"
    file.write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo")
    text = spec.format(missing=tmp_path / "nope", file=file, fifo=tmp_path / "fifo")
    with pytest.raises(AddError) as info:
        plan_added_files([text])
    message = str(info.value)
    assert message.startswith(f"--add {text}: ")
    for word in words:
        assert word in message


def test_a_path_under_another_adds_file_is_refused(tree):
    with pytest.raises(AddError, match=r"/x/run.sh would be under /x, which --add .*:/x makes a file"):
        plan_added_files([f"{tree}/data.txt:/x", f"{tree}/run.sh:/x/"])


def test_parse_keeps_colons_in_the_host_path_when_guest_is_given():
    spec = parse_add_spec("/tmp/a:b:/guest")
    assert (str(spec.host), spec.guest) == ("/tmp/a:b", "/guest")


# -- the command line ---------------------------------------------------------------

@pytest.fixture
def kernel_files(tmp_path: Path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initramfs.cpio"
    kernel.write_bytes(b"\x7fELF not really")
    initrd.write_bytes(b"070701")
    return kernel, initrd


@pytest.fixture
def vmm_calls(monkeypatch, tmp_path):
    seen = []

    def fake_run_vm(config, preparation=None):
        if preparation is not None:
            preparation.close()
        seen.append(config)
        return 0

    monkeypatch.setattr(microvmm.vmm, "run_vm", fake_run_vm)
    monkeypatch.setenv("MICROVMM_IMAGES", str(tmp_path / "no-images"))
    return seen


def test_cli_add_reaches_the_config(tree, kernel_files, vmm_calls):
    kernel, initrd = kernel_files
    assert cli.main(["run", "--kernel", str(kernel), "--initrd", str(initrd),
                     "--add", f"{tree}/run.sh:/bin/run", "--add", str(tree / "sub"), "--", "/bin/run"]) == 0
    (config,) = vmm_calls
    assert [e.path for e in config.added_files] == ["bin", "bin/run", "sub", "sub/setuid"]


@pytest.mark.parametrize("guest", ["rel/x", "/a/../b"])
def test_cli_bad_add_is_one_line_and_status_2(tree, kernel_files, vmm_calls, capsys, guest):
    kernel, initrd = kernel_files
    status = cli.main(["run", "--kernel", str(kernel), "--initrd", str(initrd),
                       "--add", f"{tree}/run.sh:{guest}", "--", "true"])
    out, err = capsys.readouterr()
    assert status == ExitCode.USAGE and out == "" and vmm_calls == []
    assert len(err.splitlines()) == 1 and err.startswith(f"microvmm: error: --add {tree}/run.sh:{guest}: ")


def test_cli_unreadable_file_is_refused_before_anything_starts():
    """Run as an unprivileged user (root reads every file): the file's
    mode 000 must stop the run with one line and status 2."""
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        base.chmod(0o755)
        kernel, initrd, secret = base / "vmlinux", base / "initrd", base / "secret"
        kernel.write_bytes(b"\x7fELF")
        initrd.write_bytes(b"070701")
        secret.write_bytes(b"no")
        secret.chmod(0)
        argv = [sys.executable, "-m", "microvmm", "run", "--kernel", str(kernel), "--initrd", str(initrd),
                "--add", str(secret), "--", "cat", "/secret"]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: root reads every file")
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
        env = {**os.environ, "PYTHONPATH": str(REPO), "MICROVMM_IMAGES": str(base)}
        result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=scratch, timeout=60)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert result.stderr == f"microvmm: error: --add {secret}: {secret}: cannot read: Permission denied\n"


# -- in guest RAM -------------------------------------------------------------------

def _read_images(initrd: Path | None, **extra):
    from microvmm.boot.layout import guest_ram_layout
    from microvmm.memory import GuestMemory
    from microvmm.vmprep import ImageReader
    from tests.e2e_support import IMAGES, require_images
    require_images()  # an ELF vmlinux to load (no KVM needed)
    memory = GuestMemory(guest_ram_layout(64 << 20))
    try:
        _kernel, loaded = ImageReader(IMAGES / "vmlinux", initrd, memory, **extra).take()
        return memory.read(loaded.addr, loaded.size)
    finally:
        memory.close()


def test_the_archive_follows_the_initrd_and_the_modules_in_guest_ram(tree, tmp_path):
    from microvmm.initramfs.guestmodules import build_modules_archive, find_module_tree, resolve_modules
    from test_guestmodules import make_tree
    modules, _ = resolve_modules(find_module_tree(make_tree(tmp_path / "mods")))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"0707010123456")  # 13 bytes: the next archive starts 4-aligned
    entries = plan_added_files([str(tree)])
    blob = _read_images(initrd, initrd_modules=tuple(modules), added_files=entries)
    assert blob == (b"0707010123456" + bytes(3) + build_modules_archive(list(modules))
                    + build_added_archive(entries))


def test_without_an_initrd_the_archive_is_the_initrd(tree):
    """--initrd none --add ...: Linux unpacks it over its built-in initramfs."""
    entries = plan_added_files([f"{tree}:/"])
    assert _read_images(None, added_files=entries) == build_added_archive(entries)


def test_cli_warns_when_the_default_guest_would_hide_an_added_file(tree, tmp_path, vmm_calls, caplog, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinux").write_bytes(b"\x7fELF")
    (images / "initramfs.cpio").write_bytes(b"070701")
    monkeypatch.setenv("MICROVMM_IMAGES", str(images))
    assert cli.main(["run", "--add", f"{tree}/run.sh:/tmp/run.sh", "--", "true"]) == 0
    assert "/tmp/run.sh will be hidden: the default guest mounts a file system on /tmp" in caplog.text
    caplog.clear()
    assert cli.main(["run", "--add", f"{tree}/run.sh:/opt/run.sh", "--", "true"]) == 0
    assert "hidden" not in caplog.text
