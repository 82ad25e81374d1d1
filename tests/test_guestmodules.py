"""`run --modules`: finding the modules the console needs in a lib/modules
tree, packing them into an archive, appending it to the initramfs in guest
RAM, and the guest's /init side that loads them (run on the host here)."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from microvmm.boot.initrd import append_archive, appended_offset, load_initrd_file
from microvmm.boot.layout import MiB, guest_ram_layout
from microvmm.initramfs.guestmodules import (ARCHIVE_DIR, LIST_NAME, ModuleFile, ModulesError, build_modules_archive,
                                   bzimage_kernel_release, check_kernel_release, find_module_tree,
                                   module_name, parse_modules_dep, read_module, resolve_modules)
from microvmm.memory import GuestMemory
from microvmm.initramfs.newc import CpioArchive, EntryKind, read_newc

REPO = Path(__file__).resolve().parent.parent
MODULES_SH = REPO / "microvmm" / "guestbuild" / "guest" / "initramfs" / "lib" / "microvmm" / "modules.sh"
VERSION = "6.1.0-99-test"

# Debian 6.1's own modules.dep lines for the console (the dependency order is depmod's).
DEBIAN_DEP = """\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_balloon.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def elf_object(name: str) -> bytes:
    """Bytes that pass for a module: ELF magic, then something naming it."""
    return b"\x7fELF" + f"module {name}".encode()


def make_tree(root: Path, dep: str = DEBIAN_DEP, builtin: str = "", compress: str = "") -> Path:
    """A lib/modules/VERSION tree under `root` with a module file for every modules.dep line."""
    tree = root / "lib" / "modules" / VERSION
    tree.mkdir(parents=True)
    lines = []
    for line in dep.splitlines():
        path, _, deps = line.partition(":")
        data = elf_object(module_name(path))
        if compress == "xz":
            data, path = lzma.compress(data, format=lzma.FORMAT_XZ), path + ".xz"
        elif compress == "gz":
            data, path = gzip.compress(data), path + ".gz"
        suffix = {"xz": ".xz", "gz": ".gz"}.get(compress, "")
        lines.append(f"{path}:" + "".join(f" {d}{suffix}" for d in deps.split()))
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(data)
    (tree / "modules.dep").write_text("\n".join(lines) + "\n")
    (tree / "modules.builtin").write_text(builtin)
    return tree


# --------------------------------------------------------------------------- finding the tree


def test_the_tree_itself_or_its_install_mod_path_root_is_accepted(tmp_path):
    tree = make_tree(tmp_path)
    assert find_module_tree(tree).path == tree
    assert find_module_tree(tmp_path).path == tree
    assert find_module_tree(tmp_path / "lib" / "modules").version == VERSION


def test_a_root_with_two_kernels_is_ambiguous(tmp_path):
    make_tree(tmp_path)
    other = tmp_path / "lib" / "modules" / "6.1.0-98-other"
    other.mkdir()
    (other / "modules.dep").write_text("")
    with pytest.raises(ModulesError, match="2 kernels.*6.1.0-98-other, 6.1.0-99-test"):
        find_module_tree(tmp_path)


def test_a_directory_without_modules_dep_is_refused(tmp_path):
    (tmp_path / "lib" / "modules" / VERSION).mkdir(parents=True)
    with pytest.raises(ModulesError, match="no modules.dep.*depmod"):
        find_module_tree(tmp_path)
    with pytest.raises(ModulesError, match="no such directory"):
        find_module_tree(tmp_path / "missing")


# --------------------------------------------------------------------------- resolving


def test_console_modules_come_dependencies_first_each_once(tmp_path):
    tree = find_module_tree(make_tree(tmp_path))
    modules, built_in = resolve_modules(tree)
    names = [m.name for m in modules]
    assert names == ["virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_ring", "virtio",
                     "virtio_pci", "virtio_console"]
    assert built_in == []
    assert modules[-1].path == tree.path / "kernel/drivers/char/virtio_console.ko"
    # Every module's dependencies are loaded before it.
    deps = parse_modules_dep((tree.path / "modules.dep").read_text())
    for position, name in enumerate(names):
        assert set(deps[name][1]) <= set(names[:position])


def test_built_in_modules_are_not_loaded(tmp_path):
    dep = "kernel/drivers/char/virtio_console.ko:\n"
    builtin = "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n" \
              "kernel/drivers/virtio/virtio_pci.ko\n"
    tree = find_module_tree(make_tree(tmp_path, dep, builtin))
    modules, built_in = resolve_modules(tree)
    assert [m.name for m in modules] == ["virtio_console"]
    assert built_in == ["virtio_pci"]


