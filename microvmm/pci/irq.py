"""Interrupt sinks a PCI function raises; the VMM implements them with KVM irqfds.

Devices and transports only see these protocols, so they run unchanged in unit
tests (with recording fakes) and in the VMM (eventfd writes into KVM).
"""

from __future__ import annotations

from typing import Protocol


class IntxLine(Protocol):
    """A level-triggered INTx line routed to the IOAPIC.

    `assert_line()` raises the level. KVM lowers it when the guest EOIs the
    interrupt (irqfd resample); the VMM then calls the function's
    `intx_resample()` so it can raise the line again if its condition (e.g. a
    non-zero virtio ISR) still holds.
    """

    def assert_line(self) -> None: ...


class MsiController(Protocol):
    """Delivers MSI-X vectors of one PCI function.

    `program_vector` is called whenever the guest changes a table entry or its
    mask state, so the VMM can keep a GSI route (address/data) per vector.
    `trigger` fires an unmasked vector; masking and the pending bits are the
    MSI-X capability's job, not the controller's.
    """

    def program_vector(self, vector: int, address: int, data: int, masked: bool) -> None: ...

    def trigger(self, vector: int) -> None: ...
