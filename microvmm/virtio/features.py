"""Virtio feature bits and status bits shared by transports and devices."""

from __future__ import annotations

import enum


class VirtioFeature(enum.IntEnum):
    """Bit numbers of transport/ring feature bits (spec §6)."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32


class VirtioStatus(enum.IntFlag):
    """Device status register bits (spec §2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


def feature_bit(bit: int) -> int:
    return 1 << bit
