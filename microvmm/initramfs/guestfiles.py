"""Host files in the guest's root at boot (`microvmm run --add HOST[:GUEST]`).

Each `--add` names a host file or directory and where it goes in the guest
(default: /BASENAME). They are packed into a newc cpio archive that follows
the initramfs in guest RAM; Linux unpacks concatenated archives one after
the other, later entries replacing earlier ones, so this works with any
kernel that has initramfs support and any initramfs (the default one, a
user's own, or the kernel's built-in one with `--initrd none`).

Planning (plan_added_files) happens in the CLI, before anything starts: it
walks the host paths, checks every file is readable and has a type an
initramfs can hold, and records what goes where. The archive itself
(build_added_archive) is written on the VMM's image thread, reading the files
then. Modes are kept (permission bits including setuid/sticky, executable
bits, directories, symlinks as symlinks with their target verbatim), and so
are modification times; everything is owned by root in the guest. A symlink
named on the command line itself is followed (its target is added), like
`cp -r`'s -H: a link to an absolute host path would point nowhere in the guest.
Parent directories GUEST needs are created 0755 (an existing one, e.g. from
the initramfs, gets that mode too: Linux's unpacker applies every entry's mode).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from microvmm.initramfs.newc import FIXED_MTIME, CpioArchive, CpioEntry, EntryKind

#: The permission bits of parent directories that GUEST paths need.
PARENT_DIRECTORY_MODE = 0o755


class AddError(Exception):
    """An `--add` that cannot be done; the message names the input and why."""


@dataclass(frozen=True)
class AddSpec:
    """One `--add HOST[:GUEST]` as given: `guest` is absolute, without '.' or
    '..' components; a trailing '/' is kept (it means "into this directory")."""

    option: str
    host: Path
    guest: str


@dataclass(frozen=True)
class AddedEntry:
    """One archive member to be: `path` is relative to the guest's root.

    FILE entries are read from `source` when the archive is built; SYMLINK
    entries carry their `link_target`."""

    path: str
    kind: EntryKind
    permissions: int
    mtime: int = FIXED_MTIME
    source: Path | None = None
    link_target: str = ""
    #: The `--add` option this entry came from (for error messages).
    option: str = ""


def parse_add_spec(text: str) -> AddSpec:
    """'HOST', 'HOST:/GUEST' or 'HOST:/DIR/' -> AddSpec (GUEST checked, not yet HOST).

    The GUEST part is what follows the last ':' when that starts with '/';
    a host path containing ':' therefore needs an explicit GUEST."""
    option = f"--add {text}"
    host_text, sep, guest = text.rpartition(":")
    if not sep:
        host_text, guest = text, ""
    if not host_text:
        raise AddError(f"{option}: no host path before ':' (HOST[:GUEST])")
    if sep and not guest.startswith("/"):
        raise AddError(f"{option}: the guest path {guest!r} must be absolute (e.g. {host_text}:/{guest or 'NAME'})")
    host = Path(host_text)
    if not guest:
        name = host.resolve().name if host.name in ("", ".", "..") else host.name
        if not name:
            raise AddError(f"{option}: the host path has no name to use in the guest: give HOST:/GUEST")
        guest = "/" + name
    parts = guest.rstrip("/").split("/")[1:]
    if any(part in (".", "..") for part in parts) or "" in parts[:-1] or "\0" in guest:
        raise AddError(f"{option}: the guest path {guest!r} may not contain '.', '..' or '//' components")
    return AddSpec(option, host, guest)


def plan_added_files(texts: list[str]) -> tuple[AddedEntry, ...]:
    """Every `--add` as the archive entries it gives, checked: host paths exist
    and are readable (directories listable, files openable), only files,
    directories and symlinks, guest paths valid and not clashing (a later
    `--add` of the same path replaces an earlier one, as in the guest's
    initramfs; a path under something another `--add` makes a file is refused).

    Raises AddError naming the `--add` at fault."""
    entries: dict[str, AddedEntry] = {}
    for text in texts:
        spec = parse_add_spec(text)
        try:
            info = os.stat(spec.host)  # follows a symlink given on the command line
        except FileNotFoundError:
            raise AddError(f"{spec.option}: {spec.host}: no such file or directory") from None
        except OSError as err:
            raise AddError(f"{spec.option}: {spec.host}: {err.strerror}") from None
        guest = spec.guest
        if guest.endswith("/") and guest != "/":
            guest += spec.host.resolve().name  # into that directory, under the same name
        root = guest.strip("/")
        if not root and not stat.S_ISDIR(info.st_mode):
            raise AddError(f"{spec.option}: only a directory can be added as the guest's root '/'")
        for entry in _walk(spec, spec.host, root, info):
            entries[entry.path] = entry
    _add_parents(entries)
    return tuple(sorted(entries.values(), key=lambda e: e.path.split("/")))


def _walk(spec: AddSpec, host: Path, guest: str, info: os.stat_result):
    """The entries for `host` (whose stat is `info`) placed at guest path `guest`."""
    mode = info.st_mode
    mtime = min(max(int(info.st_mtime), 0), 0xFFFFFFFF)
    permissions = stat.S_IMODE(mode)
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(host)
        except OSError as err:
            raise AddError(f"{spec.option}: {host}: {err.strerror}") from None
        yield AddedEntry(guest, EntryKind.SYMLINK, 0o777, mtime, link_target=target, option=spec.option)
    elif stat.S_ISREG(mode):
        try:
            os.close(os.open(host, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK))
        except OSError as err:
            raise AddError(f"{spec.option}: {host}: cannot read: {err.strerror}") from None
        yield AddedEntry(guest, EntryKind.FILE, permissions, mtime, source=host, option=spec.option)
    elif stat.S_ISDIR(mode):
        try:
            children = sorted(os.scandir(host), key=lambda child: child.name)
        except OSError as err:
            raise AddError(f"{spec.option}: {host}: cannot list: {err.strerror}") from None
        if guest:  # '' is the guest's root: its mode stays the initramfs's
            yield AddedEntry(guest, EntryKind.DIRECTORY, permissions, mtime, option=spec.option)
        for child in children:
            try:
                child_info = child.stat(follow_symlinks=False)
            except OSError as err:
                raise AddError(f"{spec.option}: {child.path}: {err.strerror}") from None
            yield from _walk(spec, Path(child.path), f"{guest}/{child.name}" if guest else child.name,
                             child_info)
    else:
        kind = "a fifo" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise AddError(f"{spec.option}: {host} is {kind}: only files, directories and symlinks are added")


def _add_parents(entries: dict[str, AddedEntry]) -> None:
    """Directory entries for the parents no `--add` provides; refuse a path
    under another `--add`'s file or symlink."""
    for path, entry in list(entries.items()):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            existing = entries.get(parent)
            if existing is None:
                entries[parent] = AddedEntry(parent, EntryKind.DIRECTORY, PARENT_DIRECTORY_MODE)
            elif existing.kind is not EntryKind.DIRECTORY:
                raise AddError(f"{entry.option}: /{path} would be under /{parent}, which "
                               f"{existing.option} makes a {existing.kind.name.lower()}")


def build_added_archive(entries: tuple[AddedEntry, ...]) -> bytes:
    """The newc archive of planned entries, the files read now.

    Raises AddError if a file can no longer be read."""
    archive = CpioArchive()
    for entry in entries:
        data = entry.link_target.encode() if entry.kind is EntryKind.SYMLINK else b""
        if entry.kind is EntryKind.FILE:
            try:
                with open(entry.source, "rb") as handle:
                    data = handle.read()
            except OSError as err:
                raise AddError(f"{entry.option}: {entry.source}: cannot read: {err.strerror}") from err
        archive.add(CpioEntry(entry.path, entry.kind, entry.permissions, data, mtime=entry.mtime))
    return archive.to_bytes()
