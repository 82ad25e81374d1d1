#!/usr/bin/env python3
"""Hostile 9P2000.L messages against the virtio-9p file server.

Each case is one message from a seeded random.Random: mostly well-formed
operations with hostile fields (names like '..', 'a/b', NUL bytes, 300-byte
names, symlinks to outside the share, stale and huge fids, huge offsets and
counts, every open flag), the rest mangled bytes (truncated, a wrong size
field, flipped bytes, unknown types), with a random amount of reply room.
The server runs on a share inside a temporary directory next to a canary
directory; checked after every case: the reply is a well-formed R-message
for the request's tag that fits its room (or MalformedMessage, only when
the request has no header or there is no room), no other exception; and
every 500 cases and at the end, the canary's files, their contents and
times (a read would move the atime, set older than the mtime), and the
temporary directory's own entries are unchanged: nothing outside the share
was created, opened for reading, written or removed.

Usage: python3 fuzz/fuzz_9p.py [--cases N] [--seed S] [--resolver openat2|walk]
Prints the number of cases, requests answered by error, crashes and escapes;
exit status 1 on any crash or escape. Replay one case: --seed S --cases N
(cases are deterministic for a seed and run in order).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from microvmm.devices.ninep.protocol import HEADER, MalformedMessage  # noqa: E402
from microvmm.devices.ninep.resolve import ComponentWalkResolver, Openat2Resolver  # noqa: E402
from microvmm.devices.ninep.server import NinePServer, ShareLimits  # noqa: E402

NAMES = [b"..", b".", b"", b"up", b"abs", b"canarydir", b"magic", b"dir", b"hello.txt", b"a/b",
         b"../canary", b"/etc", b"x\0y", b"x" * 300, b"new", b"sub", b"f1", b"f2", b"secret",
         b"canary", b"proc", b"\xff\xfe"]
TYPES = [8, 12, 14, 16, 18, 20, 22, 24, 26, 30, 32, 40, 50, 52, 54, 70, 72, 74, 76, 100, 102, 104,
         108, 110, 116, 118, 120, 122]
#: Walks, opens and creates often (they make the fids the rest act on);
#: Tversion rarely (it clunks every fid).
WEIGHTS = [{110: 8, 12: 4, 14: 3, 104: 2, 116: 3, 118: 3, 40: 2, 100: 0.1}.get(t, 1) for t in TYPES]
CHECK_EVERY = 500
SESSION_CASES = 300
RESOLVERS = {"openat2": Openat2Resolver, "walk": ComponentWalkResolver}


@dataclass
class FuzzResult:
    cases: int = 0
    error_replies: int = 0
    crashes: list[str] = field(default_factory=list)
    escapes: list[str] = field(default_factory=list)


def _s(value: bytes) -> bytes:
    return struct.pack("<H", len(value)) + value


class Generator:
    """`live()` and `opened()` peek at the server's fids, so that most
    operations act on fids that exist (walked, opened): hostile sequences,
    not only hostile single messages."""

    def __init__(self, rng: random.Random, live=lambda: [], opened=lambda: []):
        self.rng = rng
        self.live = live
        self.opened = opened

    def fid(self) -> int:
        r = self.rng.random()
        pool = self.opened() if r < 0.3 else self.live()
        if r < 0.75 and pool:
            return self.rng.choice(pool)
        if r < 0.9:
            return self.rng.randrange(0, 24)
        return self.rng.choice([0xFFFFFFFF, 0xFFFFFFFE, self.rng.getrandbits(32)])

    def new_fid(self) -> int:
        """Mostly a fid number not in use (walk, xattrwalk targets)."""
        if self.rng.random() < 0.8:
            live = set(self.live())
            return self.rng.choice([n for n in range(24, 40) if n not in live] or [99])
        return self.fid()

    def name(self) -> bytes:
        if self.rng.random() < 0.9:
            return self.rng.choice(NAMES)
        return bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(0, 12)))

    def u64(self) -> int:
        return self.rng.choice([0, 1, 4096, self.rng.randrange(0, 1 << 20), (1 << 63) - 1, 1 << 63,
                                (1 << 64) - 1, self.rng.getrandbits(64)])

    def u32(self) -> int:
        return self.rng.choice([0, 1, 0o100 | 2, 0o1000 | 1, 0o2000 | 1, 0o200 | 0o100 | 2, 3, 0x200,
                                self.rng.randrange(0, 1 << 16), self.rng.getrandbits(32)])

    def body(self, kind: int) -> bytes:
        g, p = self, struct.pack
        bodies = {
            8: lambda: p("<I", g.fid()),
            12: lambda: p("<II", g.fid(), g.u32()),
            14: lambda: p("<I", g.fid()) + _s(g.name()) + p("<III", g.u32(), g.u32(), 0),
            16: lambda: p("<I", g.fid()) + _s(g.name()) + _s(g.rng.choice([b"/etc/passwd", b"..", b"x", b""]))
            + p("<I", 0),
            18: lambda: p("<I", g.fid()) + _s(g.name()) + p("<IIII", g.u32(), 1, 3, 0),
            20: lambda: p("<II", g.fid(), g.fid()) + _s(g.name()),
            22: lambda: p("<I", g.fid()),
            24: lambda: p("<IQ", g.fid(), g.u64()),
            26: lambda: p("<IIIIIQQQQQ", g.fid(), g.rng.getrandbits(9), g.u32(), g.u32(), g.u32(),
                          g.rng.choice([0, 5, 1 << 20, g.u64()]), g.u64(), g.u64(), g.u64(), g.u64()),
            30: lambda: p("<II", g.fid(), g.new_fid()) + _s(g.name()),
            32: lambda: p("<I", g.fid()) + _s(g.name()) + p("<QI", g.u64(), g.u32()),
            40: lambda: p("<IQI", g.fid(), g.u64(), g.u32()),
            50: lambda: p("<II", g.fid(), g.u32()),
            52: lambda: p("<IBIQQI", g.fid(), 1, 0, 0, 0, 1) + _s(b"c"),
            54: lambda: p("<IBQQI", g.fid(), 1, g.u64(), g.u64(), 1) + _s(b"c"),
            70: lambda: p("<II", g.fid(), g.fid()) + _s(g.name()),
            72: lambda: p("<I", g.fid()) + _s(g.name()) + p("<II", g.u32(), 0),
            74: lambda: p("<I", g.fid()) + _s(g.name()) + p("<I", g.fid()) + _s(g.name()),
            76: lambda: p("<I", g.fid()) + _s(g.name()) + p("<I", g.rng.choice([0, 0x200, g.u32()])),
            100: lambda: p("<I", g.rng.choice([0, 100, 4096, 8192, 65536, 1 << 31])) + _s(
                g.rng.choice([b"9P2000.L", b"9P2000", b""])),
            102: lambda: p("<I", g.fid()) + _s(b"u") + _s(b"") + p("<I", 0),
            104: lambda: p("<II", g.fid(), 0xFFFFFFFF) + _s(b"u") + _s(g.name()) + p("<I", 0),
            108: lambda: p("<H", g.rng.getrandbits(16)),
            110: lambda: self.walk(),
            116: lambda: p("<IQI", g.fid(), g.u64(), g.u32()),
            118: lambda: self.write(),
            120: lambda: p("<I", g.fid()),
            122: lambda: p("<I", g.fid()),
        }
        return bodies[kind]()

    def walk(self) -> bytes:
        count = self.rng.choice([0, 1, 1, 2, 3, 16, 17, 100])
        names = [self.name() for _ in range(min(count, 20))]
        return struct.pack("<IIH", self.fid(), self.new_fid(), count) + b"".join(_s(n) for n in names)

    def write(self) -> bytes:
        data = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(0, 64)))
        count = len(data) if self.rng.random() < 0.8 else self.u32()
        return struct.pack("<IQI", self.fid(), self.rng.choice([0, 3, 1 << 30, self.u64()]), count) + data

    def message(self) -> bytes:
        kind = self.rng.choices(TYPES, WEIGHTS)[0] if self.rng.random() < 0.97 else self.rng.randrange(256)
        body = self.body(kind) if kind in TYPES else bytes(self.rng.randrange(256) for _ in range(8))
        tag = self.rng.getrandbits(16)
        data = bytearray(HEADER.pack(7 + len(body), kind, tag) + body)
        mangle = self.rng.random()
        if mangle < 0.08:
            data = data[:self.rng.randrange(0, len(data) + 1)]
        elif mangle < 0.14:
            struct.pack_into("<I", data, 0, self.rng.choice([0, 6, 7, len(data) + 1, self.rng.getrandbits(32)]))
        elif mangle < 0.22:
            for _ in range(self.rng.randrange(1, 4)):
                data[self.rng.randrange(len(data))] = self.rng.getrandbits(8)
        return bytes(data)


def _read_noatime(path: Path) -> bytes:
    """The checker's own reads must not move the atime it checks (O_NOATIME: owner or root)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def _state_of(base: Path, canary: Path) -> list:
    entries = sorted(os.listdir(base))
    files = []
    for path in sorted(canary.rglob("*")):
        st = path.lstat()
        files.append((str(path), st.st_mode, st.st_size, st.st_mtime_ns, st.st_atime_ns,
                      _read_noatime(path) if path.is_file() and not path.is_symlink() else b""))
    return [entries, files, canary.stat().st_mtime_ns]


