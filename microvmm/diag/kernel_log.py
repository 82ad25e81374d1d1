"""The guest kernel's log read from its printk ring buffer in guest RAM.

The kernel's log port (microvmm.kmsg) carries every printk once the guest's
virtio-console has added the port. What was printed before that is in the
kernel's ring buffer only: Linux 6.1's hvc console does replay it when it
registers (CON_PRINTBUFFER), but virtio_console's init_port_console calls
hvc_alloc (which registers the console and replays) before it lists the port
among its consoles, so the replayed text is dropped (put_chars finds no port
and returns -EPIPE). So the VMM reads those records itself, from guest RAM,
found through System.map: at the first byte on the port (to show the early
log in front of it) and when a guest stops before the port ever came up (an
early panic, then panic=-1's reset).

Layout: kernel/printk/printk_ringbuffer.h of Linux 5.10 to 6.1 (struct
printk_ringbuffer, prb_desc, printk_info, data blocks `{unsigned long id;
char text[]}`), x86-64, a kernel at its link address (no KASLR). The guest
is untrusted: every address, index and length is checked against guest RAM
(GuestMemory raises GuestMemoryError) and the ring's own bounds; a record
that does not check out is skipped, an unusable ring is a KernelLogError.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microvmm.memory import GuestMemory

#: The data symbols read_kernel_log needs (System.map names).
LOG_SYMBOLS = ("prb", "console_printk")

#: x86-64 without KASLR: the kernel image's mapping and the direct map.
KERNEL_IMAGE_BASE = 0xFFFF_FFFF_8000_0000
DIRECT_MAP_BASE = 0xFFFF_8880_0000_0000
DIRECT_MAP_END = 0xFFFF_C880_0000_0000

_RING = struct.Struct("<I4xQQQQQ" "I4xQQQ" "Q")  # desc_ring, text_data_ring, fail
_DESC = struct.Struct("<QQQ")                    # state_var, text_blk_lpos.begin, .next
_INFO = struct.Struct("<QQHBBI")                 # seq, ts_nsec, text_len, facility, flags:5|level:3, caller_id
_INFO_SIZE = _INFO.size + 16 + 48               # + struct dev_printk_info
_STATE_SHIFT = 62
_STATE_COMMITTED, _STATE_FINALIZED, _STATE_REUSABLE = 1, 2, 3
_ID_MASK = (1 << _STATE_SHIFT) - 1
_MAX_COUNT_BITS = 24                             # far above any real log (2^LOG_BUF_SHIFT / 32 descriptors)
_MAX_SIZE_BITS = 30


class KernelLogError(Exception):
    """The ring buffer cannot be read (no symbol, an address outside guest RAM...)."""


@dataclass(frozen=True)
class KernelLogRecord:
    seq: int
    ts_nsec: int
    level: int
    text: bytes

    def console_text(self) -> bytes:
        """As a console prints it (CONFIG_PRINTK_TIME): each line with the time prefix."""
        seconds, nsec = divmod(self.ts_nsec, 1_000_000_000)
        prefix = b"[%5d.%06d] " % (seconds, nsec // 1000)
        return b"".join(prefix + line + b"\n" for line in self.text.split(b"\n"))


def guest_physical(address: int) -> int:
    """A kernel virtual address (image or direct map) as a guest physical one."""
    if address >= KERNEL_IMAGE_BASE:
        return address - KERNEL_IMAGE_BASE
    if DIRECT_MAP_BASE <= address < DIRECT_MAP_END:
        return address - DIRECT_MAP_BASE
    raise KernelLogError(f"{address:#x} is not a kernel image or direct-map address")


def log_symbols(system_map: str | os.PathLike) -> dict[str, int]:
    """The LOG_SYMBOLS System.map names (data symbols, which SymbolMap skips)."""
    wanted, found = set(LOG_SYMBOLS), {}
    try:
        with open(system_map, encoding="ascii", errors="replace") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 3 and parts[2] in wanted:
                    try:
                        found[parts[2]] = int(parts[0], 16)
                    except ValueError:
                        continue
    except OSError as err:
        raise KernelLogError(f"cannot read {system_map}: {err.strerror}") from err
    return found


def _symbol(symbols: dict[str, int], name: str) -> int:
    address = symbols.get(name)
    if address is None:
        raise KernelLogError(f"System.map has no {name}")
    return address


@dataclass(frozen=True)
class _Ring:
    """struct printk_ringbuffer's fields that matter, as guest physical addresses."""

    count_bits: int
    descs: int
    infos: int
    head_id: int
    tail_id: int
    size_bits: int
    data: int


def _read_ring(memory: "GuestMemory", symbols: dict[str, int]) -> _Ring:
    from microvmm.memory import GuestMemoryError
    try:
        ring_address = memory.read_u64(guest_physical(_symbol(symbols, "prb")))
        (count_bits, descs, infos, head_id, tail_id, _last_id,
         size_bits, data, _head_lpos, _tail_lpos, _fail) = _RING.unpack(
            memory.read(guest_physical(ring_address), _RING.size))
    except GuestMemoryError as err:
        raise KernelLogError(f"the ring buffer is not in guest RAM: {err}") from err
    if not 0 < count_bits <= _MAX_COUNT_BITS or not 0 < size_bits <= _MAX_SIZE_BITS:
        raise KernelLogError(f"implausible ring buffer ({count_bits} descriptor bits, {size_bits} data bits)")
    return _Ring(count_bits, guest_physical(descs), guest_physical(infos), head_id & _ID_MASK,
                 tail_id & _ID_MASK, size_bits, guest_physical(data))


