"""CMOS RTC: host UTC time in the formats Linux's mc146818 code reads."""

from __future__ import annotations

import calendar
import time

from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
from microvmm.devices.rtc import RTC_BASE, RTC_PORT_COUNT, CmosRtc

RTC_SECONDS, RTC_MINUTES, RTC_HOURS = 0x00, 0x02, 0x04
RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR = 0x06, 0x07, 0x08, 0x09
RTC_REG_A, RTC_REG_B, RTC_REG_C, RTC_REG_D, RTC_CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
RTC_UIP, RTC_DM_BINARY, RTC_24H = 0x80, 0x04, 0x02


def bcd2bin(v: int) -> int:
    return (v & 0x0F) + (v >> 4) * 10


class Cmos:
    def __init__(self, clock=time.time) -> None:  # type: ignore[no-untyped-def]
        self.bus = Bus("pio", PIO_ADDRESS_LIMIT)
        self.bus.register(RTC_BASE, RTC_PORT_COUNT, CmosRtc(clock), "rtc")

    def read(self, reg: int) -> int:
        # Linux's CMOS_READ: outb_p(addr, 0x70); inb_p(0x71) — with NMI-mask bit.
        self.bus.write(0x70, 1, reg | 0x80)
        return self.bus.read(0x71, 1)

    def write(self, reg: int, value: int) -> None:
        self.bus.write(0x70, 1, reg)
        self.bus.write(0x71, 1, value)

    def linux_get_time(self) -> float:
        """mc146818_get_time(): wait for !UIP, read, convert BCD unless DM set."""
        for _ in range(10):
            assert not self.read(RTC_REG_A) & RTC_UIP
            sec = self.read(RTC_SECONDS)
            minute = self.read(RTC_MINUTES)
            hour = self.read(RTC_HOURS)
            mday = self.read(RTC_DAY_OF_MONTH)
            mon = self.read(RTC_MONTH)
            year = self.read(RTC_YEAR)
            century = self.read(RTC_CENTURY)
            ctrl = self.read(RTC_REG_B)
            if sec == self.read(RTC_SECONDS):
                break
        if not ctrl & RTC_DM_BINARY:
            sec, minute, hour, mday, mon, year, century = map(
                bcd2bin, (sec, minute, hour, mday, mon, year, century))
        return calendar.timegm((century * 100 + year, mon, mday, hour, minute, sec, 0, 0, 0))


def test_time_close_to_now_bcd() -> None:
    cmos = Cmos()
    assert cmos.read(RTC_REG_B) & (RTC_DM_BINARY | RTC_24H) == RTC_24H  # BCD, 24 h
    assert abs(cmos.linux_get_time() - time.time()) <= 2


def test_time_close_to_now_binary() -> None:
    cmos = Cmos()
    cmos.write(RTC_REG_B, RTC_24H | RTC_DM_BINARY)
    assert abs(cmos.linux_get_time() - time.time()) <= 2


FIXED = calendar.timegm((2024, 12, 31, 23, 59, 58, 0, 0, 0))  # a Tuesday


def test_fields_for_fixed_time_bcd() -> None:
    cmos = Cmos(clock=lambda: FIXED + 0.7)
    assert cmos.read(RTC_SECONDS) == 0x58
    assert cmos.read(RTC_MINUTES) == 0x59
    assert cmos.read(RTC_HOURS) == 0x23
    assert cmos.read(RTC_DAY_OF_WEEK) == 3  # Sunday = 1
    assert cmos.read(RTC_DAY_OF_MONTH) == 0x31
    assert cmos.read(RTC_MONTH) == 0x12
    assert cmos.read(RTC_YEAR) == 0x24
    assert cmos.read(RTC_CENTURY) == 0x20


def test_fields_binary_and_12_hour() -> None:
    cmos = Cmos(clock=lambda: FIXED)
    cmos.write(RTC_REG_B, RTC_DM_BINARY)  # binary, 12 h
    assert cmos.read(RTC_HOURS) == 0x80 | 11  # 11 PM
    assert cmos.read(RTC_YEAR) == 24
    assert cmos.read(RTC_CENTURY) == 20
    midnight = Cmos(clock=lambda: FIXED + 2)  # 2025-01-01 00:00:00
    midnight.write(RTC_REG_B, 0)  # BCD, 12 h
    assert midnight.read(RTC_HOURS) == 0x12  # 12 AM
    assert midnight.read(RTC_YEAR) == 0x25


def test_status_registers() -> None:
    cmos = Cmos()
    cmos.write(RTC_REG_A, 0xA6)  # guest cannot set UIP
    assert cmos.read(RTC_REG_A) == 0x26
    assert cmos.read(RTC_REG_C) == 0
    assert cmos.read(RTC_REG_D) == 0x80


def test_cmos_ram_is_zero_and_writable_time_is_not() -> None:
    cmos = Cmos(clock=lambda: FIXED)
    assert all(cmos.read(r) == 0 for r in range(0x0E, 0x80) if r != RTC_CENTURY)
    cmos.write(0x40, 0xAB)
    assert cmos.read(0x40) == 0xAB
    cmos.write(RTC_SECONDS, 0x00)
    assert cmos.read(RTC_SECONDS) == 0x58
    # Index bit 7 is the NMI mask, not part of the address (Cmos.read sets it).
    cmos.bus.write(0x70, 1, 0x40)
    assert cmos.bus.read(0x71, 1) == 0xAB
