"""NullDevice placeholders for the I/O delay ports."""

from __future__ import annotations

import pytest

from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
from microvmm.devices.legacy import IO_DELAY_PORTS, NullDevice


@pytest.mark.parametrize("size,expected", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF)])
def test_null_device_reads_all_ones(size: int, expected: int) -> None:
    bus = Bus("pio", PIO_ADDRESS_LIMIT)
    for r in IO_DELAY_PORTS:
        bus.register(r.base, r.length, NullDevice(), r.name)
    bus.write(0x80, 1, 0x12)
    assert bus.read(0x80, size) == expected
    assert bus.stats().devices["post-delay"].writes == 1
    assert bus.stats().unclaimed == {}
    assert NullDevice(read_value=0).read(0, size) == 0
