"""The 9P2000.L operations on a share's names (NinePServer's half that
changes or lists directories): readdir, mkdir, symlink, mknod (refused),
link, readlink, unlinkat, remove, rename(at), statfs.

A mixin of NinePServer (server.py), which holds the fids, the resolver and
the checks these use (`_fid`, `_in_dir`, `_writable`, `_lstat`...); the same
rules hold here: every name is checked, every path resolved beneath the
share's root without following symlinks, `read_only` refuses changes.
"""

from __future__ import annotations

import errno
import os
import stat

from microvmm.devices.ninep.fids import ALLOWED_MODE_BITS, MAX_SYMLINK_TARGET, Fid, qid_of
from microvmm.devices.ninep.protocol import (
    AT_REMOVEDIR,
    RDATA_HEADER,
    V9FS_MAGIC,
    MessageReader,
    MessageWriter,
    QidType,
)
from microvmm.devices.ninep.resolve import Path, check_name


#: d_type values in Rreaddir.
DT_UNKNOWN, DT_DIR, DT_REG, DT_LNK = 0, 4, 8, 10


class NamespaceOps:
    """Directory-changing and listing requests (see the module docstring)."""

    def _readdir(self, r: MessageReader, room: int) -> MessageWriter:
        number, offset, count = r.u32(), r.u64(), r.u32()
        fid = self._fid(number)
        if fid.fd is None or not fid.is_dir:
            raise OSError(errno.EBADF, "fid not open as a directory")
        if offset == 0 or fid.entries is None:
            fid.entries = self._list(fid)
        budget = min(count, room - RDATA_HEADER)
        body = MessageWriter()
        index = offset
        while index < len(fid.entries):
            name, qid, kind = fid.entries[index]
            if len(body) + 24 + len(name) > budget:
                break
            index += 1
            body.qid(qid).u64(index).u8(kind).string(name)
        return MessageWriter().u32(len(body)).raw(body.payload())

    def _list(self, fid: Fid) -> list[tuple[bytes, tuple[int, int, int], int]]:
        assert fid.fd is not None
        own = os.fstat(fid.fd)
        try:
            parent = self._lstat(fid.path[:-1]) if fid.path else own
        except OSError:
            parent = own
        entries = [(b".", qid_of(own), DT_DIR), (b"..", qid_of(parent), DT_DIR)]
        os.lseek(fid.fd, 0, os.SEEK_SET)
        with os.scandir(fid.fd) as listing:
            for entry in listing:
                if entry.is_symlink():
                    kind, qtype = DT_LNK, QidType.SYMLINK
                elif entry.is_dir(follow_symlinks=False):
                    kind, qtype = DT_DIR, QidType.DIR
                elif entry.is_file(follow_symlinks=False):
                    kind, qtype = DT_REG, QidType.FILE
                else:
                    kind, qtype = DT_UNKNOWN, QidType.FILE
                entries.append((os.fsencode(entry.name), (int(qtype), 0, entry.inode()), kind))
        return entries

    def _in_dir(self, number: int, name: bytes) -> tuple[Fid, int]:
        """A directory fid's host fd (O_PATH; caller closes) for an operation on `name`."""
        fid = self._fid(number)
        check_name(name)
        return fid, self._open_dir(fid.path)

    def _mkdir(self, r: MessageReader, room: int) -> MessageWriter:
        number, name, mode, _gid = r.u32(), r.string(), r.u32(), r.u32()
        self._writable()
        _, dir_fd = self._in_dir(number, name)
        try:
            os.mkdir(name, mode & ALLOWED_MODE_BITS, dir_fd=dir_fd)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)
        return MessageWriter().qid(qid_of(st))

    def _symlink(self, r: MessageReader, room: int) -> MessageWriter:
        number, name, target, _gid = r.u32(), r.string(), r.string(), r.u32()
        self._writable()
        if not target or b"\0" in target:
            raise OSError(errno.ENOENT if not target else errno.EINVAL, "bad symlink target")
        if len(target) > MAX_SYMLINK_TARGET:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        _, dir_fd = self._in_dir(number, name)
        try:
            # The target is only ever text to the host: no symlink is followed here.
            os.symlink(target, name, dir_fd=dir_fd)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)
        return MessageWriter().qid(qid_of(st))

    def _mknod(self, r: MessageReader, room: int) -> MessageWriter:
        self._fid(r.u32())
        r.string(), r.u32(), r.u32(), r.u32(), r.u32()
        self._writable()
        raise OSError(errno.EPERM, "no device nodes, FIFOs or sockets in a share")

    def _link(self, r: MessageReader, room: int) -> MessageWriter:
        dir_number, number, name = r.u32(), r.u32(), r.string()
        self._writable()
        source = self._fid(number)
        parent, old_name = self._parent_and_name(source.path)
        _, dir_fd = self._in_dir(dir_number, name)
        try:
            source_dir = self._open_dir(parent)
            try:
                os.link(old_name, name, src_dir_fd=source_dir, dst_dir_fd=dir_fd, follow_symlinks=False)
            finally:
                os.close(source_dir)
        finally:
            os.close(dir_fd)
        return MessageWriter()

    def _readlink(self, r: MessageReader, room: int) -> MessageWriter:
        fid = self._fid(r.u32())
        parent, name = self._parent_and_name(fid.path)
        dir_fd = self._open_dir(parent)
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        return MessageWriter().string(target)

    def _unlinkat(self, r: MessageReader, room: int) -> MessageWriter:
        number, name, flags = r.u32(), r.string(), r.u32()
        self._writable()
        _, dir_fd = self._in_dir(number, name)
        try:
            if flags & AT_REMOVEDIR:
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        return MessageWriter()

    def _remove(self, r: MessageReader, room: int) -> MessageWriter:
        number = r.u32()
        fid = self._fid(number)
        try:
            self._writable()
            parent, name = self._parent_and_name(fid.path)
            st = self._lstat(fid.path)
            dir_fd = self._open_dir(parent)
            try:
                (os.rmdir if stat.S_ISDIR(st.st_mode) else os.unlink)(name, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            self._drop(number)  # Tremove clunks the fid even when it fails
        return MessageWriter()

    def _do_rename(self, old_dir: Path, old_name: bytes, new_dir: Path, new_name: bytes) -> None:
        check_name(old_name)
        check_name(new_name)
        self._writable()
        source = self._open_dir(old_dir)
        try:
            target = self._open_dir(new_dir)
            try:
                os.rename(old_name, new_name, src_dir_fd=source, dst_dir_fd=target)
            finally:
                os.close(target)
        finally:
            os.close(source)
        self._rename_fids(old_dir + (old_name,), new_dir + (new_name,))

    def _renameat(self, r: MessageReader, room: int) -> MessageWriter:
        old_number, old_name, new_number, new_name = r.u32(), r.string(), r.u32(), r.string()
        self._do_rename(self._fid(old_number).path, old_name, self._fid(new_number).path, new_name)
        return MessageWriter()

    def _rename(self, r: MessageReader, room: int) -> MessageWriter:
        fid, new_dir, new_name = self._fid(r.u32()), self._fid(r.u32()), r.string()
        parent, name = self._parent_and_name(fid.path)
        self._do_rename(parent, name, new_dir.path, new_name)
        return MessageWriter()

    def _statfs(self, r: MessageReader, room: int) -> MessageWriter:
        self._fid(r.u32())
        fs = os.fstatvfs(self._root_fd)
        return (MessageWriter().u32(V9FS_MAGIC).u32(fs.f_bsize).u64(fs.f_blocks).u64(fs.f_bfree)
                .u64(fs.f_bavail).u64(fs.f_files).u64(fs.f_ffree).u64(fs.f_fsid).u32(fs.f_namemax))
