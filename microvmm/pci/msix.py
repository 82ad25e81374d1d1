"""MSI-X capability (PCI Local Bus spec 3.0 §6.8.2): table, PBA, masking.

The table and PBA live in one memory BAR (table at offset 0, PBA after it).
The guest programs address/data per vector; this class keeps the masks and
pending bits and tells the `MsiController` about every change, so the VMM can
keep one GSI route per vector. Triggering a masked vector only sets its pending
bit; unmasking delivers it.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading

from microvmm.pci.config import BarKind, PciFunction
from microvmm.pci.irq import MsiController

logger = logging.getLogger(__name__)

MSIX_CAP_ID = 0x11
ENTRY_SIZE = 16
MAX_VECTORS = 2048


class MessageControl(enum.IntFlag):
    TABLE_SIZE_MASK = 0x07FF
    FUNCTION_MASK = 1 << 14
    ENABLE = 1 << 15


class EntryField(enum.IntEnum):
    ADDRESS_LO = 0
    ADDRESS_HI = 4
    DATA = 8
    VECTOR_CONTROL = 12


VECTOR_MASKED = 1


class MsixCapability:
    """MSI-X for one function; also the register handler of its table BAR."""

    def __init__(self, function: PciFunction, num_vectors: int, bar_index: int,
                 controller: MsiController | None = None):
        if not 1 <= num_vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X supports 1..{MAX_VECTORS} vectors, not {num_vectors}")
        self.function = function
        self.num_vectors = num_vectors
        self.controller = controller
        self._lock = threading.RLock()
        self.table = bytearray(ENTRY_SIZE * num_vectors)
        for vector in range(num_vectors):
            # Vectors come out of reset masked (spec: Mask bit resets to 1).
            struct.pack_into("<I", self.table, ENTRY_SIZE * vector + EntryField.VECTOR_CONTROL, VECTOR_MASKED)
        self.pending = [False] * num_vectors
        self.table_size = ENTRY_SIZE * num_vectors
        self.pba_offset = max(0x800, (self.table_size + 7) & ~7)
        self.pba_size = ((num_vectors + 63) // 64) * 8
        bar_size = 4096
        while bar_size < self.pba_offset + self.pba_size:
            bar_size *= 2
        self.bar_index = bar_index
        function.add_bar(bar_index, BarKind.MEMORY32, bar_size, self)
        body = struct.pack("<HII", num_vectors - 1, 0 | bar_index, self.pba_offset | bar_index)
        wmask = struct.pack("<HII", MessageControl.FUNCTION_MASK | MessageControl.ENABLE, 0, 0)
        self.cap_offset = function.add_capability(MSIX_CAP_ID, body, wmask, self._control_written)
        self._control = 0  # last Message Control value acted upon

    # ---- state ----------------------------------------------------------------

    @property
    def message_control(self) -> int:
        return self.function.get(self.cap_offset + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.message_control & MessageControl.ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.message_control & MessageControl.FUNCTION_MASK)

    def vector_masked(self, vector: int) -> bool:
        return bool(self._entry(vector, EntryField.VECTOR_CONTROL) & VECTOR_MASKED)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, vector mask bit) of a table entry."""
        address = self._entry(vector, EntryField.ADDRESS_LO) | (self._entry(vector, EntryField.ADDRESS_HI) << 32)
        return address, self._entry(vector, EntryField.DATA), self.vector_masked(vector)

    def _entry(self, vector: int, field: int) -> int:
        return struct.unpack_from("<I", self.table, ENTRY_SIZE * vector + field)[0]

    def _effectively_masked(self, vector: int) -> bool:
        return not self.enabled or self.function_masked or self.vector_masked(vector)

    # ---- delivery -------------------------------------------------------------

    def trigger(self, vector: int) -> None:
        """Fire `vector`, or mark it pending while masked. Out-of-range: ignored."""
        with self._lock:
            if not 0 <= vector < self.num_vectors:
                logger.debug("MSI-X trigger of absent vector %d", vector)
                return
            if self._effectively_masked(vector):
                self.pending[vector] = True
                return
            controller = self.controller
        if controller is not None:
            controller.trigger(vector)

    def _program(self, vector: int) -> None:
        if self.controller is not None:
            address, data, _ = self.entry(vector)
            self.controller.program_vector(vector, address, data, self._effectively_masked(vector))

    def _deliver_unmasked_pending(self) -> None:
        for vector in range(self.num_vectors):
            if self.pending[vector] and not self._effectively_masked(vector):
                self.pending[vector] = False
                if self.controller is not None:
                    self.controller.trigger(vector)

    def _control_written(self, offset_in_cap: int, size: int) -> None:
        # Called by the function with its config lock held, after the write applied.
        with self._lock:
            control = self.message_control & (MessageControl.ENABLE | MessageControl.FUNCTION_MASK)
            if control == self._control:
                return
            self._control = control
            for vector in range(self.num_vectors):
                self._program(vector)
            self._deliver_unmasked_pending()

    # ---- table BAR registers ----------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size:
            return 0
        with self._lock:
            if 0 <= offset and offset + size <= self.table_size:
                return int.from_bytes(self.table[offset:offset + size], "little")
            if self.pba_offset <= offset and offset + size <= self.pba_offset + self.pba_size:
                return self._pba_bits(offset - self.pba_offset, size)
        return 0

    def _pba_bits(self, byte_offset: int, size: int) -> int:
        value = 0
        first = byte_offset * 8
        for bit in range(size * 8):
            vector = first + bit
            if vector < self.num_vectors and self.pending[vector]:
                value |= 1 << bit
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        # Only aligned dword/qword table writes are defined; the PBA is read-only.
        if size not in (4, 8) or offset % size or offset < 0 or offset + size > self.table_size:
            return
        with self._lock:
            self.table[offset:offset + size] = value.to_bytes(size, "little")
            first = offset // ENTRY_SIZE
            last = (offset + size - 1) // ENTRY_SIZE
            for vector in range(first, last + 1):
                self._program(vector)
            self._deliver_unmasked_pending()