def make_share(base: Path) -> tuple[Path, Path]:
    share, canary = base / "share", base / "canary"
    share.mkdir()
    canary.mkdir()
    (canary / "secret").write_text("host secret\n")
    (canary / "sub").mkdir()
    (canary / "sub" / "deep").write_text("deep\n")
    os.utime(canary / "secret", (1, time.time()))  # any read moves the atime (relatime)
    os.utime(canary / "sub" / "deep", (1, time.time()))
    (share / "hello.txt").write_text("hello\n")
    (share / "dir").mkdir()
    (share / "dir" / "f1").write_text("f1\n")
    os.symlink("../canary/secret", share / "up")
    os.symlink("/etc/passwd", share / "abs")
    os.symlink(str(canary), share / "canarydir")
    os.symlink("/proc/self/root", share / "magic")
    os.symlink("../canary", share / "dir" / "sub")
    return share, canary


def check_reply(request: bytes, room: int, reply: bytes) -> str | None:
    if len(reply) > room:
        return f"reply of {len(reply)} bytes for {room} bytes of room"
    if len(reply) < 7:
        return "reply shorter than a header"
    size, kind, tag = HEADER.unpack_from(reply)
    if size != len(reply):
        return f"reply size field {size} != {len(reply)}"
    request_tag = struct.unpack_from("<H", request, 5)[0]
    if tag != request_tag:
        return f"reply tag {tag} != request tag {request_tag}"
    if kind != 7 and kind != request[4] + 1:
        return f"reply type {kind} for request type {request[4]}"
    return None


