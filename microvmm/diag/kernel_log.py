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
_STATE_COMMITTED, _STATE_FINALIZED = 1, 2
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


def read_kernel_log(memory: "GuestMemory", symbols: dict[str, int],
                    finalized_only: bool = False) -> list[KernelLogRecord]:
    """Every committed record of the guest kernel's printk ring, oldest first.

    `finalized_only`: not the newest record while a continuation may still
    extend it (a guest that runs meanwhile)."""
    readable = (_STATE_FINALIZED,) if finalized_only else (_STATE_COMMITTED, _STATE_FINALIZED)
    from microvmm.memory import GuestMemoryError
    try:
        ring_address = memory.read_u64(guest_physical(_symbol(symbols, "prb")))
        (count_bits, descs, infos, _head_id, _tail_id, _last_id,
         size_bits, data, _head_lpos, _tail_lpos, _fail) = _RING.unpack(
            memory.read(guest_physical(ring_address), _RING.size))
        if not 0 < count_bits <= _MAX_COUNT_BITS or not 0 < size_bits <= _MAX_SIZE_BITS:
            raise KernelLogError(f"implausible ring buffer ({count_bits} descriptor bits, {size_bits} data bits)")
        count, size = 1 << count_bits, 1 << size_bits
        desc_table = memory.read(guest_physical(descs), count * _DESC.size)
        info_table = memory.read(guest_physical(infos), count * _INFO_SIZE)
        text_ring = memory.read(guest_physical(data), size)
    except GuestMemoryError as err:
        raise KernelLogError(f"the ring buffer is not in guest RAM: {err}") from err
    records = []
    for index in range(count):
        state_var, begin, end = _DESC.unpack_from(desc_table, index * _DESC.size)
        if state_var >> _STATE_SHIFT not in readable or begin & 1 or end & 1:
            continue  # reserved or reusable, or a record without text (FAILED_LPOS/NO_LPOS)
        seq, ts_nsec, text_len, _facility, flags_level, _caller = _INFO.unpack_from(info_table, index * _INFO_SIZE)
        if begin >> size_bits == end >> size_bits and begin < end:
            start, block_end = begin & (size - 1), ((end - 1) & (size - 1)) + 1
        elif (begin + size) >> size_bits == end >> size_bits:
            start, block_end = 0, end & (size - 1)  # a block that wrapped sits at the ring's start
        else:
            continue
        text_start = start + 8  # after the block's id
        if text_start + text_len > block_end:
            continue
        records.append(KernelLogRecord(seq, ts_nsec, flags_level >> 5,
                                       bytes(text_ring[text_start:text_start + text_len])))
    records.sort(key=lambda record: record.seq)
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
    records = read_kernel_log(memory, symbols, finalized_only)
    level = console_loglevel(memory, symbols)
    if level is None or not 0 < level <= 15:
        return records
    return [record for record in records if record.level < level]
