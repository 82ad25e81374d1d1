"""What the 9P server keeps per guest fid, and the qids it reports."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from microvmm.devices.ninep.protocol import QidType
from microvmm.devices.ninep.resolve import Path

#: Most bytes of a symlink target (PATH_MAX with its NUL).
MAX_SYMLINK_TARGET = 4095
#: Permission bits a guest may set: no set-user-ID, no set-group-ID.
ALLOWED_MODE_BITS = 0o1777


@dataclass
class Fid:
    """A guest fid: its path under the root and, once opened, its host fd."""

    path: Path
    fd: int | None = None
    is_dir: bool = False
    #: Rreaddir's snapshot: (name, qid, d_type), taken at offset 0.
    entries: list[tuple[bytes, tuple[int, int, int], int]] | None = None


def qid_of(st: os.stat_result) -> tuple[int, int, int]:
    if stat.S_ISDIR(st.st_mode):
        kind = QidType.DIR
    elif stat.S_ISLNK(st.st_mode):
        kind = QidType.SYMLINK
    else:
        kind = QidType.FILE
    return int(kind), 0, st.st_ino
