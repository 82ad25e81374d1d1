"""9P2000.L wire format: message types, bounds-checked decoding, encoding.

Every message is `size[4] type[1] tag[2]` and a body of little-endian
integers, strings (`len[2]` + bytes) and qids (`type[1] version[4]
path[8]`). Learned from the protocol description (9p.io, the kernel's
Documentation/filesystems/9p.rst and include/net/9p/9p.h for the numbers);
nothing here is taken from another implementation.

Names stay bytes throughout: the server hands them to os.* as bytes paths, so
no guest string is ever decoded.
"""

from __future__ import annotations

import enum
import struct

HEADER = struct.Struct("<IBH")
HEADER_SIZE = HEADER.size  # 7
#: An Rlerror: header + ecode[4]; the least room a reply needs.
RLERROR_SIZE = HEADER_SIZE + 4
#: Rread / Rreaddir header: header + count[4].
RDATA_HEADER = HEADER_SIZE + 4
NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
#: Most names one Twalk may carry (P9_MAXWELEM).
MAX_WALK_NAMES = 16
VERSION_9P2000_L = b"9P2000.L"


class MessageType(enum.IntEnum):
    """T-message numbers (the R-message is the number + 1); RLERROR answers any of them."""

    RLERROR = 7
    TSTATFS = 8
    TLOPEN = 12
    TLCREATE = 14
    TSYMLINK = 16
    TMKNOD = 18
    TRENAME = 20
    TREADLINK = 22
    TGETATTR = 24
    TSETATTR = 26
    TXATTRWALK = 30
    TXATTRCREATE = 32
    TREADDIR = 40
    TFSYNC = 50
    TLOCK = 52
    TGETLOCK = 54
    TLINK = 70
    TMKDIR = 72
    TRENAMEAT = 74
    TUNLINKAT = 76
    TVERSION = 100
    TAUTH = 102
    TATTACH = 104
    TFLUSH = 108
    TWALK = 110
    TREAD = 116
    TWRITE = 118
    TCLUNK = 120
    TREMOVE = 122


class QidType(enum.IntFlag):
    FILE = 0x00
    SYMLINK = 0x02
    DIR = 0x80


class SetattrValid(enum.IntFlag):
    MODE = 0x001
    UID = 0x002
    GID = 0x004
    SIZE = 0x008
    ATIME = 0x010
    MTIME = 0x020
    CTIME = 0x040
    ATIME_SET = 0x080
    MTIME_SET = 0x100


#: Tgetattr's `valid`: the basic fields (mode .. blocks) are always filled.
GETATTR_BASIC = 0x000007FF
#: Tlock's status and Tgetlock's type values.
LOCK_SUCCESS = 0
LOCK_TYPE_UNLOCK = 2
#: The 9p filesystem magic Tstatfs reports (V9FS_MAGIC).
V9FS_MAGIC = 0x01021997
#: Tunlinkat flag: remove a directory (AT_REMOVEDIR).
AT_REMOVEDIR = 0x200

QID = struct.Struct("<BIQ")
QID_SIZE = QID.size  # 13


class MalformedMessage(Exception):
    """A field runs past the message's end or breaks a protocol rule."""


class MessageReader:
    """Reads the body of one message; every read is checked against its end."""

    def __init__(self, data: bytes, start: int = HEADER_SIZE):
        self._data = data
        self._pos = start

    def _take(self, count: int) -> bytes:
        end = self._pos + count
        if end > len(self._data):
            raise MalformedMessage(f"field of {count} bytes runs past the message end ({len(self._data)})")
        chunk = self._data[self._pos:end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self._take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "little")

    def string(self) -> bytes:
        return self._take(self.u16())

    def data(self, count: int) -> bytes:
        return self._take(count)

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos


class MessageWriter:
    """Builds one R-message body; `finish` puts the header in front."""

    def __init__(self) -> None:
        self._body = bytearray()

    def u8(self, value: int) -> "MessageWriter":
        self._body += value.to_bytes(1, "little")
        return self

    def u16(self, value: int) -> "MessageWriter":
        self._body += value.to_bytes(2, "little")
        return self

    def u32(self, value: int) -> "MessageWriter":
        self._body += (value & 0xFFFFFFFF).to_bytes(4, "little")
        return self

    def u64(self, value: int) -> "MessageWriter":
        self._body += (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
        return self

    def string(self, value: bytes) -> "MessageWriter":
        if len(value) > 0xFFFF:
            raise ValueError("9P string longer than 65535 bytes")
        self.u16(len(value))
        self._body += value
        return self

    def qid(self, qid: tuple[int, int, int]) -> "MessageWriter":
        self._body += QID.pack(*qid)
        return self

    def raw(self, data: bytes | bytearray | memoryview) -> "MessageWriter":
        self._body += data
        return self

    def __len__(self) -> int:
        return len(self._body)

    def payload(self) -> bytes:
        return bytes(self._body)

    def finish(self, message_type: int, tag: int) -> bytes:
        return HEADER.pack(HEADER_SIZE + len(self._body), message_type, tag) + bytes(self._body)


def rlerror(tag: int, errno_value: int) -> bytes:
    return MessageWriter().u32(errno_value).finish(MessageType.RLERROR, tag)


def string_size(value: bytes) -> int:
    return 2 + len(value)
