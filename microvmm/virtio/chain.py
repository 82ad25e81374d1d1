"""A descriptor chain taken from a virtqueue: views into guest RAM (queue.py validates it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class DescriptorChain:
    """One available buffer: a validated descriptor chain, as views into guest RAM.

    `readable` buffers carry driver->device data, `writable` ones device->driver.
    The views stay valid only while guest memory is mapped; use them promptly.
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read_all(self) -> bytes:
        """All driver->device bytes, concatenated."""
        return b"".join(bytes(v) for v in self.readable)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy `data` into the writable buffers starting at byte `offset`.

        Returns the number of bytes written (less than len(data) if the buffers
        are too small).
        """
        source = memoryview(data).cast("B")
        written = 0
        skip = offset
        for view in self.writable:
            if skip >= len(view):
                skip -= len(view)
                continue
            room = len(view) - skip
            chunk = min(room, len(source) - written)
            view[skip:skip + chunk] = source[written:written + chunk]
            written += chunk
            skip = 0
            if written == len(source):
                break
        return written
