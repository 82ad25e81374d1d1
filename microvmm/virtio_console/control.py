"""The virtio-console control protocol (virtio spec §5.3.6.2, as Linux uses it).

Every control message starts with {le32 id; le16 event; le16 value}. The host
appends the port name to PORT_NAME and {le16 cols; le16 rows} to RESIZE.
RESIZE follows the spec's field order (cols, rows); Linux read them the other
way round (rows, cols) until its 2025 fix, so older guests see them swapped.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<IHH")
RESIZE_PAYLOAD = struct.Struct("<HH")
#: Linux sends DEVICE_READY with this id (VIRTIO_CONSOLE_BAD_ID).
BAD_ID = 0xFFFFFFFF


class ControlEvent(enum.IntEnum):
    DEVICE_READY = 0   # guest -> host: driver is ready (value 1) or failed (0)
    DEVICE_ADD = 1     # host -> guest: port `id` exists
    DEVICE_REMOVE = 2  # host -> guest: port `id` is gone
    PORT_READY = 3     # guest -> host: port `id` set up (value 1) or failed (0)
    CONSOLE_PORT = 4   # host -> guest: port `id` is a console (hvc)
    RESIZE = 5         # host -> guest: console size follows the header
    PORT_OPEN = 6      # both ways: port opened (1) / closed (0) on the sender's side
    PORT_NAME = 7      # host -> guest: port name follows the header


#: Events a driver may send; anything else from the guest is a protocol error.
GUEST_EVENTS = frozenset({ControlEvent.DEVICE_READY, ControlEvent.PORT_READY, ControlEvent.PORT_OPEN})


class ControlError(Exception):
    """A malformed control message from the guest."""


@dataclass(frozen=True)
class ControlMessage:
    port_id: int
    event: ControlEvent
    value: int = 0
    payload: bytes = b""

    def encode(self) -> bytes:
        return HEADER.pack(self.port_id, self.event, self.value) + self.payload

    @classmethod
    def decode_from_guest(cls, data: bytes) -> "ControlMessage":
        if len(data) < HEADER.size:
            raise ControlError(f"control message of {len(data)} bytes is shorter than {HEADER.size}")
        port_id, event, value = HEADER.unpack_from(data)
        try:
            kind = ControlEvent(event)
        except ValueError:
            raise ControlError(f"unknown control event {event}") from None
        if kind not in GUEST_EVENTS:
            raise ControlError(f"control event {kind.name} is not one a driver sends")
        return cls(port_id, kind, value, bytes(data[HEADER.size:]))


def device_add(port_id: int) -> ControlMessage:
    return ControlMessage(port_id, ControlEvent.DEVICE_ADD, 1)


def device_remove(port_id: int) -> ControlMessage:
    return ControlMessage(port_id, ControlEvent.DEVICE_REMOVE, 1)


def console_port(port_id: int) -> ControlMessage:
    return ControlMessage(port_id, ControlEvent.CONSOLE_PORT, 1)


def port_open(port_id: int, is_open: bool) -> ControlMessage:
    return ControlMessage(port_id, ControlEvent.PORT_OPEN, int(is_open))


def port_name(port_id: int, name: str) -> ControlMessage:
    return ControlMessage(port_id, ControlEvent.PORT_NAME, 1, name.encode("ascii"))


def resize(port_id: int, cols: int, rows: int) -> ControlMessage:
    return ControlMessage(port_id, ControlEvent.RESIZE, 0, RESIZE_PAYLOAD.pack(cols, rows))