def test_a_console_driver_neither_built_in_nor_a_module_fails_with_the_reason(tmp_path):
    dep = DEBIAN_DEP.replace("kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko "
                             "kernel/drivers/virtio/virtio_ring.ko\n", "")
    tree = find_module_tree(make_tree(tmp_path, dep))
    with pytest.raises(ModulesError, match="virtio_console neither built in.*nor as a module.*"
                                           "CONFIG_VIRTIO_CONSOLE"):
        resolve_modules(tree)
    modules, _ = resolve_modules(tree, required=False)
    assert modules[-1].name == "virtio_pci"


def test_a_listed_but_missing_file_and_a_cycle_are_refused(tmp_path):
    tree = find_module_tree(make_tree(tmp_path))
    (tree.path / "kernel/drivers/virtio/virtio_ring.ko").unlink()
    with pytest.raises(ModulesError, match="virtio_ring.ko: listed in modules.dep but missing"):
        resolve_modules(tree)
    cyclic = find_module_tree(make_tree(tmp_path / "c", "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n"))
    with pytest.raises(ModulesError, match="cycle a -> b -> a"):
        resolve_modules(cyclic, ("a",))


def test_module_names_normalise_like_modprobe():
    assert module_name("kernel/drivers/virtio/virtio-pci.ko.xz") == "virtio_pci"
    assert module_name("extra/foo.ko") == "foo"
    with pytest.raises(ModulesError, match="line 2"):
        parse_modules_dep("a.ko:\nnot a module line\n")


# --------------------------------------------------------------------------- reading and packing


@pytest.mark.parametrize("compress", ["", "xz", "gz"])
def test_modules_are_packed_decompressed_in_load_order(tmp_path, compress):
    tree = find_module_tree(make_tree(tmp_path, compress=compress))
    modules, _ = resolve_modules(tree)
    entries = {e.path: e for e in read_newc(build_modules_archive(modules))}
    listed = entries[f"{ARCHIVE_DIR}/{LIST_NAME}"].data.decode().split()
    assert listed == [f"{i:02d}-{m.name}.ko" for i, m in enumerate(modules)]
    for name, module in zip(listed, modules):
        assert entries[f"{ARCHIVE_DIR}/{name}"].data == elf_object(module.name)
        assert entries[f"{ARCHIVE_DIR}/{name}"].kind is EntryKind.FILE
    for parent in ("lib", "lib/microvmm", ARCHIVE_DIR):
        assert entries[parent].kind is EntryKind.DIRECTORY


def test_zstd_and_non_elf_modules_are_refused(tmp_path):
    zst = tmp_path / "virtio.ko.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(ModulesError, match="zstd-compressed modules are not supported"):
        read_module(zst)
    text = tmp_path / "virtio.ko"
    text.write_bytes(b"not elf")
    with pytest.raises(ModulesError, match="not an ELF object"):
        read_module(text)
    broken = tmp_path / "virtio.ko.xz"
    broken.write_bytes(b"\xfd7zXZ\0garbage")
    with pytest.raises(ModulesError, match="cannot decompress"):
        build_modules_archive([ModuleFile("virtio", broken)])


# --------------------------------------------------------------------------- appending to the initrd


def _two_archives() -> tuple[bytes, bytes]:
    first = CpioArchive()
    first.add_directory("etc")
    first.add_file("etc/odd", b"123")  # data not a multiple of 4
    second = CpioArchive()
    second.add_directory("lib")
    second.add_file("lib/x", b"modules")
    # An initrd whose length is not a multiple of 4 (gzip output, or GNU cpio
    # padding) makes the padding visible.
    return first.to_bytes() + b"\0\0\0\0\0", second.to_bytes()


def test_an_archive_appended_in_guest_ram_follows_the_initrd_4_byte_aligned(tmp_path):
    initrd, appendix = _two_archives()
    assert len(initrd) % 4 == 1
    path = tmp_path / "initrd.cpio"
    path.write_bytes(initrd)
    mem = GuestMemory(guest_ram_layout(64 * MiB))
    mem.write(mem.end - 2 * MiB, b"\xff" * 2 * MiB)  # not zero where the padding goes
    fd = os.open(path, os.O_RDONLY)
    try:
        loaded = load_initrd_file(mem, fd, kernel_end=16 * MiB, appendix=appendix)
    finally:
        os.close(fd)
    offset = appended_offset(len(initrd))
    assert offset % 4 == 0 and offset == len(initrd) + 3
    assert loaded.size == offset + len(appendix)  # the size handed to Linux covers both
    in_ram = bytes(mem.view(loaded.addr, loaded.size))
    assert in_ram == append_archive(initrd, appendix)
    assert in_ram[len(initrd):offset] == b"\0\0\0"
    assert [e.path for e in read_newc(in_ram)] == ["etc", "etc/odd"]
    assert [e.path for e in read_newc(in_ram[offset:])] == ["lib", "lib/x"]
    # Without an appendix nothing changes.
    assert append_archive(initrd, b"") == initrd


