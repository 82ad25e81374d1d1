"""Virtio legacy ("0.9.5") PCI transport, as Linux's virtio_pci_legacy drives it.

BAR0 (I/O) holds the legacy register block; with MSI-X enabled two vector
registers appear at 20/22 and the device config moves from offset 20 to 24.
BAR1 (memory) holds the MSI-X table and PBA, one vector per queue plus one
for config changes.

Locking: `_transport_lock` (re-entrant) serialises register writes (reset, activate,
queue setup) and I/O-thread notifications, and is held while calling into the
device. `_irq_lock` is a leaf lock for ISR/status bits: the device may call
`signal_queue`/`fail` from its own threads while holding its own lock, so
those never take `_transport_lock` (that could deadlock against a reset waiting for the
device lock).
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
from dataclasses import dataclass

from microvmm.memory import GuestMemory, GuestMemoryError
from microvmm.pci.config import BarKind, InterruptPin, PciFunction, PciIds
from microvmm.pci.irq import IntxLine, MsiController
from microvmm.pci.msix import MsixCapability
from microvmm.virtio.device import VirtioDevice, VirtioDeviceType
from microvmm.virtio.features import VirtioFeature, VirtioStatus
from microvmm.virtio.queue import VirtQueue, VirtQueueError

logger = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
#: Transitional/legacy PCI device ids (virtio spec §4.1.2.1). Not 0x1000 + type - 1:
#: the legacy ids were handed out in historical order (balloon took 0x1002).
#: Linux's legacy driver accepts 0x1000..0x103F and takes the type from the subsystem id.
LEGACY_DEVICE_IDS = {
    VirtioDeviceType.NET: 0x1000,
    VirtioDeviceType.BLOCK: 0x1001,
    VirtioDeviceType.BALLOON: 0x1002,
    VirtioDeviceType.CONSOLE: 0x1003,
    VirtioDeviceType.SCSI: 0x1004,
    VirtioDeviceType.ENTROPY: 0x1005,
    VirtioDeviceType.NINEP: 0x1009,
}
VIRTIO_MSI_NO_VECTOR = 0xFFFF
BAR0_SIZE = 0x100
MSIX_BAR_INDEX = 1

#: PCI class code per device type (legacy devices, like QEMU/Linux expect).
CLASS_CODES = {
    VirtioDeviceType.NET: 0x020000,
    VirtioDeviceType.BLOCK: 0x010000,
    VirtioDeviceType.CONSOLE: 0x078000,
}


class LegacyReg(enum.IntEnum):
    """Offsets in BAR0 (include/uapi/linux/virtio_pci.h)."""

    HOST_FEATURES = 0
    GUEST_FEATURES = 4
    QUEUE_PFN = 8
    QUEUE_NUM = 12
    QUEUE_SEL = 14
    QUEUE_NOTIFY = 16
    STATUS = 18
    ISR = 19
    MSI_CONFIG_VECTOR = 20
    MSI_QUEUE_VECTOR = 22


CONFIG_OFFSET_NO_MSIX = 20
CONFIG_OFFSET_MSIX = 24


class Isr(enum.IntFlag):
    QUEUE = 1
    CONFIG = 2


#: Transport-provided ring features offered on top of the device's own.
TRANSPORT_FEATURES = (1 << VirtioFeature.RING_INDIRECT_DESC) | (1 << VirtioFeature.RING_EVENT_IDX)


@dataclass(frozen=True)
class IoEventFdSpec:
    """A KVM ioeventfd the VMM should register for a queue kick."""

    port: int
    size: int
    datamatch: int
    queue_index: int


class VirtioPciLegacy(PciFunction):
    """A PCI function exposing a `VirtioDevice` through the legacy interface."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 intx: IntxLine | None = None, msi: MsiController | None = None):
        device_type = VirtioDeviceType(device.device_type)
        super().__init__(PciIds(
            vendor_id=VIRTIO_PCI_VENDOR_ID,
            device_id=LEGACY_DEVICE_IDS[device_type],
            class_code=CLASS_CODES.get(device_type, 0xFF0000),
            revision=0,  # VIRTIO_PCI_ABI_VERSION: Linux's legacy driver requires 0
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=device_type,
            interrupt_pin=InterruptPin.INTA,
        ))
        self.device = device
        self.memory = memory
        self.intx = intx
        self.queues = [VirtQueue(memory, size) for size in device.queue_max_sizes]
        self.num_queues = len(self.queues)
        self.add_bar(0, BarKind.IO, BAR0_SIZE, _Bar0(self))
        self.msix = MsixCapability(self, self.num_queues + 1, MSIX_BAR_INDEX, msi)
        self._transport_lock = threading.RLock()
        self._irq_lock = threading.Lock()
        self.host_features = (device.device_features() | TRANSPORT_FEATURES) & 0xFFFFFFFF
        #: A driver set DRIVER_OK at least once (a reset does not clear it): the
        #: VMM's "no driver in this guest kernel?" hint.
        self.driver_seen = False
        self._reset_state()

    def connect_interrupts(self, intx: IntxLine | None = None, msi: MsiController | None = None) -> None:
        """Attach interrupt sinks once the VMM has created them (GSI known after bus add)."""
        if intx is not None:
            self.intx = intx
        if msi is not None:
            self.msix.controller = msi

    def _reset_state(self) -> None:
        self.guest_features = 0
        self.queue_sel = 0
        self.status = 0
        self.isr = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * self.num_queues
        self.activated = False
        self.failed = False
        for queue in self.queues:
            queue.reset()

    # ---- register block (BAR0) ------------------------------------------------

    @property
    def config_offset(self) -> int:
        return CONFIG_OFFSET_MSIX if self.msix.enabled else CONFIG_OFFSET_NO_MSIX

    def _selected_queue(self) -> VirtQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < self.num_queues else None

    def _header_bytes(self) -> bytearray:
        queue = self._selected_queue()
        with self._irq_lock:
            status, isr = self.status, self.isr
        header = bytearray(struct.pack(
            "<IIIHHHBB", self.host_features, self.guest_features, queue.pfn if queue else 0,
            queue.size if queue else 0, self.queue_sel, 0, status, isr))
        if self.msix.enabled:
            queue_vector = self.queue_vectors[self.queue_sel] if queue else VIRTIO_MSI_NO_VECTOR
            header += struct.pack("<HH", self.config_vector, queue_vector)
        return header

    def bar0_read(self, offset: int, size: int) -> int:
        with self._transport_lock:
            config_offset = self.config_offset
            if offset >= config_offset:
                return self.device.read_config(offset - config_offset, size) & ((1 << (8 * size)) - 1)
            if offset + size > config_offset:
                return 0  # straddles the header/device-config boundary
            value = int.from_bytes(self._header_bytes()[offset:offset + size], "little")
            if offset <= LegacyReg.ISR < offset + size:
                self._read_clear_isr()
            return value

    def _read_clear_isr(self) -> None:
        # Reading ISR acknowledges the interrupt; the INTx level drops at the
        # guest's EOI (irqfd resample) and `intx_resample` sees ISR == 0.
        with self._irq_lock:
            self.isr = 0

    def bar0_write(self, offset: int, size: int, value: int) -> None:
        with self._transport_lock:
            config_offset = self.config_offset
            if offset >= config_offset:
                if not self.failed:
                    self.device.write_config(offset - config_offset, size, value)
                return
            if (offset, size) == (LegacyReg.GUEST_FEATURES, 4):
                if not self.status & VirtioStatus.DRIVER_OK:
                    self.guest_features = value & self.host_features
            elif (offset, size) == (LegacyReg.QUEUE_PFN, 4):
                self._write_pfn(value)
            elif (offset, size) == (LegacyReg.QUEUE_SEL, 2):
                self.queue_sel = value
            elif (offset, size) == (LegacyReg.QUEUE_NOTIFY, 2):
                self._notify(value)
            elif (offset, size) == (LegacyReg.STATUS, 1):
                self._write_status(value)
            elif (offset, size) == (LegacyReg.MSI_CONFIG_VECTOR, 2):
                self.config_vector = self._valid_vector(value)
            elif (offset, size) == (LegacyReg.MSI_QUEUE_VECTOR, 2):
                if self._selected_queue() is not None:
                    self.queue_vectors[self.queue_sel] = self._valid_vector(value)
            else:
                logger.debug("ignored virtio legacy write %#x/%d = %#x", offset, size, value)

    def _valid_vector(self, value: int) -> int:
        # An unusable vector reads back as NO_VECTOR: Linux checks this to detect
        # that the device could not allocate it.
        return value if value < self.msix.num_vectors else VIRTIO_MSI_NO_VECTOR

    def _write_pfn(self, pfn: int) -> None:
        queue = self._selected_queue()
        if queue is None or self.failed:
            return
        if self.activated:
            # Linux only moves/clears queues after resetting the device; changing
            # rings under a running device would race its queue processing.
            logger.debug("QUEUE_PFN write to a live device ignored")
            return
        try:
            queue.configure_legacy(pfn)
        except VirtQueueError as exc:
            self.fail(f"queue {self.queue_sel}: {exc}")

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        with self._irq_lock:
            # NEEDS_RESET is the device's bit: the driver cannot clear it except by reset.
            self.status = value | (self.status & VirtioStatus.NEEDS_RESET)
        if value & VirtioStatus.DRIVER_OK and not self.activated and not self.failed:
            self._activate()

    def _activate(self) -> None:
        for queue in self.queues:
            queue.set_features(self.guest_features)
        self.activated = True
        self.driver_seen = True
        try:
            self.device.activate(self.memory, self.queues, self.guest_features,
                                 self.signal_queue, self.signal_config, self.fail)
        except (VirtQueueError, GuestMemoryError) as exc:
            self.fail(f"activation: {exc}")

    def reset(self) -> None:
        """Device reset (driver wrote status 0)."""
        with self._transport_lock:
            # Device first: it stops touching the queues before they are cleared.
            self.device.reset()
            with self._irq_lock:
                self._reset_state()

    # ---- notifications ----------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        """A kick for queue `index` (I/O thread, from an ioeventfd)."""
        with self._transport_lock:
            self._notify(index)

    def _notify(self, index: int) -> None:
        if not self.activated or self.failed:
            return
        if not 0 <= index < self.num_queues:
            logger.debug("notify of absent queue %d", index)
            return
        try:
            self.device.queue_notify(index)
        except (VirtQueueError, GuestMemoryError) as exc:
            self.fail(f"queue {index}: {exc}")

    def notify_ioeventfds(self) -> list[IoEventFdSpec]:
        """Ioeventfds for the current BAR0 address (empty while I/O decode is off)."""
        base = self.decoded_base(0)
        if base is None:
            return []
        return [IoEventFdSpec(base + LegacyReg.QUEUE_NOTIFY, 2, index, index)
                for index in range(self.num_queues)]

    # ---- interrupts ----------------------------------------------------------------

    def signal_queue(self, index: int) -> None:
        if not 0 <= index < self.num_queues:
            return
        with self._irq_lock:
            if not self.activated or self.failed:
                return
        self._interrupt(Isr.QUEUE, self.queue_vectors[index])

    def signal_config(self) -> None:
        with self._irq_lock:
            self.isr |= Isr.CONFIG
        self._interrupt(Isr.CONFIG, self.config_vector)

    def _interrupt(self, cause: Isr, vector: int) -> None:
        if self.msix.enabled:
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.msix.trigger(vector)
            return
        with self._irq_lock:
            self.isr |= cause
        if self.intx is not None and not self.intx_disabled:
            self.intx.assert_line()

    def intx_resample(self) -> None:
        """The guest EOI'd our level interrupt: raise it again if still pending."""
        with self._irq_lock:
            pending = self.isr != 0
        if pending and not self.msix.enabled and self.intx is not None and not self.intx_disabled:
            self.intx.assert_line()

    def fail(self, reason: str) -> None:
        """Bad guest input: NEEDS_RESET, log once, stop driving the device until reset."""
        with self._irq_lock:
            if self.failed:
                return
            self.failed = True
            self.status |= VirtioStatus.NEEDS_RESET
        logger.warning("virtio %s device needs reset: %s",
                       VirtioDeviceType(self.device.device_type).name.lower(), reason)
        self.signal_config()


class _Bar0:
    """BAR0 register handler (keeps the function's own read/write names free)."""

    def __init__(self, transport: VirtioPciLegacy):
        self._transport = transport

    def read(self, offset: int, size: int) -> int:
        return self._transport.bar0_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._transport.bar0_write(offset, size, value)
