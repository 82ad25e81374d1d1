"""Bus dispatch, overlap rejection, holes, access sizes and statistics."""

from __future__ import annotations

import logging
import threading

import pytest

from microvmm.devices.bus import (
    MAX_TRACKED_UNCLAIMED, PIO_ADDRESS_LIMIT, AccessCount, Bus, BusDevice, BusError,
)
from microvmm.devices.legacy import NullDevice


class RecordingDevice:
    """Remembers every access and reads back a value derived from the offset."""

    def __init__(self, read_value: int | None = None) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []
        self.read_value = read_value

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.read_value if self.read_value is not None else 0x40 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_recording_device_satisfies_protocol() -> None:
    assert isinstance(RecordingDevice(), BusDevice)
    assert isinstance(NullDevice(), BusDevice)


def test_dispatch_by_range_with_relative_offsets() -> None:
    bus = Bus("pio", PIO_ADDRESS_LIMIT)
    a, b = RecordingDevice(), RecordingDevice()
    bus.register(0x3F8, 8, a, "com1")
    bus.register(0x60, 5, b, "i8042")
    assert bus.read(0x3FD, 1) == 0x45
    bus.write(0x3F8, 1, 0x41)
    assert bus.read(0x64, 1) == 0x44
    bus.write(0x60, 1, 0xFE)
    assert a.reads == [(5, 1)] and a.writes == [(0, 1, 0x41)]
    assert b.reads == [(4, 1)] and b.writes == [(0, 1, 0xFE)]
    # First and last address of a range belong to it; neighbours do not.
    assert bus.lookup(0x3F8).name == "com1"
    assert bus.lookup(0x3FF).name == "com1"
    assert bus.lookup(0x3F7) is None
    assert bus.lookup(0x400) is None


@pytest.mark.parametrize("base,length", [
    (0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3FA, 2), (0x3F0, 0x20),
])
def test_overlap_rejected(base: int, length: int) -> None:
    bus = Bus("pio", PIO_ADDRESS_LIMIT)
    bus.register(0x3F8, 8, RecordingDevice(), "com1")
    with pytest.raises(BusError, match="overlaps com1"):
        bus.register(base, length, RecordingDevice(), "other")
    assert [r.name for r in bus.ranges()] == ["com1"]


def test_adjacent_ranges_allowed_and_sorted() -> None:
    bus = Bus("pio", PIO_ADDRESS_LIMIT)
    bus.register(0x400, 8, RecordingDevice(), "c")
    bus.register(0x3F0, 8, RecordingDevice(), "a")
    bus.register(0x3F8, 8, RecordingDevice(), "b")
    assert [(r.base, r.name) for r in bus.ranges()] == [(0x3F0, "a"), (0x3F8, "b"), (0x400, "c")]


def test_invalid_registrations() -> None:
    bus = Bus("pio", PIO_ADDRESS_LIMIT)
    with pytest.raises(BusError):
        bus.register(0x10, 0, RecordingDevice(), "empty")
    with pytest.raises(BusError):
        bus.register(0xFFFF, 2, RecordingDevice(), "past-end")
    with pytest.raises(BusError):
        bus.register(-1, 2, RecordingDevice(), "negative")


def test_unregister() -> None:
    bus = Bus("mmio")
    dev = RecordingDevice()
    bus.register(0xD000_0000, 0x1000, dev, "bar0")
    assert bus.read(0xD000_0010, 4) == 0x50
    removed = bus.unregister(0xD000_0000)
    assert removed.device is dev
    assert bus.read(0xD000_0010, 4) == 0xFFFF_FFFF
    with pytest.raises(BusError):
        bus.unregister(0xD000_0000)
    # The range is free again.
    bus.register(0xD000_0000, 0x1000, RecordingDevice(), "bar0-moved")


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF),
                                       (8, 0xFFFF_FFFF_FFFF_FFFF)])
def test_unclaimed_reads_all_ones_and_writes_ignored(size: int, ones: int) -> None:
    bus = Bus("pio")
    dev = RecordingDevice()
    bus.register(0x100, 4, dev, "dev")
    assert bus.read(0x2F8, size) == ones
    bus.write(0x2F8, size, 0x12)
    assert dev.reads == [] and dev.writes == []