# --------------------------------------------------------------------------- kernel release


def test_modules_for_another_release_than_the_bzimage_are_refused(tmp_path):
    head = bytearray(0x8000)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x3000).to_bytes(2, "little")
    head[0x3200:0x3200 + 40] = b"6.1.0-57-amd64 (debian-kernel@lists)\0".ljust(40, b"\0")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bytes(head))
    assert bzimage_kernel_release(bytes(head)) == "6.1.0-57-amd64"
    tree = find_module_tree(make_tree(tmp_path))
    with pytest.raises(ModulesError, match="modules for kernel 6.1.0-99-test, but .*vmlinuz is 6.1.0-57-amd64"):
        check_kernel_release(kernel, tree)
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(100))  # no release string: not checked
    check_kernel_release(tmp_path / "vmlinux", tree)


# --------------------------------------------------------------------------- the guest side


def _busybox() -> str:
    found = shutil.which("busybox")
    if found is None:
        pytest.skip("busybox (the guest's shell) is not installed on this host")
    return found


def _run_modules_sh(tmp_path: Path, modules_dir: Path, cmdline: str, tty: Path) -> subprocess.CompletedProcess:
    log = tmp_path / "insmod.log"
    fake_insmod = tmp_path / "insmod"
    fake_insmod.write_text(f'#!/bin/sh\necho "$1" >>{log}\n[ "${{1##*/}}" != 03-bad.ko ]\n')
    fake_insmod.chmod(0o755)
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    env = {"PATH": os.environ["PATH"], "MICROVMM_MODULES_DIR": str(modules_dir),
           "MICROVMM_INSMOD": str(fake_insmod), "MICROVMM_CMDLINE": str(tmp_path / "cmdline"),
           "MICROVMM_TTY_SYSFS": str(tty), "MICROVMM_DEV": str(tmp_path / "dev")}
    return subprocess.run([_busybox(), "sh", "-c", f'. {MODULES_SH}; echo done'], env=env,
                          capture_output=True, text=True, timeout=30)


def test_init_loads_the_listed_modules_in_order(tmp_path):
    modules_dir = tmp_path / "modules"
    modules_dir.mkdir()
    (modules_dir / LIST_NAME).write_text("00-virtio_ring.ko\n01-virtio.ko\n03-bad.ko\n02-virtio_console.ko\n")
    tty = tmp_path / "tty"
    (tty / "hvc0").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "hvc0").write_bytes(b"")  # opens
    result = _run_modules_sh(tmp_path, modules_dir, "console=ttyS0 console=hvc0", tty)
    assert result.stdout == "done\n"
    loaded = (tmp_path / "insmod.log").read_text().split()
    assert loaded == [str(modules_dir / n) for n in
                      ("00-virtio_ring.ko", "01-virtio.ko", "03-bad.ko", "02-virtio_console.ko")]
    assert "microvmm: insmod 03-bad.ko failed" in result.stderr  # the rest still loaded
    assert "no hvc0" not in result.stderr


def test_init_without_the_modules_archive_does_nothing(tmp_path):
    result = _run_modules_sh(tmp_path, tmp_path / "absent", "console=hvc0", tmp_path / "tty")
    assert (result.stdout, result.stderr) == ("done\n", "")
    assert not (tmp_path / "insmod.log").exists()


@pytest.mark.parametrize("in_sysfs", [False, True])
def test_init_says_when_hvc0_never_comes_or_never_opens(tmp_path, in_sysfs):
    """In sysfs but not openable is what virtio_console shows for a moment
    (tty registered, port not yet a console): not ready."""
    modules_dir = tmp_path / "modules"
    modules_dir.mkdir()
    (modules_dir / LIST_NAME).write_text("00-virtio.ko\n")
    if in_sysfs:
        (tmp_path / "tty" / "hvc0").mkdir(parents=True)
        (tmp_path / "dev" / "hvc0").mkdir(parents=True)  # a directory does not open read-write
    result = _run_modules_sh(tmp_path, modules_dir, "console=hvc0", tmp_path / "tty")
    assert result.stdout == "done\n"
    assert "microvmm: no hvc0 after loading the modules" in result.stderr
    assert "hvc0" not in result.stderr.replace("microvmm: no hvc0 after loading the modules", "")