def run_cases(base: Path, seed: int, cases: int, resolver="openat2") -> FuzzResult:
    """`resolver`: a RESOLVERS name, or a class taking the root fd (tests pass a broken one)."""
    share, canary = make_share(Path(base))
    before = _state_of(Path(base), canary)
    rng = random.Random(seed)
    root_fd = os.open(share, os.O_PATH | os.O_DIRECTORY)
    chosen = RESOLVERS[resolver](root_fd) if isinstance(resolver, str) else resolver(root_fd)
    result = FuzzResult()
    server = NinePServer(root_fd, chosen, limits=ShareLimits(max_fids=64, max_open_files=16))
    fids = server._fids  # (read-only peeking, for the generator's choice of fids)
    generator = Generator(rng, live=lambda: list(fids),
                          opened=lambda: [n for n, f in fids.items() if f.fd is not None])
    attach = HEADER.pack(7 + 4 + 4 + 2 + 1 + 2 + 4, 104, 1) + struct.pack("<II", 1, 0xFFFFFFFF) + _s(b"u") \
        + _s(b"") + struct.pack("<I", 0)
    try:
        for case in range(cases):
            if case % SESSION_CASES == 0:
                server.handle(HEADER.pack(7 + 4 + 10, 100, 0) + struct.pack("<I", 65536) + _s(b"9P2000.L"),
                              65536)
                server.handle(attach, 65536)
                for fid_number in range(2, 6):  # a few walked fids to work with
                    server.handle(HEADER.pack(7 + 10 + 5, 110, 2) + struct.pack("<IIH", 1, fid_number, 1)
                                  + _s(b"dir"), 65536)
            request = generator.message()
            room = rng.choice([65536, 8192, 200, 24, 11, 7, 0])
            result.cases += 1
            try:
                reply = server.handle(request, room)
            except MalformedMessage:
                if len(request) >= 7 and room >= 11:
                    result.crashes.append(f"case {case}: MalformedMessage for a {len(request)}-byte request "
                                          f"with {room} bytes of room")
                continue
            except Exception:  # noqa: BLE001 (anything else is a crash)
                result.crashes.append(f"case {case}: {request!r}\n{traceback.format_exc()}")
                continue
            problem = check_reply(request, room, reply)
            if problem:
                result.crashes.append(f"case {case}: {problem}: {request!r}")
            elif reply[4] == 7:
                result.error_replies += 1
            if case % CHECK_EVERY == CHECK_EVERY - 1 and _state_of(Path(base), canary) != before:
                result.escapes.append(f"outside the share changed by case {case} or earlier")
                before = _state_of(Path(base), canary)
        if _state_of(Path(base), canary) != before:
            result.escapes.append("outside the share changed by the end")
    finally:
        server.close()
        os.close(root_fd)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--resolver", choices=("openat2", "walk"), default="openat2")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz9p-") as base:
        result = run_cases(Path(base), args.seed, args.cases, args.resolver)
    elapsed = time.monotonic() - started
    print(f"cases tried: {result.cases} (seed {args.seed}, resolver {args.resolver})")
    print(f"answered with Rlerror: {result.error_replies}")
    print(f"crashes: {len(result.crashes)}")
    print(f"escapes (changes outside the share): {len(result.escapes)}")
    print(f"time: {elapsed:.1f} s ({result.cases / elapsed:,.0f} cases/s)")
    for line in (result.crashes + result.escapes)[:5]:
        print(line)
    return 1 if result.crashes or result.escapes else 0


if __name__ == "__main__":
    sys.exit(main())
