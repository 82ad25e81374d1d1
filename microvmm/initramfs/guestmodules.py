"""Kernel modules for the default initramfs (`microvmm run --modules DIR`).

A distribution kernel builds virtio as modules: Debian's stock amd64 kernel
has virtio, virtio_ring, virtio_pci and virtio_console as `.ko` files, so
without them the guest has no /dev/hvc0 and no virtio ports. Given the
kernel's `lib/modules/VERSION` tree (what `make modules_install
INSTALL_MOD_PATH=...` or a distribution package installs), this module finds
the modules the console needs and their dependencies in load order
(modules.dep), skips those built in (modules.builtin), and packs them into a
small newc cpio archive that the VMM appends to the initramfs in guest RAM
(Linux unpacks concatenated archives one after the other). The default
initramfs's /init loads what its list names before it does anything that
needs a console (microvmm/guestbuild/guest/initramfs/lib/microvmm/modules.sh).

Compressed modules (.ko.xz, .ko.gz) are decompressed here: busybox insmod
would do it in the guest, where decompression is emulated on some hosts, and
Debian's busybox decodes no zstd at all. .ko.zst files are refused with the
reason (the Python standard library has no zstd decoder; Debian 6.1's
modules are not compressed).
"""

from __future__ import annotations

import gzip
import lzma
import re
from dataclasses import dataclass
from pathlib import Path

from microvmm.initramfs.newc import CpioArchive

#: What the default initramfs needs for its console and `-- CMD`: the virtio
#: PCI transport and the console driver (/dev/hvcN, /dev/vportNpM). Their
#: dependencies come from modules.dep.
CONSOLE_MODULES = ("virtio_pci", "virtio_console")

#: Where the appended archive puts the modules and the list /init reads
#: (one file name per line, in load order); modules.sh reads the same paths.
ARCHIVE_DIR = "lib/microvmm/modules"
LIST_NAME = "load-order"

_MODULE_SUFFIX = re.compile(r"\.ko(\.xz|\.gz|\.zst)?$")


class ModulesError(Exception):
    """A modules directory that cannot give the guest what it needs; the message says why."""


@dataclass(frozen=True)
class ModuleTree:
    """A `lib/modules/VERSION` directory with its depmod output."""

    path: Path
    version: str


@dataclass(frozen=True)
class ModuleFile:
    """One module to load: its name (underscores) and its file in the tree."""

    name: str
    path: Path


def module_name(relpath: str) -> str:
    """'kernel/drivers/virtio/virtio-pci.ko.xz' -> 'virtio_pci' (modprobe's normalisation)."""
    base = relpath.rsplit("/", 1)[-1]
    return _MODULE_SUFFIX.sub("", base).replace("-", "_")


def find_module_tree(path: Path) -> ModuleTree:
    """The `lib/modules/VERSION` tree `path` names: that directory itself (it has
    modules.dep), or an INSTALL_MOD_PATH root holding exactly one
    lib/modules/VERSION (or lib/modules holding one VERSION)."""
    if not path.is_dir():
        raise ModulesError(f"--modules {path}: no such directory")
    if (path / "modules.dep").is_file():
        return ModuleTree(path, path.name)
    for base in (path / "lib" / "modules", path):
        if not base.is_dir():
            continue
        versions = sorted(child for child in base.iterdir() if (child / "modules.dep").is_file())
        if len(versions) == 1:
            return ModuleTree(versions[0], versions[0].name)
        if len(versions) > 1:
            raise ModulesError(
                f"--modules {path}: holds modules for {len(versions)} kernels "
                f"({', '.join(v.name for v in versions)}): name one, e.g. --modules {versions[0]}")
    raise ModulesError(f"--modules {path}: no modules.dep here nor in lib/modules/VERSION/ "
                       "(give the lib/modules/VERSION directory of `make modules_install`; "
                       "run `depmod -b ROOT VERSION` if modules.dep is missing)")


