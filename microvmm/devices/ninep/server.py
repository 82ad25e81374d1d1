"""A 9P2000.L file server for one shared host directory (no virtio here).

`NinePServer.handle(request, room)` takes one T-message and returns its
R-message (at most `room` bytes). Operating-system errors become Rlerror with
the host's errno (the guest is Linux too); a field that runs past the
message's end gets Rlerror(EINVAL). Only a request too short to carry a tag
(or no room for any reply) raises MalformedMessage: the transport then puts
the device in NEEDS_RESET.

What the guest can reach:
- A fid is a path (names checked: no '/', NUL, '.', '..'; Twalk's '..' is
  taken lexically and stops at the root) under the share's root fd, opened
  each time through `resolve` (openat2 beneath the root, no symlink
  followed). Operations on a name use its parent directory's fd and the
  single checked name, with AT_SYMLINK_NOFOLLOW semantics.
- Only regular files and directories are opened (device nodes, FIFOs and
  sockets in the share give ENXIO); Tmknod is refused (EPERM).
- Files are created and owned by the VMM's user: chown to another owner is
  EPERM, set-user/group-ID bits are dropped from every mode.
- `read_only`: everything that would change the share gets EROFS.
- At most `limits.max_fids` fids and `limits.max_open_files` open files
  (EMFILE past them); Tversion and close() release them all.
- Tlock always grants and Tgetlock reports unlocked: locks are not shared
  with the host (enough for tools that lock, like busybox's own).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable

from microvmm.devices.ninep.protocol import (
    GETATTR_BASIC,
    HEADER,
    HEADER_SIZE,
    LOCK_SUCCESS,
    LOCK_TYPE_UNLOCK,
    MAX_WALK_NAMES,
    NOFID,
    RDATA_HEADER,
    RLERROR_SIZE,
    VERSION_9P2000_L,
    MalformedMessage,
    MessageReader,
    MessageType,
    MessageWriter,
    SetattrValid,
    rlerror,
)
from microvmm.devices.ninep.fids import ALLOWED_MODE_BITS, Fid, qid_of  # noqa: F401 (Fid, qid_of: re-exported)
from microvmm.devices.ninep.namespace_ops import NamespaceOps
from microvmm.devices.ninep.resolve import PSEUDO_FILESYSTEMS, Path, Resolver, check_name, filesystem_type


#: Linux open flags as 9P2000.L carries them (P9_DOTL_*), mapped to the host's.
_DOTL_ACCMODE = 0o3
_DOTL_OPEN_FLAGS = {
    0o1000: os.O_TRUNC,
    0o2000: os.O_APPEND,
    0o10000: os.O_DSYNC,
    0o4000000: os.O_SYNC,
}
_DOTL_EXCL = 0o200
MAX_MSIZE = 512 * 1024
MIN_MSIZE = 4096
MAX_OFFSET = (1 << 63) - 1


@dataclass(frozen=True)
class ShareLimits:
    max_fids: int = 4096
    max_open_files: int = 1024
    max_msize: int = MAX_MSIZE


@dataclass
class ServerStats:
    requests: int = 0
    errors: int = 0


def _proc_fd(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class NinePServer(NamespaceOps):
    """The 9P2000.L state of one share: its fids and open files."""

    def __init__(self, root_fd: int, resolver: Resolver, read_only: bool = False,
                 limits: ShareLimits = ShareLimits(), hide_pseudo_filesystems: bool = False):
        self._root_fd = root_fd
        self._root_dev = os.fstat(root_fd).st_dev
        #: --rootfs host: mounts of proc, sysfs & co. under the share look absent.
        self.hide_pseudo_filesystems = hide_pseudo_filesystems
        self._resolve = resolver
        self.read_only = read_only
        self.limits = limits
        self.msize = limits.max_msize
        self._fids: dict[int, Fid] = {}
        self._open_files = 0
        self.stats = ServerStats()
        self._handlers: dict[int, Callable[[MessageReader, int], MessageWriter]] = {
            MessageType.TVERSION: self._version,
            MessageType.TAUTH: self._unsupported,
            MessageType.TATTACH: self._attach,
            MessageType.TFLUSH: self._flush,
            MessageType.TWALK: self._walk,
            MessageType.TGETATTR: self._getattr,
            MessageType.TSETATTR: self._setattr,
            MessageType.TLOPEN: self._lopen,
            MessageType.TLCREATE: self._lcreate,
            MessageType.TREAD: self._read,
            MessageType.TWRITE: self._write,
            MessageType.TREADDIR: self._readdir,
            MessageType.TMKDIR: self._mkdir,
            MessageType.TUNLINKAT: self._unlinkat,
            MessageType.TRENAMEAT: self._renameat,
            MessageType.TRENAME: self._rename,
            MessageType.TSYMLINK: self._symlink,
            MessageType.TLINK: self._link,
            MessageType.TREADLINK: self._readlink,
            MessageType.TSTATFS: self._statfs,
            MessageType.TFSYNC: self._fsync,
            MessageType.TCLUNK: self._clunk,
            MessageType.TREMOVE: self._remove,
            MessageType.TXATTRWALK: self._unsupported,
            MessageType.TXATTRCREATE: self._unsupported,
            MessageType.TMKNOD: self._mknod,
            MessageType.TLOCK: self._lock,
            MessageType.TGETLOCK: self._getlock,
        }

    # ---- entry point -------------------------------------------------------------

    def handle(self, request: bytes, room: int) -> bytes:
        """One T-message -> its R-message of at most `room` bytes."""
        if len(request) < HEADER_SIZE:
            raise MalformedMessage(f"request of {len(request)} bytes has no 9P header")
        room = min(room, self.msize)
        if room < RLERROR_SIZE:
            raise MalformedMessage(f"{room} bytes of room cannot hold any reply")
        size, message_type, tag = HEADER.unpack_from(request)
        self.stats.requests += 1
        if size < HEADER_SIZE or size > len(request) or size > self.msize:
            self.stats.errors += 1
            return rlerror(tag, errno.EINVAL if size <= self.msize else errno.EMSGSIZE)
        handler = self._handlers.get(message_type)
        if handler is None:
            self.stats.errors += 1
            return rlerror(tag, errno.EOPNOTSUPP)
        try:
            reply = handler(MessageReader(request[:size]), room).finish(message_type + 1, tag)
        except OSError as err:
            self.stats.errors += 1
            return rlerror(tag, err.errno or errno.EIO)
        except MalformedMessage:
            self.stats.errors += 1
            return rlerror(tag, errno.EINVAL)
        if len(reply) > room:
            self.stats.errors += 1
            return rlerror(tag, errno.ENOBUFS)
        return reply

    def close(self) -> None:
        for fid in list(self._fids):
            self._drop(fid)

    @property
    def fid_count(self) -> int:
        return len(self._fids)

    @property
    def open_file_count(self) -> int:
        return self._open_files

    # ---- helpers ----------------------------------------------------------------------

    def _fid(self, number: int) -> Fid:
        fid = self._fids.get(number)
        if fid is None:
            raise OSError(errno.EBADF, f"fid {number} unknown")
        return fid

    def _check_new_fid(self, number: int) -> None:
        if number == NOFID or number in self._fids:
            raise OSError(errno.EBADF, f"fid {number} in use")
        if len(self._fids) >= self.limits.max_fids:
            raise OSError(errno.EMFILE, "too many fids")

    def _check_open_room(self) -> None:
        if self._open_files >= self.limits.max_open_files:
            raise OSError(errno.EMFILE, "too many open files")

    def _drop(self, number: int) -> None:
        fid = self._fids.pop(number, None)
        if fid is not None and fid.fd is not None:
            os.close(fid.fd)
            self._open_files -= 1

    def _writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only share")

    def _lstat(self, path: Path) -> os.stat_result:
        fd = self._resolve.open(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if self.hide_pseudo_filesystems and st.st_dev != self._root_dev and \
                    filesystem_type(fd) in PSEUDO_FILESYSTEMS:
                raise OSError(errno.ENOENT, "a kernel filesystem (hidden)")
            return st
        finally:
            os.close(fd)

    def _open_dir(self, path: Path) -> int:
        return self._resolve.open(path, os.O_PATH | os.O_DIRECTORY)

    def _parent_and_name(self, path: Path) -> tuple[Path, bytes]:
        if not path:
            raise OSError(errno.EBUSY, "the share's root")
        return path[:-1], path[-1]

    def _rename_fids(self, old: Path, new: Path) -> None:
        """Fids are paths: those at or under a renamed name follow it."""
        for fid in self._fids.values():
            if fid.path[:len(old)] == old:
                fid.path = new + fid.path[len(old):]

    def _host_open(self, path: Path, flags: int, expected: os.stat_result) -> int:
        """Open a regular file `path` found as `expected`; ENXIO for anything else."""
        fd = self._resolve.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != \
                (expected.st_dev, expected.st_ino):
            os.close(fd)
            raise OSError(errno.ENXIO, "not the regular file that was checked")
        return fd

    @staticmethod
    def _host_flags(flags: int) -> int:
        host = flags & _DOTL_ACCMODE
        if host == _DOTL_ACCMODE:
            raise OSError(errno.EINVAL, "bad access mode")
        for dotl, flag in _DOTL_OPEN_FLAGS.items():
            if flags & dotl:
                host |= flag
        return host

    # ---- session -----------------------------------------------------------------------

    def _version(self, r: MessageReader, room: int) -> MessageWriter:
        msize, version = r.u32(), r.string()
        if msize < MIN_MSIZE:
            raise OSError(errno.EINVAL, f"msize {msize} too small")
        self.close()  # a new session: every fid is clunked
        self.msize = min(msize, self.limits.max_msize)
        agreed = VERSION_9P2000_L if version.startswith(VERSION_9P2000_L) else b"unknown"
        return MessageWriter().u32(self.msize).string(agreed)

    def _attach(self, r: MessageReader, room: int) -> MessageWriter:
        number, _afid, _uname, _aname, _n_uname = r.u32(), r.u32(), r.string(), r.string(), r.u32()
        self._check_new_fid(number)
        qid = qid_of(os.fstat(self._root_fd))
        self._fids[number] = Fid(())
        return MessageWriter().qid(qid)

    def _unsupported(self, r: MessageReader, room: int) -> MessageWriter:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    def _flush(self, r: MessageReader, room: int) -> MessageWriter:
        r.u16()  # requests are answered in order: the flushed one already was
        return MessageWriter()

    def _clunk(self, r: MessageReader, room: int) -> MessageWriter:
        number = r.u32()
        self._fid(number)
        self._drop(number)
        return MessageWriter()

    # ---- names ---------------------------------------------------------------------------

    def _walk(self, r: MessageReader, room: int) -> MessageWriter:
        number, new_number, count = r.u32(), r.u32(), r.u16()
        if count > MAX_WALK_NAMES:
            raise OSError(errno.EINVAL, f"{count} names in one walk")
        names = [r.string() for _ in range(count)]
        source = self._fid(number)
        if new_number != number:
            self._check_new_fid(new_number)
        elif source.fd is not None:
            raise OSError(errno.EBADF, "walk of an open fid onto itself")
        path = source.path
        qids = []
        for index, name in enumerate(names):
            try:
                step = path[:-1] if name == b".." else path + (check_name(name),)
                qids.append(qid_of(self._lstat(step)))
            except OSError:
                if index == 0:
                    raise
                break
            path = step
        if len(qids) == count:
            if new_number == number:
                source.path = path
            else:
                self._fids[new_number] = Fid(path)
        reply = MessageWriter().u16(len(qids))
        for qid in qids:
            reply.qid(qid)
        return reply

    def _getattr(self, r: MessageReader, room: int) -> MessageWriter:
        number, _mask = r.u32(), r.u64()  # the basic fields are always sent
        fid = self._fid(number)
        st = os.fstat(fid.fd) if fid.fd is not None else self._lstat(fid.path)
        reply = MessageWriter().u64(GETATTR_BASIC).qid(qid_of(st))
        reply.u32(st.st_mode).u32(st.st_uid).u32(st.st_gid).u64(st.st_nlink).u64(st.st_rdev)
        reply.u64(st.st_size).u64(st.st_blksize).u64(st.st_blocks)
        for ns in (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns):
            reply.u64(ns // 1_000_000_000).u64(ns % 1_000_000_000)
        return reply.u64(0).u64(0).u64(0).u64(0)  # btime, gen, data_version

    def _setattr(self, r: MessageReader, room: int) -> MessageWriter:
        number, valid, mode, uid, gid = r.u32(), r.u32(), r.u32(), r.u32(), r.u32()
        size, atime_s, atime_ns, mtime_s, mtime_ns = r.u64(), r.u64(), r.u64(), r.u64(), r.u64()
        fid = self._fid(number)
        if valid & ~SetattrValid.CTIME:
            self._writable()
        st = self._lstat(fid.path) if fid.fd is None else os.fstat(fid.fd)
        if valid & (SetattrValid.UID | SetattrValid.GID):
            if (valid & SetattrValid.UID and uid != st.st_uid) or \
                    (valid & SetattrValid.GID and gid != st.st_gid):
                raise OSError(errno.EPERM, "files belong to the VMM's user")
        if valid & SetattrValid.MODE:
            self._chmod(fid, mode & ALLOWED_MODE_BITS)
        if valid & SetattrValid.SIZE:
            self._truncate(fid, size, st)
        if valid & (SetattrValid.ATIME | SetattrValid.MTIME):
            now = time.time_ns()

            def when(bit: int, set_bit: int, sec: int, nsec: int, current: int) -> int:
                if not valid & bit:
                    return current
                if valid & set_bit:
                    if nsec >= 1_000_000_000 or sec > MAX_OFFSET // 1_000_000_000:
                        raise OSError(errno.EINVAL, "bad time")
                    return sec * 1_000_000_000 + nsec
                return now
            times = (when(SetattrValid.ATIME, SetattrValid.ATIME_SET, atime_s, atime_ns, st.st_atime_ns),
                     when(SetattrValid.MTIME, SetattrValid.MTIME_SET, mtime_s, mtime_ns, st.st_mtime_ns))
            self._utime(fid, times)
        return MessageWriter()

    def _chmod(self, fid: Fid, mode: int) -> None:
        fd = self._resolve.open(fid.path, os.O_PATH | os.O_NOFOLLOW)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            # fchmod refuses O_PATH fds; the fd's /proc link names exactly
            # this inode, which is no symlink, so nothing further is followed.
            os.chmod(_proc_fd(fd), mode)
        finally:
            os.close(fd)

    def _truncate(self, fid: Fid, size: int, st: os.stat_result) -> None:
        if size > MAX_OFFSET:
            raise OSError(errno.EFBIG, "size too large")
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "a directory")
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if fid.fd is not None and fcntl.fcntl(fid.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            os.ftruncate(fid.fd, size)  # an open file (maybe unlinked since): through its fd
            return
        fd = self._host_open(fid.path, os.O_WRONLY, st)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def _utime(self, fid: Fid, times: tuple[int, int]) -> None:
        if fid.path:
            parent, name = self._parent_and_name(fid.path)
            dir_fd = self._open_dir(parent)
            try:
                os.utime(name, ns=times, dir_fd=dir_fd, follow_symlinks=False)
            finally:
                os.close(dir_fd)
        else:
            os.utime(_proc_fd(self._root_fd), ns=times)

    # ---- files -------------------------------------------------------------------------------

    def _lopen(self, r: MessageReader, room: int) -> MessageWriter:
        number, flags = r.u32(), r.u32()
        fid = self._fid(number)
        if fid.fd is not None:
            raise OSError(errno.EBADF, "fid already open")
        self._check_open_room()
        host = self._host_flags(flags)
        if host & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            self._writable()
        st = self._lstat(fid.path)
        if stat.S_ISDIR(st.st_mode):
            if host & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
                raise OSError(errno.EISDIR, "a directory")
            fid.fd = self._resolve.open(fid.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            fid.is_dir, fid.entries = True, None
        elif stat.S_ISREG(st.st_mode):
            fid.fd = self._host_open(fid.path, host, st)
        elif stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "a symlink")
        else:
            raise OSError(errno.ENXIO, "not a regular file or directory")
        self._open_files += 1
        return MessageWriter().qid(qid_of(st)).u32(0)

    def _lcreate(self, r: MessageReader, room: int) -> MessageWriter:
        number, name, flags, mode, _gid = r.u32(), r.string(), r.u32(), r.u32(), r.u32()
        fid = self._fid(number)
        self._writable()
        check_name(name)
        if fid.fd is not None:
            raise OSError(errno.EBADF, "fid already open")
        self._check_open_room()
        host = self._host_flags(flags) | (os.O_EXCL if flags & _DOTL_EXCL else 0)
        dir_fd = self._open_dir(fid.path)
        try:
            fd = os.open(name, host | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         mode & ALLOWED_MODE_BITS & 0o777, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.ENXIO, "not a regular file")
        fid.path, fid.fd, fid.is_dir = fid.path + (name,), fd, False
        self._open_files += 1
        return MessageWriter().qid(qid_of(st)).u32(0)

    def _open_file(self, number: int) -> Fid:
        fid = self._fid(number)
        if fid.fd is None or fid.is_dir:
            raise OSError(errno.EBADF, "fid not open as a file")
        return fid

    def _read(self, r: MessageReader, room: int) -> MessageWriter:
        number, offset, count = r.u32(), r.u64(), r.u32()
        fid = self._open_file(number)
        if offset > MAX_OFFSET:
            raise OSError(errno.EINVAL, "offset too large")
        assert fid.fd is not None
        data = os.pread(fid.fd, min(count, room - RDATA_HEADER), offset)
        return MessageWriter().u32(len(data)).raw(data)

    def _write(self, r: MessageReader, room: int) -> MessageWriter:
        number, offset, count = r.u32(), r.u64(), r.u32()
        data = r.data(count)
        fid = self._open_file(number)
        self._writable()
        if offset > MAX_OFFSET:
            raise OSError(errno.EINVAL, "offset too large")
        assert fid.fd is not None
        return MessageWriter().u32(os.pwrite(fid.fd, data, offset))

    def _fsync(self, r: MessageReader, room: int) -> MessageWriter:
        fid = self._fid(r.u32())
        datasync = r.u32() if r.remaining >= 4 else 0
        if fid.fd is None:
            raise OSError(errno.EBADF, "fid not open")
        if not self.read_only:
            (os.fdatasync if datasync else os.fsync)(fid.fd)
        return MessageWriter()

    def _lock(self, r: MessageReader, room: int) -> MessageWriter:
        self._fid(r.u32())
        r.u8(), r.u32(), r.u64(), r.u64(), r.u32(), r.string()
        return MessageWriter().u8(LOCK_SUCCESS)

    def _getlock(self, r: MessageReader, room: int) -> MessageWriter:
        self._fid(r.u32())
        _kind, start, length, proc_id, client = r.u8(), r.u64(), r.u64(), r.u32(), r.string()
        return MessageWriter().u8(LOCK_TYPE_UNLOCK).u64(start).u64(length).u32(proc_id).string(client)

    # ---- directories ---------------------------------------------------------------------------
