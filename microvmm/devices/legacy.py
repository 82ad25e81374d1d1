"""Placeholder devices for legacy ports a Linux guest touches but needs no model for.

Claiming these ports keeps them out of the bus's "unclaimed" log and
statistics and answers reads the way the real hardware would. Ports handled by
KVM's in-kernel irqchip and PIT (0x20/0x21, 0xA0/0xA1, 0x40-0x43, 0x61,
0x4D0/0x4D1) never exit to userspace and must not be listed here.
"""

from __future__ import annotations

from dataclasses import dataclass


class NullDevice:
    """Accepts writes and ignores them; reads return a fixed pattern.

    `read_value=None` reads all-ones of the access size (an undriven ISA bus);
    otherwise the given value is returned, masked to the access size.
    """

    def __init__(self, read_value: int | None = None) -> None:
        self._read_value = read_value

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (size * 8)) - 1
        if self._read_value is None:
            return mask
        return self._read_value & mask

    def write(self, offset: int, size: int, value: int) -> None:
        pass


@dataclass(frozen=True)
class LegacyPortRange:
    base: int
    length: int
    name: str


#: Ports Linux writes purely for timing: 0x80 is the POST-code port used by
#: the *_p() I/O delay (every CMOS access does one), 0xED the alternative
#: delay port (io_delay=0xed). Reads return all-ones like an empty ISA bus.
IO_DELAY_PORTS = (
    LegacyPortRange(0x80, 1, "post-delay"),
    LegacyPortRange(0xED, 1, "alt-delay"),
)