def parse_modules_dep(text: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """modules.dep ('path: dep-path dep-path...') -> {name: (path, dependency names)}."""
    modules: dict[str, tuple[str, tuple[str, ...]]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, deps = line.partition(":")
        if not sep or not _MODULE_SUFFIX.search(path.strip()):
            raise ModulesError(f"modules.dep line {number}: not 'module.ko: dependencies': {line!r}")
        modules[module_name(path.strip())] = (path.strip(), tuple(module_name(d) for d in deps.split()))
    return modules


def read_builtin(tree: ModuleTree) -> frozenset[str]:
    """Names of the modules built into the kernel (modules.builtin; missing = none)."""
    try:
        text = (tree.path / "modules.builtin").read_text(errors="replace")
    except FileNotFoundError:
        return frozenset()
    except OSError as err:
        raise ModulesError(f"cannot read {tree.path / 'modules.builtin'}: {err.strerror}") from err
    return frozenset(module_name(line.strip()) for line in text.splitlines() if line.strip())


def resolve_modules(tree: ModuleTree, wanted: tuple[str, ...] = CONSOLE_MODULES,
                    *, required: bool = True) -> tuple[list[ModuleFile], list[str]]:
    """The module files to load for `wanted`, dependencies first, each once;
    and the wanted names built into the kernel (nothing to load).

    A wanted module neither built in nor in modules.dep raises ModulesError
    when `required` (the guest's console would never appear), else it is
    left out. A module that modules.dep names but whose file is missing, or a
    dependency cycle, always raises.
    """
    dep_path = tree.path / "modules.dep"
    try:
        modules = parse_modules_dep(dep_path.read_text(errors="replace"))
    except OSError as err:
        raise ModulesError(f"cannot read {dep_path}: {err.strerror}") from err
    builtin = read_builtin(tree)
    order: list[ModuleFile] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done or name in builtin:
            return
        if name in chain:
            raise ModulesError(f"{dep_path}: dependency cycle {' -> '.join((*chain, name))}")
        relpath, deps = modules[name]
        for dep in deps:
            if dep not in modules and dep not in builtin:
                raise ModulesError(f"{dep_path}: {name} depends on {dep}, which it does not list")
            visit(dep, (*chain, name))
        path = tree.path / relpath
        if not path.is_file():
            raise ModulesError(f"{path}: listed in modules.dep but missing (a partial modules_install?)")
        order.append(ModuleFile(name, path))
        done.add(name)

    built_in = [name for name in wanted if name in builtin]
    for name in wanted:
        if name in builtin:
            continue
        if name not in modules:
            if required:
                raise ModulesError(
                    f"--modules {tree.path}: kernel {tree.version} has {name} neither built in "
                    f"(modules.builtin) nor as a module (modules.dep): the guest's virtio "
                    f"console cannot work (CONFIG_{name.upper()}=m or =y needed)")
            continue
        visit(name, ())
    return order, built_in


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes, decompressed if it is .ko.xz or .ko.gz."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModulesError(f"cannot read module {path}: {err.strerror}") from err
    try:
        if path.name.endswith(".ko.xz"):
            data = lzma.decompress(data)
        elif path.name.endswith(".ko.gz"):
            data = gzip.decompress(data)
        elif path.name.endswith(".ko.zst"):
            raise ModulesError(f"{path}: zstd-compressed modules are not supported (no zstd decoder "
                               "here, none in the guest's busybox): install them uncompressed, "
                               "xz or gzip (CONFIG_MODULE_COMPRESS_NONE/XZ/GZIP)")
    except (lzma.LZMAError, OSError, EOFError) as err:
        raise ModulesError(f"module {path}: cannot decompress: {err}") from err
    if data[:4] != b"\x7fELF":
        raise ModulesError(f"module {path}: not an ELF object")
    return data


def build_modules_archive(modules: list[ModuleFile]) -> bytes:
    """A newc archive holding the modules (decompressed) under ARCHIVE_DIR,
    numbered in load order, and the list file naming them in that order."""
    archive = CpioArchive()
    parts = ARCHIVE_DIR.split("/")
    for depth in range(1, len(parts) + 1):
        archive.add_directory("/".join(parts[:depth]))
    names = []
    for index, module in enumerate(modules):
        name = f"{index:02d}-{module.name}.ko"
        archive.add_file(f"{ARCHIVE_DIR}/{name}", read_module(module.path))
        names.append(name)
    archive.add_file(f"{ARCHIVE_DIR}/{LIST_NAME}", "".join(f"{n}\n" for n in names).encode())
    return archive.to_bytes()


def bzimage_kernel_release(head: bytes) -> str | None:
    """The release ('6.1.0-57-amd64') a bzImage's setup header names, if it has one.

    Boot protocol 2.00+: the u16 at 0x20E points (minus 0x200) at a
    NUL-terminated 'RELEASE (builder) #N ...' string in the setup code.
    """
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    offset = int.from_bytes(head[0x20E:0x210], "little")
    if not offset:
        return None
    start = offset + 0x200
    end = head.find(b"\0", start, start + 256)
    if start >= len(head) or end < 0:
        return None
    text = head[start:end].decode("ascii", "replace").split()
    return text[0] if text else None


def check_kernel_release(kernel: Path, tree: ModuleTree) -> None:
    """Refuse modules built for another kernel release than a bzImage's own
    (the guest would reject them: 'disagrees about version of symbol' or bad
    vermagic). An ELF vmlinux carries no cheap release string: not checked."""
    try:
        with open(kernel, "rb") as handle:
            head = handle.read(0x8000)
    except OSError:
        return  # the kernel's own check reports it
    release = bzimage_kernel_release(head)
    if release is not None and release != tree.version:
        raise ModulesError(f"--modules {tree.path}: modules for kernel {tree.version}, "
                           f"but {kernel} is {release}")