@pytest.mark.parametrize("size", [1, 2, 4])
def test_sizes_are_passed_and_values_masked(size: int) -> None:
    bus = Bus("pio", PIO_ADDRESS_LIMIT)
    dev = RecordingDevice(read_value=0x1122_3344_5566)
    bus.register(0xC000, 0x40, dev, "dev")
    mask = (1 << (8 * size)) - 1
    assert bus.read(0xC004, size) == 0x1122_3344_5566 & mask
    bus.write(0xC004, size, 0xAABB_CCDD_EEFF)
    assert dev.reads == [(4, size)]
    assert dev.writes == [(4, size, 0xAABB_CCDD_EEFF & mask)]


def test_invalid_access_size() -> None:
    bus = Bus("pio")
    with pytest.raises(BusError):
        bus.read(0x80, 3)
    with pytest.raises(BusError):
        bus.write(0x80, 0, 0)


def test_straddling_access_goes_to_device_it_starts_in() -> None:
    bus = Bus("pio")
    first, second = RecordingDevice(), RecordingDevice()
    bus.register(0x100, 2, first, "first")
    bus.register(0x102, 2, second, "second")
    bus.read(0x101, 4)
    assert first.reads == [(1, 4)] and second.reads == []
    # Starting in a hole before a device: unclaimed, even if the tail reaches it.
    assert bus.read(0xFF, 2) == 0xFFFF
    assert first.reads == [(1, 4)]


def test_stats_count_devices_and_unclaimed() -> None:
    bus = Bus("pio")
    bus.register(0x3F8, 8, RecordingDevice(), "com1")
    for _ in range(3):
        bus.read(0x3FD, 1)
    bus.write(0x3F8, 1, 0x41)
    bus.write(0x80, 1, 0)
    bus.write(0x80, 1, 0)
    bus.read(0x2F9, 1)
    stats = bus.stats()
    assert stats.devices == {"com1": AccessCount(reads=3, writes=1)}
    assert stats.unclaimed == {0x80: AccessCount(0, 2), 0x2F9: AccessCount(1, 0)}
    assert stats.unclaimed_untracked == AccessCount()


def test_stats_unclaimed_granule_for_mmio() -> None:
    bus = Bus("mmio", unclaimed_granule=0x1000)
    bus.read(0xFEC0_0010, 4)
    bus.read(0xFEC0_0FF0, 4)
    assert bus.stats().unclaimed == {0xFEC0_0000: AccessCount(2, 0)}


def test_unclaimed_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus("pio")
    with caplog.at_level(logging.DEBUG, logger="microvmm.devices.bus"):
        for _ in range(5):
            bus.write(0x87, 1, 0)
            bus.read(0x87, 1)
    assert sum("0x87" in r.getMessage() for r in caplog.records) == 1


def test_unclaimed_tracking_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus("mmio")
    with caplog.at_level(logging.DEBUG, logger="microvmm.devices.bus"):
        for addr in range(MAX_TRACKED_UNCLAIMED + 50):
            bus.read(addr, 1)
    stats = bus.stats()
    assert len(stats.unclaimed) == MAX_TRACKED_UNCLAIMED
    assert stats.unclaimed_untracked == AccessCount(50, 0)
    assert len(caplog.records) == MAX_TRACKED_UNCLAIMED + 1


def test_concurrent_access_and_registration() -> None:
    """Readers on several threads see a consistent table while it changes; no
    access is lost from the statistics."""
    bus = Bus("mmio")
    stable = RecordingDevice(read_value=0x5A)
    bus.register(0x1000, 0x10, stable, "stable")
    per_thread = 5000
    errors: list[str] = []

    def reader() -> None:
        for _ in range(per_thread):
            if bus.read(0x1004, 1) != 0x5A:
                errors.append("stable device not found")

    def churn() -> None:
        for i in range(300):
            bus.register(0x2000, 0x10, RecordingDevice(), "moving")
            bus.unregister(0x2000)

    threads = [threading.Thread(target=reader) for _ in range(4)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert bus.stats().devices["stable"] == AccessCount(4 * per_thread, 0)
