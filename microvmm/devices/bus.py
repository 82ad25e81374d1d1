"""Address-range dispatch for port I/O and MMIO exits.

One `Bus` instance serves port I/O, another MMIO. The vCPU loop calls
`Bus.read`/`Bus.write` from every vCPU thread, so the lookup path takes no
lock: the range table is an immutable snapshot that `register`/`unregister`
replace wholesale under a writer-only lock (a reader sees either the old or the
new table, never a half-updated one). Devices protect their own state.

Straddling accesses: an access that starts inside a device's range is delivered
to that device even if `offset + size` runs past the end of the range; the
device decides what to do with it (the models here treat the bytes past their
registers like any other unknown offset). An access that starts in a hole is
unclaimed even if its tail would reach a device. This matches what a guest sees
on real buses, where the decoder looks at the start address only, and keeps the
lookup a single bisect.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

logger = logging.getLogger(__name__)

#: Access widths KVM reports: port I/O uses 1/2/4, MMIO also 8.
VALID_ACCESS_SIZES = frozenset({1, 2, 4, 8})

#: Upper bound on distinct unclaimed addresses tracked (stats and log-once set);
#: the guest chooses these addresses, so the bookkeeping must stay bounded.
MAX_TRACKED_UNCLAIMED = 1024

PIO_ADDRESS_LIMIT = 1 << 16
MMIO_ADDRESS_LIMIT = 1 << 64


class BusError(Exception):
    """Invalid bus registration or access request (a VMM bug, not a guest one)."""


@runtime_checkable
class BusDevice(Protocol):
    """What a device registered on a `Bus` provides.

    `offset` is relative to the base the device was registered at; `size` is the
    access width in bytes. `read` returns the value (the bus masks it to `size`);
    `write` receives a value already masked to `size`. Both may be called from
    several vCPU threads at once, so the device locks its own state.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class BusRange:
    """One registered device range: [base, base + length)."""

    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        """First address past the range."""
        return self.base + self.length


@dataclass(frozen=True)
class AccessCount:
    reads: int = 0
    writes: int = 0


@dataclass(frozen=True)
class BusStats:
    """Access counters: per device name, and per unclaimed address (granule)."""

    devices: dict[str, AccessCount]
    unclaimed: dict[int, AccessCount]
    #: accesses to unclaimed addresses beyond MAX_TRACKED_UNCLAIMED distinct ones
    unclaimed_untracked: AccessCount


@dataclass(frozen=True)
class _Table:
    """Immutable lookup snapshot: parallel sorted lists of bases and ranges."""

    bases: tuple[int, ...]
    ranges: tuple[BusRange, ...]


_EMPTY_TABLE = _Table((), ())

# Counter keys: (device name, is_write) for claimed accesses,
# (address granule, is_write) for unclaimed ones, (None, is_write) for overflow.
_CounterKey = tuple[str | int | None, bool]


