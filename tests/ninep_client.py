"""A minimal 9P2000.L client for tests: encodes T-messages the way Linux's
net/9p/client.c lays them out, decodes R-messages. Written from the protocol
description, independent of microvmm/devices/ninep (so it checks the server,
not itself)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

NOFID = 0xFFFFFFFF
RLERROR = 7

T = {
    "statfs": 8, "lopen": 12, "lcreate": 14, "symlink": 16, "mknod": 18, "rename": 20,
    "readlink": 22, "getattr": 24, "setattr": 26, "xattrwalk": 30, "xattrcreate": 32,
    "readdir": 40, "fsync": 50, "lock": 52, "getlock": 54, "link": 70, "mkdir": 72,
    "renameat": 74, "unlinkat": 76, "version": 100, "auth": 102, "attach": 104,
    "flush": 108, "walk": 110, "read": 116, "write": 118, "clunk": 120, "remove": 122,
}


def s(value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    return struct.pack("<H", len(value)) + value


def message(kind: str | int, tag: int, body: bytes) -> bytes:
    number = T[kind] if isinstance(kind, str) else kind
    return struct.pack("<IBH", 7 + len(body), number, tag) + body


class NinePError(OSError):
    pass


@dataclass
class Reply:
    type: int
    tag: int
    body: bytes

    def u32(self, at: int) -> int:
        return struct.unpack_from("<I", self.body, at)[0]

    def u64(self, at: int) -> int:
        return struct.unpack_from("<Q", self.body, at)[0]


def parse_reply(data: bytes) -> Reply:
    size, kind, tag = struct.unpack_from("<IBH", data)
    assert size == len(data), (size, len(data))
    return Reply(kind, tag, data[7:])


class Client:
    """Sends through `transport(request_bytes) -> reply_bytes`; raises NinePError on Rlerror."""

    def __init__(self, transport: Callable[[bytes], bytes]):
        self.transport = transport
        self.tag = 0
        self.next_fid = 1

    def rpc(self, kind: str, body: bytes) -> Reply:
        self.tag = (self.tag + 1) % 0xFFFF
        reply = parse_reply(self.transport(message(kind, self.tag, body)))
        assert reply.tag == self.tag
        if reply.type == RLERROR:
            code = reply.u32(0)
            raise NinePError(code, f"{kind}: errno {code}")
        assert reply.type == T[kind] + 1, (kind, reply.type)
        return reply

    def fid(self) -> int:
        self.next_fid += 1
        return self.next_fid

    # session
    def version(self, msize: int = 65536, version: str = "9P2000.L") -> tuple[int, bytes]:
        r = self.rpc("version", struct.pack("<I", msize) + s(version))
        return r.u32(0), r.body[6:6 + struct.unpack_from("<H", r.body, 4)[0]]

    def attach(self, fid: int = 1) -> bytes:
        return self.rpc("attach", struct.pack("<II", fid, NOFID) + s("root") + s("") +
                        struct.pack("<I", 0)).body

    def walk(self, fid: int, newfid: int, *names: bytes | str) -> list[bytes]:
        r = self.rpc("walk", struct.pack("<IIH", fid, newfid, len(names)) + b"".join(s(n) for n in names))
        count = struct.unpack_from("<H", r.body)[0]
        return [r.body[2 + 13 * i:15 + 13 * i] for i in range(count)]

    def walk_to(self, *names: bytes | str, root: int = 1) -> int:
        fid = self.fid()
        qids = self.walk(root, fid, *names)
        if len(qids) != len(names):
            self.clunk(fid) if len(names) == 0 else None
            raise NinePError(2, f"partial walk {len(qids)}/{len(names)}")
        return fid

    def clunk(self, fid: int) -> None:
        self.rpc("clunk", struct.pack("<I", fid))

    def getattr(self, fid: int) -> dict:
        r = self.rpc("getattr", struct.pack("<IQ", fid, 0x7FF))
        qtype = r.body[8]
        mode, uid, gid, nlink, rdev, size = struct.unpack_from("<IIIQQQ", r.body, 21)
        mtime = struct.unpack_from("<Q", r.body, 21 + 36 + 16 + 16)[0]
        return {"qtype": qtype, "mode": mode, "uid": uid, "gid": gid, "nlink": nlink,
                "size": size, "mtime": mtime}

    def lopen(self, fid: int, flags: int) -> bytes:
        return self.rpc("lopen", struct.pack("<II", fid, flags)).body

    def lcreate(self, fid: int, name: bytes | str, flags: int = 0o1 | 0o100, mode: int = 0o644) -> bytes:
        return self.rpc("lcreate", struct.pack("<I", fid) + s(name) + struct.pack("<III", flags, mode, 0)).body

    def read(self, fid: int, offset: int, count: int) -> bytes:
        r = self.rpc("read", struct.pack("<IQI", fid, offset, count))
        return r.body[4:4 + r.u32(0)]

    def write(self, fid: int, offset: int, data: bytes) -> int:
        return self.rpc("write", struct.pack("<IQI", fid, offset, len(data)) + data).u32(0)

    def readdir(self, fid: int, offset: int = 0, count: int = 8192) -> list[tuple[bytes, int, int]]:
        r = self.rpc("readdir", struct.pack("<IQI", fid, offset, count))
        data, at, out = r.body[4:4 + r.u32(0)], 0, []
        while at < len(data):
            next_offset = struct.unpack_from("<Q", data, at + 13)[0]
            kind = data[at + 21]
            length = struct.unpack_from("<H", data, at + 22)[0]
            out.append((data[at + 24:at + 24 + length], next_offset, kind))
            at += 24 + length
        return out

    def readdir_all(self, fid: int) -> list[bytes]:
        names, offset = [], 0
        while True:
            batch = self.readdir(fid, offset)
            if not batch:
                return names
            names += [n for n, _, _ in batch]
            offset = batch[-1][1]

    def mkdir(self, fid: int, name: bytes | str, mode: int = 0o755) -> bytes:
        return self.rpc("mkdir", struct.pack("<I", fid) + s(name) + struct.pack("<II", mode, 0)).body

    def unlinkat(self, fid: int, name: bytes | str, flags: int = 0) -> None:
        self.rpc("unlinkat", struct.pack("<I", fid) + s(name) + struct.pack("<I", flags))

    def renameat(self, olddir: int, oldname: bytes | str, newdir: int, newname: bytes | str) -> None:
        self.rpc("renameat", struct.pack("<I", olddir) + s(oldname) + struct.pack("<I", newdir) + s(newname))

    def rename(self, fid: int, newdir: int, newname: bytes | str) -> None:
        self.rpc("rename", struct.pack("<II", fid, newdir) + s(newname))

    def symlink(self, fid: int, name: bytes | str, target: bytes | str) -> None:
        self.rpc("symlink", struct.pack("<I", fid) + s(name) + s(target) + struct.pack("<I", 0))

    def link(self, dirfid: int, fid: int, name: bytes | str) -> None:
        self.rpc("link", struct.pack("<II", dirfid, fid) + s(name))

    def readlink(self, fid: int) -> bytes:
        r = self.rpc("readlink", struct.pack("<I", fid))
        return r.body[2:2 + struct.unpack_from("<H", r.body)[0]]

    def setattr(self, fid: int, valid: int, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0,
                atime: tuple[int, int] = (0, 0), mtime: tuple[int, int] = (0, 0)) -> None:
        self.rpc("setattr", struct.pack("<IIIIIQQQQQ", fid, valid, mode, uid, gid, size, *atime, *mtime))

    def statfs(self, fid: int) -> tuple[int, int]:
        r = self.rpc("statfs", struct.pack("<I", fid))
        return r.u32(0), r.u32(4)

    def fsync(self, fid: int) -> None:
        self.rpc("fsync", struct.pack("<II", fid, 0))

    def mknod(self, fid: int, name: str) -> None:
        self.rpc("mknod", struct.pack("<I", fid) + s(name) + struct.pack("<IIII", 0o10644, 0, 0, 0))

    def xattrwalk(self, fid: int, newfid: int, name: str) -> None:
        self.rpc("xattrwalk", struct.pack("<II", fid, newfid) + s(name))

    def lock(self, fid: int) -> int:
        return self.rpc("lock", struct.pack("<IBIQQI", fid, 1, 0, 0, 0, 1) + s("guest")).body[0]

    def flush(self, oldtag: int) -> None:
        self.rpc("flush", struct.pack("<H", oldtag))

    def remove(self, fid: int) -> None:
        self.rpc("remove", struct.pack("<I", fid))
