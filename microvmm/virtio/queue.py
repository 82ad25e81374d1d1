"""Split virtqueue (virtio 1.x spec §2.7), device side.

The rings live in guest RAM and are written by an untrusted driver: every
index, address, length and flag read from them is validated, and anything
malformed raises `VirtQueueError` (the transport turns it into NEEDS_RESET).
No guest input can make this module touch memory outside guest RAM, because
every access goes through `GuestMemory` views.

Layout (legacy, §2.7 / "Legacy Interfaces: Virtqueue Layout"):
  desc  at pfn * 4096:          size * 16 bytes {addr u64, len u32, flags u16, next u16}
  avail right after desc:       flags u16, idx u16, ring[size] u16, used_event u16
  used  at next 4096 boundary:  flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16
"""

from __future__ import annotations

import enum
import logging
import struct

from microvmm.memory import GuestMemory, GuestMemoryError
from microvmm.virtio.chain import DescriptorChain
from microvmm.virtio.features import VirtioFeature

logger = logging.getLogger(__name__)

#: Legacy queue page size: QUEUE_PFN is in these units and the used ring is aligned to it.
LEGACY_QUEUE_ALIGN = 4096
#: Ring sizes are powers of two up to this (spec §2.7: Queue Size <= 32768).
MAX_QUEUE_SIZE = 32768
#: Largest indirect table we accept (entries); bounds the work one chain can cause.
MAX_INDIRECT_ENTRIES = 1024

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class DescFlags(enum.IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


# Plain ints for the per-descriptor hot path: an IntFlag `&` costs ~25x an
# int one, and it was ~17% of a 4 KiB chain's processing time.
_F_NEXT = int(DescFlags.NEXT)
_F_WRITE = int(DescFlags.WRITE)
_F_INDIRECT = int(DescFlags.INDIRECT)


class AvailFlags(enum.IntFlag):
    NO_INTERRUPT = 1


class UsedFlags(enum.IntFlag):
    NO_NOTIFY = 1


class VirtQueueError(Exception):
    """The driver put something malformed in the queue (or rings outside RAM)."""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Spec §2.7.7.2 / §2.7.10: did the index move past `event_idx` going old -> new?

    All arithmetic is modulo 2**16, so it works across index wraparound.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def legacy_ring_layout(pfn: int, size: int) -> tuple[int, int, int]:
    """(desc, avail, used) guest addresses of a legacy queue at page `pfn`."""
    desc = pfn * LEGACY_QUEUE_ALIGN
    avail = desc + DESC_SIZE * size
    avail_end = avail + 2 * (3 + size)  # flags, idx, ring[size], used_event
    used = (avail_end + LEGACY_QUEUE_ALIGN - 1) & ~(LEGACY_QUEUE_ALIGN - 1)
    return desc, avail, used


def legacy_ring_bytes(size: int) -> int:
    """Total bytes of a legacy queue (what Linux's vring_size() computes)."""
    _, _, used = legacy_ring_layout(0, size)
    return used + 2 * 3 + 8 * size


class VirtQueue:
    """Device side of one split virtqueue.

    Not thread-safe by itself: the transport serialises access (its lock).
    Typical device loop, suppressing kicks while draining:

        while True:
            queue.disable_notification()
            while (chain := queue.pop()) is not None:
                ...; queue.add_used(chain.head, written)
            if not queue.enable_notification():
                break
        if queue.needs_notification():
            signal_queue(index)
    """

    def __init__(self, memory: GuestMemory, size: int):
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.size = size
        #: Negotiated ring features; the transport sets them before the queue is used.
        self.event_idx = False
        self.indirect = False
        self.reset()

    # ---- setup -----------------------------------------------------------

    def reset(self) -> None:
        """Forget the rings and all indices (device reset or queue teardown)."""
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.pfn = 0
        self.last_avail_idx = 0
        self.used_idx = 0
        # Used index at the last interrupt decision; both sides start at 0.
        self._signalled_used = 0
        self._notification_enabled = True
        self._desc_view: memoryview | None = None
        self._avail_view: memoryview | None = None
        self._used_view: memoryview | None = None

    def set_features(self, features: int) -> None:
        """Apply the negotiated ring feature bits (EVENT_IDX, INDIRECT_DESC)."""
        self.event_idx = bool(features & (1 << VirtioFeature.RING_EVENT_IDX))
        self.indirect = bool(features & (1 << VirtioFeature.RING_INDIRECT_DESC))

    def configure_legacy(self, pfn: int) -> None:
        """Place the rings at guest page `pfn` (legacy QUEUE_PFN); pfn 0 disables."""
        if pfn == 0:
            self.reset()
            return
        desc, avail, used = legacy_ring_layout(pfn, self.size)
        self.configure(desc, avail, used)
        self.pfn = pfn

    def configure(self, desc_addr: int, avail_addr: int, used_addr: int) -> None:
        """Place the rings at explicit guest addresses and mark the queue ready."""
        size = self.size
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise VirtQueueError(
                f"misaligned rings desc={desc_addr:#x} avail={avail_addr:#x} used={used_addr:#x}")
        try:
            desc_view = self.memory.view(desc_addr, DESC_SIZE * size)
            avail_view = self.memory.view(avail_addr, 2 * (3 + size))
            used_view = self.memory.view(used_addr, 2 * 3 + 8 * size)
        except GuestMemoryError as exc:
            self.reset()
            raise VirtQueueError(f"ring outside guest RAM: {exc}") from exc
        self.reset()
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self._desc_view, self._avail_view, self._used_view = desc_view, avail_view, used_view
        # A freshly set-up queue starts at index 0 on both sides (Linux's
        # virtqueue_init does the same), whatever stale bytes the ring holds.
        self.ready = True

    # ---- ring field accessors -------------------------------------------

    def _avail_idx(self) -> int:
        assert self._avail_view is not None
        return _U16.unpack_from(self._avail_view, 2)[0]

    def _avail_flags(self) -> int:
        assert self._avail_view is not None
        return _U16.unpack_from(self._avail_view, 0)[0]

    def _used_event(self) -> int:
        assert self._avail_view is not None
        return _U16.unpack_from(self._avail_view, 4 + 2 * self.size)[0]

    def _set_avail_event(self, value: int) -> None:
        assert self._used_view is not None
        _U16.pack_into(self._used_view, 4 + 8 * self.size, value & 0xFFFF)

    def _set_used_flags(self, value: int) -> None:
        assert self._used_view is not None
        _U16.pack_into(self._used_view, 0, value)

    # ---- available side ---------------------------------------------------

    def _pending(self) -> int:
        """Number of chains the driver made available that we have not popped."""
        if not self.ready:
            return 0
        # avail->idx is read before any ring entry (the driver publishes the idx last).
        pending = (self._avail_idx() - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise VirtQueueError(
                f"avail idx moved {pending} entries ahead of {self.last_avail_idx} (queue size {self.size})")
        return pending

    def has_available(self) -> bool:
        return self._pending() > 0

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, validated; None if the ring is empty."""
        if self._pending() == 0:
            return None
        assert self._avail_view is not None
        slot = self.last_avail_idx % self.size
        head = _U16.unpack_from(self._avail_view, 4 + 2 * slot)[0]
        chain = self._walk_chain(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx and self._notification_enabled:
            # Ask for a kick as soon as the driver adds anything past what we consumed.
            self._set_avail_event(self.last_avail_idx)
        return chain

    def pop_batch(self, max_chains: int) -> list[DescriptorChain]:
        """Take up to `max_chains` available chains, each validated as `pop` does.

        A malformed chain after at least one good one ends the batch without
        being consumed: the good chains are returned and the next `pop` /
        `pop_batch` raises `VirtQueueError` for it, so the caller finishes the
        work it already took before the queue fails. A malformed first chain
        raises at once.
        """
        pending = self._pending()
        if pending == 0:
            return []
        assert self._avail_view is not None
        avail = self._avail_view
        mask = self.size - 1
        unpack_u16 = _U16.unpack_from
        walk = self._walk_chain
        taken = min(pending, max_chains)
        start = self.last_avail_idx
        chains: list[DescriptorChain] = []
        for n in range(taken):
            head = unpack_u16(avail, 4 + 2 * ((start + n) & mask))[0]
            try:
                chains.append(walk(head))
            except VirtQueueError:
                if not chains:
                    raise
                break
        self.last_avail_idx = (start + len(chains)) & 0xFFFF
        if self.event_idx and self._notification_enabled:
            self._set_avail_event(self.last_avail_idx)
        return chains

    def pop_readable_batch(self, max_chains: int, views: list[memoryview],
                           max_bytes: int = 1 << 62) -> tuple[list[int], list[int]]:
        """`pop_batch` for driver->device queues, without a chain object per chain.

        Appends each chain's readable buffers, in order, to `views` and returns
        (heads, readable byte count per chain); the batch ends after
        `max_chains` chains or once it holds `max_bytes`. Every chain is validated as in
        `pop` (writable descriptors too, though their views are not returned),
        and a malformed chain after good ones ends the batch unconsumed.
        """
        pending = self._pending()
        if pending == 0:
            return [], []
        assert self._avail_view is not None and self._desc_view is not None
        avail, desc = self._avail_view, self._desc_view
        size = self.size
        mask = size - 1
        unpack_u16 = _U16.unpack_from
        unpack_desc = _DESC.unpack_from
        buffer_of = self._buffer  # the same checks as every other descriptor
        start = self.last_avail_idx
        heads: list[int] = []
        lengths: list[int] = []
        append_view = views.append
        total = 0
        for n in range(min(pending, max_chains)):
            if total >= max_bytes:
                break
            head = unpack_u16(avail, 4 + 2 * ((start + n) & mask))[0]
            try:
                if head < size:
                    addr, length, flags, _ = unpack_desc(desc, DESC_SIZE * head)
                    if not flags & (_F_NEXT | _F_INDIRECT | _F_WRITE):
                        # One readable descriptor: what a console write is.
                        append_view(buffer_of(addr, length))
                        heads.append(head)
                        lengths.append(length)
                        total += length
                        continue
                chain = self._walk_chain(head)
            except VirtQueueError:
                if not heads:
                    raise
                break
            views.extend(chain.readable)
            heads.append(head)
            length = sum(map(len, chain.readable))
            lengths.append(length)
            total += length
        self.last_avail_idx = (start + len(heads)) & 0xFFFF
        if self.event_idx and self._notification_enabled:
            self._set_avail_event(self.last_avail_idx)
        return heads, lengths

    def undo_pop(self, count: int = 1) -> None:
        """Put the `count` most recently popped chains back (device could not use them yet)."""
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF

    def _read_desc(self, table: memoryview, index: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(table, DESC_SIZE * index)

    def _buffer(self, addr: int, length: int) -> memoryview:
        # (GuestMemory bounds-checks the range; this only words the error.)
        if addr + length > 0xFFFFFFFFFFFFFFFF:
            raise VirtQueueError(f"descriptor {addr:#x}+{length:#x} wraps the address space")
        try:
            return self.memory.view(addr, length)
        except GuestMemoryError as exc:
            raise VirtQueueError(f"descriptor buffer outside guest RAM: {exc}") from exc

    def _walk_chain(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise VirtQueueError(f"avail ring head {head} >= queue size {size}")
        assert self._desc_view is not None
        addr, length, flags, nxt = _DESC.unpack_from(self._desc_view, DESC_SIZE * head)
        if not flags & (_F_NEXT | _F_INDIRECT):
            # The common one-descriptor chain (a console write or receive buffer).
            if flags & _F_WRITE:
                return DescriptorChain(head, [], [self._buffer(addr, length)])
            return DescriptorChain(head, [self._buffer(addr, length)], [])
        chain = DescriptorChain(head, [], [])
        index = head
        seen = 1
        while True:
            if flags & _F_INDIRECT:
                self._walk_indirect(chain, addr, length, flags)
                return chain
            self._append(chain, addr, length, flags)
            if not flags & _F_NEXT:
                return chain
            if nxt >= size:
                raise VirtQueueError(f"descriptor next {nxt} >= queue size {size}")
            index = nxt
            seen += 1
            if seen > size:
                raise VirtQueueError(f"descriptor chain from {head} loops or exceeds queue size")
            addr, length, flags, nxt = _DESC.unpack_from(self._desc_view, DESC_SIZE * index)

    def _walk_indirect(self, chain: DescriptorChain, addr: int, length: int, flags: int) -> None:
        if not self.indirect:
            raise VirtQueueError("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
        if flags & _F_NEXT:
            raise VirtQueueError("indirect descriptor combined with NEXT")
        if length == 0 or length % DESC_SIZE:
            raise VirtQueueError(f"indirect table length {length} is not a non-zero multiple of 16")
        entries = length // DESC_SIZE
        if entries > MAX_INDIRECT_ENTRIES:
            raise VirtQueueError(f"indirect table of {entries} entries exceeds {MAX_INDIRECT_ENTRIES}")
        table = self._buffer(addr, length)
        index = 0
        seen = 0
        while True:
            seen += 1
            if seen > entries:
                raise VirtQueueError("indirect descriptor chain loops")
            d_addr, d_len, d_flags, d_next = self._read_desc(table, index)
            if d_flags & _F_INDIRECT:
                raise VirtQueueError("nested indirect descriptor")
            self._append(chain, d_addr, d_len, d_flags)
            if not d_flags & _F_NEXT:
                return
            if d_next >= entries:
                raise VirtQueueError(f"indirect next {d_next} >= table entries {entries}")
            index = d_next

    def _append(self, chain: DescriptorChain, addr: int, length: int, flags: int) -> None:
        view = self._buffer(addr, length)
        if flags & _F_WRITE:
            chain.writable.append(view)
        else:
            if chain.writable:
                raise VirtQueueError("device-readable descriptor after a device-writable one")
            chain.readable.append(view)

    # ---- used side --------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Return chain `head` to the driver with `length` bytes written."""
        if not self.ready:
            raise VirtQueueError("add_used on a queue that is not set up")
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} out of range")
        assert self._used_view is not None
        slot = self.used_idx % self.size
        # The element is written before the index that publishes it.
        _USED_ELEM.pack_into(self._used_view, 4 + 8 * slot, head, length & 0xFFFFFFFF)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(self._used_view, 2, self.used_idx)

    def add_used_batch(self, heads: list[int], length: int = 0) -> None:
        """Return several chains, each with `length` bytes written, publishing the index once."""
        if not heads:
            return
        if not self.ready:
            raise VirtQueueError("add_used on a queue that is not set up")
        size = self.size
        for head in heads:
            if not 0 <= head < size:
                raise ValueError(f"head {head} out of range")
        assert self._used_view is not None
        used = self._used_view
        pack = _USED_ELEM.pack_into
        idx = self.used_idx
        length &= 0xFFFFFFFF
        # Every element is written before the index that publishes them all.
        for head in heads:
            pack(used, 4 + 8 * (idx & (size - 1)), head, length)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        _U16.pack_into(used, 2, idx)

    def needs_notification(self) -> bool:
        """Should the device interrupt the driver for the used entries added so far?

        With EVENT_IDX: only if used idx crossed the driver's used_event since the
        last decision. Otherwise: unless the driver set VRING_AVAIL_F_NO_INTERRUPT.
        Each call consumes the used entries added since the previous call.
        """
        if not self.ready:
            return False
        old = self._signalled_used
        new = self.used_idx
        self._signalled_used = new
        if old == new:
            return False
        if self.event_idx:
            return vring_need_event(self._used_event(), new, old)
        return not self._avail_flags() & AvailFlags.NO_INTERRUPT

    def disable_notification(self) -> None:
        """Tell the driver it need not kick (best effort; the driver may still kick)."""
        self._notification_enabled = False
        if not self.ready:
            return
        if not self.event_idx:
            self._set_used_flags(UsedFlags.NO_NOTIFY)
        # With EVENT_IDX, leaving avail_event behind suppresses kicks.

    def enable_notification(self) -> bool:
        """Ask for kicks again; returns True if buffers arrived meanwhile (re-drain)."""
        self._notification_enabled = True
        if not self.ready:
            return False
        if self.event_idx:
            self._set_avail_event(self.last_avail_idx)
        else:
            self._set_used_flags(0)
        return self.has_available()

    def set_avail_event(self, idx: int) -> None:
        """EVENT_IDX: ask for a kick when the driver's avail idx passes `idx`."""
        if self.ready:
            self._set_avail_event(idx)