def _text_block(begin: int, end: int, size_bits: int) -> tuple[int, int] | None:
    """Where a record's data block is in the text ring: (start, end) offsets."""
    size = 1 << size_bits
    if begin & 1 or end & 1:
        return None  # a record without text (FAILED_LPOS/NO_LPOS)
    if begin >> size_bits == end >> size_bits and begin < end:
        return begin & (size - 1), ((end - 1) & (size - 1)) + 1
    if (begin + size) >> size_bits == end >> size_bits:
        return 0, end & (size - 1)  # a block that wrapped sits at the ring's start
    return None


def _record(info: bytes | memoryview, block: tuple[int, int] | None,
            text_ring: bytes | memoryview) -> KernelLogRecord | None:
    if block is None:
        return None
    seq, ts_nsec, text_len, _facility, flags_level, _caller = _INFO.unpack_from(info)
    text_start = block[0] + 8  # after the block's id
    if text_start + text_len > block[1]:
        return None
    return KernelLogRecord(seq, ts_nsec, flags_level >> 5, bytes(text_ring[text_start:text_start + text_len]))


def read_kernel_log(memory: "GuestMemory", symbols: dict[str, int],
                    finalized_only: bool = False) -> list[KernelLogRecord]:
    """Every committed record of the guest kernel's printk ring, oldest first.

    `finalized_only`: not the newest record while a continuation may still
    extend it (a guest that runs meanwhile)."""
    from microvmm.memory import GuestMemoryError
    readable = (_STATE_FINALIZED,) if finalized_only else (_STATE_COMMITTED, _STATE_FINALIZED)
    ring = _read_ring(memory, symbols)
    count = 1 << ring.count_bits
    try:
        desc_table = memory.read(ring.descs, count * _DESC.size)
        info_table = memory.view(ring.infos, count * _INFO_SIZE)
        text_ring = memory.view(ring.data, 1 << ring.size_bits)
    except GuestMemoryError as err:
        raise KernelLogError(f"the ring buffer is not in guest RAM: {err}") from err
    records = []
    for index in range(count):
        state_var, begin, end = _DESC.unpack_from(desc_table, index * _DESC.size)
        if state_var >> _STATE_SHIFT not in readable:
            continue  # reserved or reusable
        record = _record(info_table[index * _INFO_SIZE:(index + 1) * _INFO_SIZE],
                         _text_block(begin, end, ring.size_bits), text_ring)
        if record is not None:
            records.append(record)
    records.sort(key=lambda record: record.seq)
    return records


class KernelLogCursor:
    """The finalized records added since the last call, for polling a running
    guest: a few small reads per new record instead of the whole ring (which
    costs a running guest's VMM real CPU time, where Python runs slowly)."""

    def __init__(self, memory: "GuestMemory", symbols: dict[str, int]):
        self._memory = memory
        self._symbols = symbols
        self._next_id: int | None = None

    def new_records(self) -> list[KernelLogRecord]:
        from microvmm.memory import GuestMemoryError
        ring = _read_ring(self._memory, self._symbols)
        count = 1 << ring.count_bits
        if self._next_id is None or (ring.head_id + 1 - self._next_id) & _ID_MASK > count:
            self._next_id = ring.tail_id  # the first call, or the ring went round meanwhile
        records: list[KernelLogRecord] = []
        text_ring = None
        try:
            for _ in range((ring.head_id + 1 - self._next_id) & _ID_MASK):
                index = self._next_id & (count - 1)
                state_var, begin, end = _DESC.unpack(self._memory.read(ring.descs + index * _DESC.size, _DESC.size))
                if state_var & _ID_MASK != self._next_id or state_var >> _STATE_SHIFT != _STATE_FINALIZED:
                    if state_var & _ID_MASK == self._next_id and state_var >> _STATE_SHIFT == _STATE_REUSABLE:
                        self._next_id = (self._next_id + 1) & _ID_MASK  # gone already: skip it
                        continue
                    break  # not written yet, or still growing
                if text_ring is None:
                    text_ring = self._memory.view(ring.data, 1 << ring.size_bits)
                record = _record(self._memory.view(ring.infos + index * _INFO_SIZE, _INFO_SIZE),
                                 _text_block(begin, end, ring.size_bits), text_ring)
                if record is not None:
                    records.append(record)
                self._next_id = (self._next_id + 1) & _ID_MASK
        except GuestMemoryError as err:
            raise KernelLogError(f"the ring buffer is not in guest RAM: {err}") from err
        return records


def console_loglevel(memory: "GuestMemory", symbols: dict[str, int]) -> int | None:
    """The guest's console_loglevel (console_printk[0]: 4 with `quiet`), if readable."""
    from microvmm.memory import GuestMemoryError
    try:
        return memory.read_u32(guest_physical(_symbol(symbols, "console_printk")))
    except (KernelLogError, GuestMemoryError):
        return None


def console_records(memory: "GuestMemory", symbols: dict[str, int],
                    finalized_only: bool = False) -> list[KernelLogRecord]:
    """The records a console would have shown (level below console_loglevel)."""
    return console_filter(memory, symbols, read_kernel_log(memory, symbols, finalized_only))


def console_filter(memory: "GuestMemory", symbols: dict[str, int],
                   records: list[KernelLogRecord]) -> list[KernelLogRecord]:
    """Those of `records` a console would have shown (level below console_loglevel)."""
    level = console_loglevel(memory, symbols)
    if level is None or not 0 < level <= 15:
        return records
    return [record for record in records if record.level < level]
