"""Which PCI function goes where: one planned list, read by the MP table and the bus.

The MP table (the guest's INTx routing) is written into guest RAM before the
bus and the devices exist (they are built while vCPU 0 boots), so both are
derived from this list, made from the configuration alone; the device manager
checks that the bus assigned exactly what was planned.
"""

from __future__ import annotations

from typing import Any, Sequence

# Plain classes, not dataclasses: a default run plans its console before its
# first KVM_RUN, and each dataclass costs start-up time (issue 6).

#: Slot 0 is the host bridge; devices follow in the order they were asked for.
FIRST_DEVICE_SLOT = 1
#: Every virtio function raises INTA# (the legacy transport's interrupt pin).
PCI_INTA = 1
#: IOAPIC pins for PCI INTx, one per function, above the 16 ISA IRQs: the same
#: list and order as pci/bus.py DEFAULT_INTX_GSIS (not imported: start-up time).
INTX_GSIS = tuple(range(16, 24))
#: The bus has 32 slots; INTx GSIs bound the number of functions first.
MAX_DEVICES = len(INTX_GSIS)


class DevicePlanError(ValueError):
    """More devices than the bus can wire."""


class DeviceRequest:
    """One device asked for (`--device`): its kind (the registered name) and its parsed options."""

    __slots__ = ("kind", "options", "text")

    def __init__(self, kind: str, options: Any, text: str = ""):
        self.kind = kind
        self.options = options
        self.text = text

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DeviceRequest)
                and (self.kind, self.options) == (other.kind, other.options))

    def __repr__(self) -> str:
        return f"DeviceRequest({self.kind!r}, {self.options!r})"


class PlannedFunction:
    """One PCI function: where it sits and which GSI its INTA# reaches.

    `name` ("virtio-console0", "virtio-rng0") is what it is found by while
    the guest runs."""

    __slots__ = ("name", "slot", "pin", "gsi", "request")

    def __init__(self, name: str, slot: int, pin: int, gsi: int, request: DeviceRequest):
        self.name, self.slot, self.pin, self.gsi, self.request = name, slot, pin, gsi, request

    @property
    def kind(self) -> str:
        return self.request.kind

    def __repr__(self) -> str:
        return f"PlannedFunction({self.name!r}, slot={self.slot}, gsi={self.gsi})"


def plan_functions(requests: Sequence[DeviceRequest]) -> list[PlannedFunction]:
    """Slots from FIRST_DEVICE_SLOT and INTx GSIs in request order; each
    device's name is its kind and its number among those of its kind."""
    if len(requests) > MAX_DEVICES:
        raise DevicePlanError(f"{len(requests)} PCI devices: at most {MAX_DEVICES} "
                              f"(one INTx line each)")
    seen: dict[str, int] = {}
    planned = []
    for index, request in enumerate(requests):
        ordinal = seen.get(request.kind, 0)
        seen[request.kind] = ordinal + 1
        planned.append(PlannedFunction(f"{request.kind}{ordinal}", FIRST_DEVICE_SLOT + index,
                                       PCI_INTA, INTX_GSIS[index], request))
    return planned


def mp_table_irqs(plan: Sequence[PlannedFunction]) -> list:
    """The MP table's PCI interrupt entries for the plan (boot.PciIrq)."""
    from microvmm.boot import PciIrq
    return [PciIrq(device=f.slot, pin=f.pin, ioapic_pin=f.gsi) for f in plan]
