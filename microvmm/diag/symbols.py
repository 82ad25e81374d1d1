"""Kernel symbol lookup from a System.map, for symbolized RIPs in diagnostics."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

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


def find_system_map(kernel_path: str | os.PathLike) -> Path | None:
    """System.map beside the kernel (build tree or images/), or a distribution's
    /boot/System.map-VERSION beside /boot/vmlinuz-VERSION, if any."""
    kernel = Path(kernel_path)
    candidates = [kernel.parent / "System.map", kernel.parent.parent.parent.parent / "System.map"]
    for prefix in ("vmlinuz-", "vmlinux-", "bzImage-"):
        if kernel.name.startswith(prefix):
            candidates.insert(0, kernel.parent / f"System.map-{kernel.name[len(prefix):]}")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None
