"""Opening guest-named paths strictly beneath the shared directory.

A path here is a tuple of names already checked by `check_name` (no '/', no
NUL, not '.' or '..'), relative to the share's root directory fd. It is
opened with openat2(2) and RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_SYMLINKS: the kernel refuses any step out of the root (`..`,
absolute symlinks, /proc magic links), and no symlink is followed at all — a
9P client resolves symlinks itself (Treadlink then new walks), so the server
never needs to, and a symlink the host swaps in mid-way cannot redirect it.

Without openat2 (Linux < 5.6, or a seccomp filter that refuses it) the same
path is opened one component at a time with O_NOFOLLOW from the root fd
(`ComponentWalkResolver`): with checked names and no symlink followed, no
component can lead outside either; the device logs which one it uses.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol

#: openat2's system call number on x86-64 (and every other architecture).
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
STRICT_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS
#: Linux's NAME_MAX: longer names are refused before any system call.
NAME_MAX = 255

Path = tuple[bytes, ...]


def check_name(name: bytes) -> bytes:
    """One path component as the guest gave it; OSError (EINVAL/ENAMETOOLONG) if unusable."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, f"bad name {name[:64]!r}")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name longer than 255 bytes")
    return name


class Resolver(Protocol):
    method: str

    def open(self, path: Path, flags: int, mode: int = 0) -> int: ...


class Openat2Resolver:
    """openat2(root, "a/b/c", flags, RESOLVE_BENEATH|NO_MAGICLINKS|NO_SYMLINKS)."""

    method = "openat2 RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_SYMLINKS"

    def __init__(self, root_fd: int):
        import ctypes
        self._root_fd = root_fd
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._ctypes = ctypes

        class OpenHow(ctypes.Structure):
            _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                        ("resolve", ctypes.c_uint64)]
        self._how_type = OpenHow

    def open(self, path: Path, flags: int, mode: int = 0) -> int:
        ctypes = self._ctypes
        how = self._how_type(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, STRICT_RESOLVE)
        name = b"/".join(path) if path else b"."
        fd = self._libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(self._root_fd),
                                ctypes.c_char_p(name), ctypes.byref(how),
                                ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return int(fd)


class ComponentWalkResolver:
    """The fallback: one openat(O_NOFOLLOW) per component from the root fd."""

    method = "component-by-component openat O_NOFOLLOW (no openat2 here)"

    def __init__(self, root_fd: int):
        self._root_fd = root_fd

    def open(self, path: Path, flags: int, mode: int = 0) -> int:
        if not path:
            return os.open(".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._root_fd)
        fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root_fd)
        try:
            for name in path[:-1]:
                check_name(name)
                next_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=fd)
                os.close(fd)
                fd = next_fd
            return os.open(check_name(path[-1]), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
        finally:
            os.close(fd)


def openat2_works(root_fd: int) -> bool:
    """Whether this kernel (and any seccomp filter) lets openat2 run."""
    try:
        fd = Openat2Resolver(root_fd).open((), os.O_PATH | os.O_DIRECTORY)
    except OSError as err:
        if err.errno in (errno.ENOSYS, errno.EPERM):
            return False
        raise
    except (AttributeError, ImportError):
        return False
    os.close(fd)
    return True


def make_resolver(root_fd: int, prefer_openat2: bool = True) -> Resolver:
    if prefer_openat2 and openat2_works(root_fd):
        return Openat2Resolver(root_fd)
    return ComponentWalkResolver(root_fd)


#: statfs f_type of the kernel's own filesystems: host state, not files
#: (proc, sysfs, debugfs, tracefs, securityfs, cgroup 1/2, bpf, devpts,
#: configfs, efivarfs, pstore, fusectl, binfmt_misc, selinuxfs).
PSEUDO_FILESYSTEMS = frozenset({
    0x9FA0, 0x62656572, 0x64626720, 0x74726163, 0x73636673, 0x27E0EB, 0x63677270, 0xCAFE4A11,
    0x1CD1, 0x62656570, 0xDE5E81E4, 0x6165676C, 0x65735543, 0x42494E4D, 0xF97CFF8C,
})


def filesystem_type(fd: int) -> int:
    """fstatfs(fd).f_type (Python's os.fstatvfs does not give it)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if libc.fstatfs(ctypes.c_int(fd), buffer) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int.from_bytes(buffer.raw[:8], "little")