class Bus:
    """A thread-safe address → device map with all-ones reads for holes.

    `address_limit` bounds registrations (2**16 for port I/O). Unclaimed
    accesses are counted and logged per `unclaimed_granule` (1 for port I/O; a
    page is sensible for MMIO so a guest scanning memory cannot flood the log).
    """

    def __init__(self, name: str, address_limit: int = MMIO_ADDRESS_LIMIT,
                 unclaimed_granule: int = 1) -> None:
        if address_limit <= 0:
            raise BusError(f"bus {name}: address limit must be positive")
        if unclaimed_granule <= 0 or unclaimed_granule & (unclaimed_granule - 1):
            raise BusError(f"bus {name}: unclaimed granule must be a power of two")
        self.name = name
        self.address_limit = address_limit
        self._granule_mask = ~(unclaimed_granule - 1)
        self._table = _EMPTY_TABLE
        self._writer_lock = threading.Lock()
        # Per-thread counter dicts: each vCPU thread only ever mutates its own,
        # so counting needs no lock; stats() sums them.
        self._local = threading.local()
        self._all_counters: list[dict[_CounterKey, int]] = []
        self._counters_lock = threading.Lock()
        self._unclaimed_seen: set[int] = set()
        self._unclaimed_lock = threading.Lock()

    # -- registration (rare; serialised) ---------------------------------

    def register(self, base: int, length: int, device: BusDevice, name: str) -> None:
        """Claim [base, base + length) for `device`; BusError on overlap."""
        if length <= 0:
            raise BusError(f"bus {self.name}: {name}: length must be positive, got {length}")
        if base < 0 or base + length > self.address_limit:
            raise BusError(
                f"bus {self.name}: {name}: range {base:#x}+{length:#x} outside "
                f"[0, {self.address_limit:#x})")
        new = BusRange(base, length, device, name)
        with self._writer_lock:
            table = self._table
            idx = bisect.bisect_right(table.bases, base)
            if idx > 0 and table.ranges[idx - 1].end > base:
                raise BusError(self._overlap_message(new, table.ranges[idx - 1]))
            if idx < len(table.ranges) and table.ranges[idx].base < new.end:
                raise BusError(self._overlap_message(new, table.ranges[idx]))
            ranges = table.ranges[:idx] + (new,) + table.ranges[idx:]
            self._table = _Table(tuple(r.base for r in ranges), ranges)
        logger.debug("bus %s: registered %s at %#x+%#x", self.name, name, base, length)

    def _overlap_message(self, new: BusRange, old: BusRange) -> str:
        return (f"bus {self.name}: {new.name} at [{new.base:#x}, {new.end:#x}) overlaps "
                f"{old.name} at [{old.base:#x}, {old.end:#x})")

    def unregister(self, base: int) -> BusRange:
        """Remove the range registered at exactly `base` and return it."""
        with self._writer_lock:
            table = self._table
            idx = bisect.bisect_left(table.bases, base)
            if idx == len(table.bases) or table.bases[idx] != base:
                raise BusError(f"bus {self.name}: nothing registered at {base:#x}")
            removed = table.ranges[idx]
            ranges = table.ranges[:idx] + table.ranges[idx + 1:]
            self._table = _Table(tuple(r.base for r in ranges), ranges)
        logger.debug("bus %s: unregistered %s at %#x", self.name, removed.name, base)
        return removed

    def ranges(self) -> tuple[BusRange, ...]:
        """All registered ranges, sorted by base."""
        return self._table.ranges

    # -- hot path --------------------------------------------------------

    def lookup(self, addr: int) -> BusRange | None:
        """The range containing `addr`, or None."""
        table = self._table  # one atomic read: a consistent snapshot
        idx = bisect.bisect_right(table.bases, addr) - 1
        if idx >= 0:
            entry = table.ranges[idx]
            if addr < entry.end:
                return entry
        return None

    def read(self, addr: int, size: int) -> int:
        """Read `size` bytes at `addr`; all-ones when no device claims it."""
        if size not in VALID_ACCESS_SIZES:
            raise BusError(f"bus {self.name}: invalid access size {size}")
        entry = self.lookup(addr)
        mask = (1 << (size * 8)) - 1
        if entry is None:
            self._count_unclaimed(addr, False, size)
            return mask
        self._count((entry.name, False))
        return entry.device.read(addr - entry.base, size) & mask

    def write(self, addr: int, size: int, value: int) -> None:
        """Write `size` bytes at `addr`; dropped when no device claims it."""
        if size not in VALID_ACCESS_SIZES:
            raise BusError(f"bus {self.name}: invalid access size {size}")
        entry = self.lookup(addr)
        if entry is None:
            self._count_unclaimed(addr, True, size)
            return
        self._count((entry.name, True))
        entry.device.write(addr - entry.base, size, value & ((1 << (size * 8)) - 1))

    # -- statistics ------------------------------------------------------

    def _counters(self) -> dict[_CounterKey, int]:
        try:
            return self._local.counters  # type: ignore[no-any-return]
        except AttributeError:
            counters: dict[_CounterKey, int] = {}
            self._local.counters = counters
            with self._counters_lock:
                self._all_counters.append(counters)
            return counters

    def _count(self, key: _CounterKey) -> None:
        counters = self._counters()
        counters[key] = counters.get(key, 0) + 1

    def _count_unclaimed(self, addr: int, is_write: bool, size: int) -> None:
        granule = addr & self._granule_mask
        seen = self._unclaimed_seen
        if granule in seen:
            self._count((granule, is_write))
            return
        with self._unclaimed_lock:
            if granule in seen:
                tracked = True
            elif len(seen) < MAX_TRACKED_UNCLAIMED:
                seen.add(granule)
                tracked = True
                logger.debug("bus %s: unclaimed %s of size %d at %#x (logged once)",
                             self.name, "write" if is_write else "read", size, addr)
            else:
                tracked = False
                if len(seen) == MAX_TRACKED_UNCLAIMED:
                    # Sentinel outside the address space marks "overflow logged".
                    seen.add(-1)
                    logger.debug("bus %s: more than %d unclaimed addresses; no longer "
                                 "logging or tracking them individually",
                                 self.name, MAX_TRACKED_UNCLAIMED)
        self._count((granule if tracked else None, is_write))

    def stats(self) -> BusStats:
        """Sum of all threads' counters (a moment-in-time view)."""
        with self._counters_lock:
            snapshots = [dict(c) for c in self._all_counters]
        totals: dict[_CounterKey, int] = {}
        for snap in snapshots:
            for key, n in snap.items():
                totals[key] = totals.get(key, 0) + n
        devices: dict[str, AccessCount] = {}
        unclaimed: dict[int, AccessCount] = {}
        untracked = AccessCount()
        for (where, is_write), n in totals.items():
            add = AccessCount(0, n) if is_write else AccessCount(n, 0)
            if isinstance(where, str):
                devices[where] = _plus(devices.get(where, AccessCount()), add)
            elif isinstance(where, int):
                unclaimed[where] = _plus(unclaimed.get(where, AccessCount()), add)
            else:
                untracked = _plus(untracked, add)
        return BusStats(devices, unclaimed, untracked)


def _plus(a: AccessCount, b: AccessCount) -> AccessCount:
    return AccessCount(a.reads + b.reads, a.writes + b.writes)
