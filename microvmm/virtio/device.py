"""The contract between a virtio device model and its transport.

A device (console, ...) knows its feature bits, its config space and what to
do with its queues. The transport (legacy PCI here) owns the registers,
feature negotiation, queue setup, status and interrupts, and calls the device
through this interface. Nothing here knows about KVM or the CLI.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from microvmm.memory import GuestMemory
    from microvmm.virtio.queue import VirtQueue


class VirtioDeviceType(enum.IntEnum):
    """Virtio device ids (spec §5) of the devices that have a legacy PCI id."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON = 5
    SCSI = 8
    NINEP = 9


class VirtioDevice(ABC):
    """A virtio device model, driven by a transport.

    Threading: config-space accesses, `activate` and `reset` arrive on vCPU
    threads; `queue_notify` arrives on the VMM's I/O thread. Implementations
    protect their state with their own lock.
    """

    device_type: VirtioDeviceType
    #: Maximum size of each queue; its length is the number of queues.
    queue_max_sizes: tuple[int, ...]

    @abstractmethod
    def device_features(self) -> int:
        """Device-specific feature bits (the transport adds ring features)."""

    @abstractmethod
    def read_config(self, offset: int, size: int) -> int:
        """Read `size` (1, 2 or 4) bytes of device config; out of range reads 0."""

    @abstractmethod
    def write_config(self, offset: int, size: int, value: int) -> None:
        """Write device config; ignores writes to read-only or absent fields."""

    @abstractmethod
    def activate(
        self,
        memory: "GuestMemory",
        queues: list["VirtQueue"],
        driver_features: int,
        signal_queue: Callable[[int], None],
        signal_config: Callable[[], None],
        fail: Callable[[str], None],
    ) -> None:
        """The driver set DRIVER_OK: start using the queues.

        `signal_queue(i)` interrupts the guest for used buffers on queue i,
        `signal_config()` for a config change, `fail(reason)` reports bad guest
        input: the transport sets NEEDS_RESET, logs once and stops the device.
        """

    @abstractmethod
    def queue_notify(self, index: int) -> None:
        """The driver kicked queue `index` (called on the I/O thread)."""

    @abstractmethod
    def reset(self) -> None:
        """The driver reset the device: drop queue state, keep host backends."""
