"""A minimal MC146818 CMOS RTC at ports 0x70 (index) / 0x71 (data).

The time registers always show the host's current UTC time, formatted per
register B (BCD or binary, 12 h or 24 h), and register A never reports an
update in progress, so Linux's mc146818_get_time() never spins on UIP. Register
D reports valid RAM and time. The other CMOS bytes are plain RAM, zero at
start. No update/alarm/periodic interrupts are generated (no IRQ 8 is wired);
register C reads 0. Guest writes to the time registers are ignored: the guest
cannot move the host clock, and nothing here keeps a per-VM offset.
"""

from __future__ import annotations

import enum
import threading
import time
from typing import Callable

RTC_BASE = 0x70
RTC_PORT_COUNT = 2
INDEX_OFFSET = 0
DATA_OFFSET = 1
CMOS_SIZE = 128


class CmosReg(enum.IntEnum):
    SECONDS = 0x00
    SECONDS_ALARM = 0x01
    MINUTES = 0x02
    MINUTES_ALARM = 0x03
    HOURS = 0x04
    HOURS_ALARM = 0x05
    DAY_OF_WEEK = 0x06
    DAY_OF_MONTH = 0x07
    MONTH = 0x08
    YEAR = 0x09
    REG_A = 0x0A
    REG_B = 0x0B
    REG_C = 0x0C
    REG_D = 0x0D
    CENTURY = 0x32  # the register ACPI FADT usually names; IBM PC convention


class RegA(enum.IntFlag):
    UIP = 0x80  # update in progress: always 0 here


class RegB(enum.IntFlag):
    SET = 0x80
    PIE = 0x40
    AIE = 0x20
    UIE = 0x10
    SQWE = 0x08
    DM_BINARY = 0x04
    HOURS_24 = 0x02
    DSE = 0x01


REG_D_VRT = 0x80  # valid RAM and time
DEFAULT_REG_A = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
DEFAULT_REG_B = RegB.HOURS_24  # BCD, 24 h: what PC firmware leaves behind
HOURS_PM = 0x80

_TIME_REGS = frozenset({CmosReg.SECONDS, CmosReg.MINUTES, CmosReg.HOURS,
                        CmosReg.DAY_OF_WEEK, CmosReg.DAY_OF_MONTH, CmosReg.MONTH,
                        CmosReg.YEAR, CmosReg.CENTURY})


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class CmosRtc:
    """CMOS RTC + RAM; `clock` returns seconds since the epoch (UTC)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._ram = bytearray(CMOS_SIZE)
        self._ram[CmosReg.REG_A] = DEFAULT_REG_A
        self._ram[CmosReg.REG_B] = DEFAULT_REG_B

    def read(self, offset: int, size: int) -> int:
        if offset != DATA_OFFSET:
            return 0xFF  # the index port is write-only
        with self._lock:
            return self._read_cmos(self._index)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == INDEX_OFFSET:
                # Bit 7 masks NMI on a PC; there is no NMI source to mask here.
                self._index = value & (CMOS_SIZE - 1)
            elif offset == DATA_OFFSET:
                self._write_cmos(self._index, value)

    def _read_cmos(self, index: int) -> int:
        if index in _TIME_REGS:
            return self._time_register(index)
        if index == CmosReg.REG_A:
            return self._ram[index] & ~int(RegA.UIP) & 0xFF
        if index == CmosReg.REG_C:
            return 0  # no interrupt flags ever raised
        if index == CmosReg.REG_D:
            return REG_D_VRT
        return self._ram[index]

    def _write_cmos(self, index: int, value: int) -> None:
        if index in _TIME_REGS or index in (CmosReg.REG_C, CmosReg.REG_D):
            return  # read-only here (see module docstring)
        if index == CmosReg.REG_A:
            value &= ~int(RegA.UIP) & 0xFF
        self._ram[index] = value

    def _time_register(self, index: int) -> int:
        now = time.gmtime(self._clock())
        reg_b = self._ram[CmosReg.REG_B]
        binary = bool(reg_b & RegB.DM_BINARY)

        def fmt(v: int) -> int:
            return v if binary else _to_bcd(v)

        if index == CmosReg.SECONDS:
            return fmt(min(now.tm_sec, 59))  # a leap second shows as :59
        if index == CmosReg.MINUTES:
            return fmt(now.tm_min)
        if index == CmosReg.HOURS:
            if reg_b & RegB.HOURS_24:
                return fmt(now.tm_hour)
            hour12 = now.tm_hour % 12 or 12
            return fmt(hour12) | (HOURS_PM if now.tm_hour >= 12 else 0)
        if index == CmosReg.DAY_OF_WEEK:
            return fmt((now.tm_wday + 1) % 7 + 1)  # tm_wday 0 = Monday; RTC 1 = Sunday
        if index == CmosReg.DAY_OF_MONTH:
            return fmt(now.tm_mday)
        if index == CmosReg.MONTH:
            return fmt(now.tm_mon)
        if index == CmosReg.YEAR:
            return fmt(now.tm_year % 100)
        return fmt(now.tm_year // 100)  # CENTURY
