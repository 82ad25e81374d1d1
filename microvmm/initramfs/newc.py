"""Deterministic writer (and reader, for checks) of "newc" cpio archives: the
guest builder makes the default initramfs with it, the VMM the modules archive
it appends for `run --modules`.

The Linux initramfs unpacker accepts the SVR4 "newc" format (magic 070701):
a 110-byte ASCII header of 13 eight-digit hex fields, the NUL-terminated name
padded to a 4-byte boundary, the data padded to a 4-byte boundary, and a final
"TRAILER!!!" entry.

Archives are built from an explicit in-memory description, never by walking
the host file system with its owners and times, so no host state leaks into
the image and the same entries always give the same bytes: entries are
sorted by path components, owner is root, mtime is a fixed constant and
inode numbers are assigned in order.
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass, field
from typing import Iterable

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER_NAME = "TRAILER!!!"
# 2000-01-01T00:00:00Z: a fixed, obviously synthetic timestamp.
FIXED_MTIME = 946684800


class CpioError(Exception):
    """A malformed archive or an invalid entry description."""


class EntryKind(enum.Enum):
    DIRECTORY = stat.S_IFDIR
    FILE = stat.S_IFREG
    SYMLINK = stat.S_IFLNK
    CHAR_DEVICE = stat.S_IFCHR
    BLOCK_DEVICE = stat.S_IFBLK


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. `path` is relative ("bin/sh"), without leading '/'.

    For FILE, `data` is the content; for SYMLINK, `data` is the link target
    (encoded UTF-8); for devices, `rdev_major`/`rdev_minor` name the device.
    `permissions` holds only the permission bits (e.g. 0o755).
    """

    path: str
    kind: EntryKind
    permissions: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_MTIME

    def __post_init__(self) -> None:
        if not self.path or self.path.startswith("/") or self.path.endswith("/"):
            raise CpioError(f"entry path must be relative, non-empty, no trailing '/': {self.path!r}")
        parts = self.path.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise CpioError(f"entry path has an empty, '.' or '..' component: {self.path!r}")
        if self.permissions & ~0o7777:
            raise CpioError(f"permissions of {self.path!r} carry file-type bits: {self.permissions:#o}")
        if self.kind in (EntryKind.DIRECTORY, EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE) and self.data:
            raise CpioError(f"{self.kind.name} entry {self.path!r} cannot have data")
        if self.kind is EntryKind.SYMLINK and not self.data:
            raise CpioError(f"symlink {self.path!r} needs a target")

    @property
    def mode(self) -> int:
        return self.kind.value | self.permissions

    @property
    def sort_key(self) -> tuple[str, ...]:
        # Component-wise order puts every directory before its contents.
        return tuple(self.path.split("/"))


@dataclass
class CpioArchive:
    """A set of entries keyed by path; adding a path again replaces it."""

    entries: dict[str, CpioEntry] = field(default_factory=dict)

    def add(self, entry: CpioEntry) -> None:
        self.entries[entry.path] = entry

    def add_directory(self, path: str, permissions: int = 0o755) -> None:
        self.add(CpioEntry(path, EntryKind.DIRECTORY, permissions))

    def add_file(self, path: str, data: bytes, permissions: int = 0o644) -> None:
        self.add(CpioEntry(path, EntryKind.FILE, permissions, data))

    def add_symlink(self, path: str, target: str) -> None:
        self.add(CpioEntry(path, EntryKind.SYMLINK, 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, permissions: int = 0o600) -> None:
        self.add(CpioEntry(path, EntryKind.CHAR_DEVICE, permissions, rdev_major=major, rdev_minor=minor))

    def missing_parents(self) -> list[str]:
        """Parent directories that no entry creates (the kernel would fail to place children)."""
        missing: set[str] = set()
        for path in self.entries:
            parts = path.split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                entry = self.entries.get(parent)
                if entry is None or entry.kind is not EntryKind.DIRECTORY:
                    missing.add(parent)
        return sorted(missing)

    def to_bytes(self) -> bytes:
        missing = self.missing_parents()
        if missing:
            raise CpioError(f"no directory entry for parents: {', '.join(missing)}")
        ordered = sorted(self.entries.values(), key=lambda e: e.sort_key)
        return write_newc(ordered)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(*, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int, filesize: int,
            rdev_major: int, rdev_minor: int, namesize: int) -> bytes:
    fields = (ino, mode, uid, gid, nlink, mtime, filesize, 0, 0, rdev_major, rdev_minor, namesize, 0)
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise CpioError(f"header field out of range: {value}")
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def _member(name: str, *, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int,
            data: bytes, rdev_major: int, rdev_minor: int) -> bytes:
    encoded = name.encode() + b"\0"
    head = _header(ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime, filesize=len(data),
                   rdev_major=rdev_major, rdev_minor=rdev_minor, namesize=len(encoded))
    return head + encoded + _pad4(HEADER_SIZE + len(encoded)) + data + _pad4(len(data))


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Serialize entries in the given order, then the trailer. Inodes count from 1."""
    chunks: list[bytes] = []
    seen: set[str] = set()
    for ino, entry in enumerate(entries, start=1):
        if entry.path in seen:
            raise CpioError(f"duplicate entry {entry.path!r}")
        seen.add(entry.path)
        chunks.append(_member(entry.path, ino=ino, mode=entry.mode, uid=entry.uid, gid=entry.gid,
                              nlink=2 if entry.kind is EntryKind.DIRECTORY else 1, mtime=entry.mtime,
                              data=entry.data, rdev_major=entry.rdev_major, rdev_minor=entry.rdev_minor))
    chunks.append(_member(TRAILER_NAME, ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, data=b"",
                          rdev_major=0, rdev_minor=0))
    return b"".join(chunks)


def read_newc(blob: bytes) -> list[CpioEntry]:
    """Parse a newc archive (up to its trailer) back into entries; strict about structure."""
    entries: list[CpioEntry] = []
    offset = 0
    while True:
        if offset + HEADER_SIZE > len(blob):
            raise CpioError(f"truncated header at offset {offset}")
        if blob[offset:offset + 6] != NEWC_MAGIC:
            raise CpioError(f"bad magic at offset {offset}: {blob[offset:offset + 6]!r}")
        try:
            fields = [int(blob[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise CpioError(f"non-hex header field at offset {offset}") from exc
        _ino, mode, uid, gid, _nlink, mtime, filesize, _maj, _min, rdev_major, rdev_minor, namesize, _chk = fields
        name_start = offset + HEADER_SIZE
        name_end = name_start + namesize
        if namesize == 0 or name_end > len(blob) or blob[name_end - 1] != 0:
            raise CpioError(f"bad name at offset {offset}")
        name = blob[name_start:name_end - 1].decode()
        data_start = name_end + (-(HEADER_SIZE + namesize) % 4)
        data_end = data_start + filesize
        if data_end > len(blob):
            raise CpioError(f"truncated data of {name!r}")
        if name == TRAILER_NAME:
            return entries
        try:
            kind = EntryKind(stat.S_IFMT(mode))
        except ValueError as exc:
            raise CpioError(f"unsupported file type {mode:#o} for {name!r}") from exc
        entries.append(CpioEntry(name, kind, stat.S_IMODE(mode), blob[data_start:data_end],
                                 rdev_major, rdev_minor, uid, gid, mtime))
        offset = data_end + (-filesize % 4)
