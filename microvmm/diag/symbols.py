"""Kernel symbol lookup from a System.map, for symbolized RIPs in diagnostics."""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from microvmm.diag.system_map import find_system_map  # noqa: F401  (re-exported)

# Only text symbols are useful for RIPs; data symbols would mislabel code.
_TEXT_TYPES = frozenset("tTwW")


class SymbolMapError(Exception):
    """A System.map could not be read or holds no text symbols."""


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    offset: int

    def __str__(self) -> str:
        return f"{self.name}+{self.offset:#x}"


class SymbolMap:
    """Sorted text symbols of a kernel; `lookup(rip)` gives name+offset."""

    def __init__(self, entries: list[tuple[int, str]]):
        entries = sorted(entries)
        self._addresses = [address for address, _ in entries]
        self._names = [name for _, name in entries]
        if not self._addresses:
            raise SymbolMapError("no text symbols")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SymbolMap":
        entries = []
        try:
            with open(path, encoding="ascii", errors="replace") as handle:
                for line in handle:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in _TEXT_TYPES:
                        try:
                            entries.append((int(parts[0], 16), parts[2]))
                        except ValueError:
                            continue
        except OSError as err:
            raise SymbolMapError(f"cannot read {path}: {err.strerror}") from err
        try:
            return cls(entries)
        except SymbolMapError:
            if _is_debian_placeholder(path):
                raise SymbolMapError(
                    f"{path}: Debian's placeholder (the real System.map is in the kernel's -dbg "
                    f"package; or save /proc/kallsyms of a boot with nokaslr and pass it as "
                    f"--system-map)") from None
            raise SymbolMapError(f"{path}: no text symbols (not a System.map?)") from None

    def lookup(self, address: int) -> Symbol | None:
        """The text symbol containing `address`, or None below the first one.

        Addresses past `_etext`/`_end`-like markers still resolve to the last
        symbol; callers print the offset so a huge one is visibly suspicious.
        """
        index = bisect.bisect_right(self._addresses, address) - 1
        if index < 0:
            return None
        return Symbol(self._names[index], self._addresses[index], address - self._addresses[index])

    def address_of(self, name: str) -> int | None:
        try:
            return self._addresses[self._names.index(name)]
        except ValueError:
            return None

    def describe(self, address: int) -> str:
        symbol = self.lookup(address)
        return f"{address:#x} <{symbol}>" if symbol else f"{address:#x}"


def _is_debian_placeholder(path: str | os.PathLike) -> bool:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return "System.map is in the" in handle.read(4096)
    except OSError:
        return False


#: Where a KASLR kernel's image can be: the 1 GiB kernel map (__START_KERNEL_map
#: up to the module area). Only addresses there move with the offset.
_KERNEL_IMAGE_RANGE = range(0xFFFF_FFFF_8000_0000, 0xFFFF_FFFF_C000_0000)


class KaslrSymbols:
    """A SymbolMap for a kernel that runs at a random offset (`--kaslr`):
    kernel-image addresses are looked up at address - offset.

    `find_offset` gives the offset (diag/kaslr.py reads it from the guest's
    page tables) or None while it is not known (the kernel has not set up
    its own page tables yet); it is asked again at most once a second
    (`retry_seconds`), and a found offset is kept. While the offset is
    unknown nothing in the kernel image is symbolized: a System.map's name
    for an unrelocated address would be a wrong name.
    """

    def __init__(self, symbols: SymbolMap, find_offset: Callable[[], int | None], *,
                 retry_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.symbols = symbols
        self._find_offset = find_offset
        self._offset: int | None = None
        self._next_try = float("-inf")
        self._retry_seconds = retry_seconds
        self._clock = clock

    @property
    def offset(self) -> int | None:
        if self._offset is None and self._clock() >= self._next_try:
            self._offset = self._find_offset()
            self._next_try = self._clock() + self._retry_seconds
        return self._offset

    def lookup(self, address: int) -> Symbol | None:
        if address not in _KERNEL_IMAGE_RANGE:
            return self.symbols.lookup(address)
        offset = self.offset
        if offset is None:
            return None
        symbol = self.symbols.lookup(address - offset)
        return None if symbol is None else Symbol(symbol.name, symbol.address + offset, symbol.offset)

    def address_of(self, name: str) -> int | None:
        """The running kernel's address of `name` (None while the offset is unknown)."""
        address, offset = self.symbols.address_of(name), self.offset
        return None if address is None or offset is None else address + offset

    def describe(self, address: int) -> str:
        symbol = self.lookup(address)
        return f"{address:#x} <{symbol}>" if symbol else f"{address:#x}"
