"""Virtio legacy PCI transport driven by the fake Linux-like front-end over a real PciBus."""

from __future__ import annotations

import logging
import struct
import threading

import pytest

from microvmm.memory import GuestMemory
from microvmm.pci.bus import PciBus
from microvmm.virtio.device import VirtioDevice, VirtioDeviceType
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from microvmm.virtio.queue import VirtQueueError
from microvmm.testing.fakes.virtio_driver import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    MSI_NO_VECTOR,
    REG_HOST_FEATURES,
    REG_MSI_CONFIG_VECTOR,
    REG_MSI_QUEUE_VECTOR,
    REG_QUEUE_NUM,
    REG_QUEUE_PFN,
    REG_QUEUE_SEL,
    REG_GUEST_FEATURES,
    STATUS_NEEDS_RESET,
    FakeIntxLine,
    FakeLegacyPciDriver,
    FakeMsiController,
    GuestAllocator,
)

RAM = 2 << 20
SLOT = 3
RX, TX = 0, 1
DEVICE_FEATURE = 1 << 1  # stands in for a device-specific bit
CONFIG_MAGIC = 0x11223344


class EchoDevice(VirtioDevice):
    """Loopback: bytes the driver sends on TX come back on RX."""

    device_type = VirtioDeviceType.CONSOLE
    queue_max_sizes = (16, 16)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.config = bytearray(struct.pack("<IHH", CONFIG_MAGIC, 0, 0))
        self.activations: list[int] = []
        self.notifies: list[int] = []
        self.resets = 0
        self.queues = None
        self.signal_queue = self.signal_config = self.fail = None

    def device_features(self) -> int:
        return DEVICE_FEATURE

    def read_config(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            return 0
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset >= 4 and offset + size <= len(self.config):  # the magic is read-only
            self.config[offset:offset + size] = value.to_bytes(size, "little")

    def activate(self, memory, queues, driver_features, signal_queue, signal_config, fail) -> None:
        with self.lock:
            self.activations.append(driver_features)
            self.queues = queues
            self.signal_queue, self.signal_config, self.fail = signal_queue, signal_config, fail

    def queue_notify(self, index: int) -> None:
        with self.lock:
            self.notifies.append(index)
            if index != TX:
                return
            rx, tx = self.queues[RX], self.queues[TX]
            while (chain := tx.pop()) is not None:
                data = chain.read_all()
                tx.add_used(chain.head, 0)
                target = rx.pop()
                if target is None:
                    continue  # no RX buffer: drop (a real device would queue)
                rx.add_used(target.head, target.write(data))
            if tx.needs_notification():
                self.signal_queue(TX)
            if rx.needs_notification():
                self.signal_queue(RX)

    def reset(self) -> None:
        with self.lock:
            self.resets += 1
            self.queues = None


@pytest.fixture
def env():
    memory = GuestMemory([(0, RAM)])
    bus = PciBus()
    device = EchoDevice()
    intx, msi = FakeIntxLine(), FakeMsiController()
    transport = VirtioPciLegacy(device, memory, intx=intx, msi=msi)
    bus.add_device(transport, SLOT)
    driver = FakeLegacyPciDriver(bus, memory, GuestAllocator(memory, 0x10000, RAM),
                                 device_id=0x1003, transport=transport)
    driver.enable()
    return driver, transport, device, intx, msi


def bring_up(driver, features=F_EVENT_IDX | F_INDIRECT_DESC, msix=False):
    driver.negotiate(features | DEVICE_FEATURE)
    if msix:
        driver.enable_msix(3)
        assert driver.set_config_vector(0) == 0
        rx = driver.setup_queue(RX, vector=1)
        tx = driver.setup_queue(TX, vector=2)
    else:
        rx = driver.setup_queue(RX)
        tx = driver.setup_queue(TX)
    driver.driver_ok()
    return rx, tx


def test_pci_identity(env):
    driver, transport, *_ = env
    assert driver.config_read(0x00, 4) == 0x1003_1AF4
    assert driver.config_read(0x08, 1) == 0  # revision: VIRTIO_PCI_ABI_VERSION
    assert driver.config_read(0x08, 4) >> 8 == 0x078000
    assert driver.config_read(0x2C, 2) == 0x1AF4
    assert driver.config_read(0x2E, 2) == 3
    assert driver.config_read(0x3D, 1) == 1  # INTA
    assert driver.config_read(0x10, 4) & 1 == 1  # BAR0 is I/O
    assert driver.config_read(0x14, 4) & 1 == 0  # BAR1 is memory
    cap = driver.find_capability(0x11)
    assert driver.config_read(cap + 2, 2) & 0x7FF == 2  # num_queues + 1 vectors


def test_feature_negotiation(env):
    driver, transport, device, *_ = env
    host = driver.io_read(REG_HOST_FEATURES, 4)
    assert host == DEVICE_FEATURE | F_INDIRECT_DESC | F_EVENT_IDX
    driver.io_write(REG_GUEST_FEATURES, 4, 0xFFFFFFFF)
    assert driver.io_read(REG_GUEST_FEATURES, 4) == host  # only offered bits stick
    driver.io_write(REG_HOST_FEATURES, 4, 0)  # read-only
    assert driver.io_read(REG_HOST_FEATURES, 4) == host
    bring_up(driver, features=F_INDIRECT_DESC)
    assert device.activations == [DEVICE_FEATURE | F_INDIRECT_DESC]
    assert transport.queues[0].indirect and not transport.queues[0].event_idx


def test_queue_registers(env):
    driver, transport, *_ = env
    driver.io_write(REG_QUEUE_SEL, 2, 1)
    assert driver.io_read(REG_QUEUE_NUM, 2) == 16
    assert driver.io_read(REG_QUEUE_SEL, 2) == 1
    driver.io_write(REG_QUEUE_NUM, 2, 4)  # read-only in legacy
    assert driver.io_read(REG_QUEUE_NUM, 2) == 16
    driver.io_write(REG_QUEUE_SEL, 2, 7)  # absent queue: size 0, PFN ignored
    assert driver.io_read(REG_QUEUE_NUM, 2) == 0
    driver.io_write(REG_QUEUE_PFN, 4, 0x20)
    assert driver.io_read(REG_QUEUE_PFN, 4) == 0
    ring = driver.setup_queue(0)
    driver.io_write(REG_QUEUE_SEL, 2, 0)
    assert driver.io_read(REG_QUEUE_PFN, 4) == ring.pfn
    with pytest.raises(LookupError):  # Linux refuses an already-active queue
        driver.setup_queue(0)


def test_echo_with_intx_and_isr_read_to_clear(env):
    driver, transport, device, intx, msi = env
    rx, tx = bring_up(driver, features=0)
    assert device.activations == [DEVICE_FEATURE]
    rx.add(writable=[32])
    assert driver.kick(RX)
    tx.add(readable=[b"ping"])
    assert driver.kick(TX)
    assert device.notifies == [RX, TX]
    assert intx.asserts >= 1
    assert driver.read_isr() == 1
    assert driver.read_isr() == 0  # read clears
    intx.eoi()
    transport.intx_resample()
    assert not intx.level  # ISR clear: no re-assert
    assert [u.data for u in rx.get_used()] == [b"ping"]
    assert [u.length for u in tx.get_used()] == [0]
    assert msi.triggered == []
    # A pending ISR at EOI time re-raises the line.
    transport.signal_queue(RX)
    intx.eoi()
    transport.intx_resample()
    assert intx.level
    # INTx disable in the command register keeps the line quiet.
    driver.read_isr()
    intx.eoi()
    driver.config_write(0x04, 2, driver.config_read(0x04, 2) | 0x400)
    asserts = intx.asserts
    transport.signal_queue(RX)
    transport.intx_resample()
    assert intx.asserts == asserts and not intx.level


def test_device_config_offset_moves_with_msix(env):
    driver, transport, device, *_ = env
    assert driver.io_read(20, 4) == CONFIG_MAGIC
    driver.write_device_config(4, 2, 0xBEEF)
    assert driver.io_read(24, 2) == 0xBEEF
    assert [driver.io_read(20 + i, 1) for i in range(4)] == [0x44, 0x33, 0x22, 0x11]
    driver.enable_msix(3)
    assert driver.io_read(24, 4) == CONFIG_MAGIC
    assert driver.io_read(28, 2) == 0xBEEF
    # 20/22 are now the vector registers, both NO_VECTOR after reset.
    assert driver.io_read(REG_MSI_CONFIG_VECTOR, 2) == MSI_NO_VECTOR
    assert driver.io_read(REG_MSI_QUEUE_VECTOR, 2) == MSI_NO_VECTOR
    assert driver.set_config_vector(2) == 2
    assert driver.set_config_vector(3) == MSI_NO_VECTOR  # beyond the table: refused
    assert driver.set_config_vector(MSI_NO_VECTOR) == MSI_NO_VECTOR
    driver.io_write(REG_QUEUE_SEL, 2, 1)
    driver.io_write(REG_MSI_QUEUE_VECTOR, 2, 1)
    assert driver.io_read(REG_MSI_QUEUE_VECTOR, 2) == 1
    driver.io_write(REG_QUEUE_SEL, 2, 0)
    assert driver.io_read(REG_MSI_QUEUE_VECTOR, 2) == MSI_NO_VECTOR


def test_echo_with_msix(env):
    driver, transport, device, intx, msi = env
    rx, tx = bring_up(driver, msix=True)
    assert set(msi.vectors) == {0, 1, 2}
    assert msi.vectors[1].data == 0x41 and not msi.vectors[1].masked
    rx.add(writable=[8])
    driver.kick(RX)
    tx.add(readable=[b"hi"])
    driver.kick(TX)
    assert sorted(msi.triggered) == [1, 2]
    assert intx.asserts == 0 and driver.read_isr() == 0
    assert [u.data for u in rx.get_used()] == [b"hi"]
    transport.signal_config()
    assert msi.triggered[-1] == 0
    # Masking the RX vector: trigger goes pending, delivered on unmask.
    entry = driver.msix_table_entry(1)
    driver.bus.mmio_write(entry + 12, 4, 1)
    transport.signal_queue(RX)
    assert msi.triggered[-1] == 0
    driver.bus.mmio_write(entry + 12, 4, 0)
    assert msi.triggered[-1] == 1
    # A queue with NO_VECTOR gets no interrupt at all.
    driver.io_write(REG_QUEUE_SEL, 2, TX)
    driver.io_write(REG_MSI_QUEUE_VECTOR, 2, MSI_NO_VECTOR)
    count = len(msi.triggered)
    transport.signal_queue(TX)
    assert len(msi.triggered) == count and intx.asserts == 0


def test_ioeventfd_kick_path(env):
    driver, transport, device, *_ = env
    specs = transport.notify_ioeventfds()
    assert [(s.port, s.size, s.datamatch, s.queue_index) for s in specs] == [
        (driver.io_base + 16, 2, 0, 0), (driver.io_base + 16, 2, 1, 1)]
    rx, tx = bring_up(driver)
    rx.add(writable=[8])
    driver.kick(RX, via_ioeventfd=True)
    tx.add(readable=[b"io"])
    driver.kick(TX, via_ioeventfd=True)
    assert [u.data for u in rx.get_used()] == [b"io"]
    transport.queue_notify(5)  # bogus index from a misconfigured fd: ignored
    transport.queue_notify(-1)
    assert device.notifies == [RX, TX]
    # I/O decode off: no ioeventfds for the VMM to register.
    driver.config_write(0x04, 2, 0)
    assert transport.notify_ioeventfds() == []


def test_event_idx_suppresses_interrupts_and_kicks(env):
    driver, transport, device, intx, msi = env
    rx, tx = bring_up(driver, features=F_EVENT_IDX, msix=True)
    for _ in range(3):
        rx.add(writable=[4])
    driver.kick(RX)
    # The driver only wants an RX interrupt after the 3rd used entry (used_event = 2).
    rx.set_used_event(2)
    msi.triggered.clear()
    for payload in (b"a", b"b"):
        tx.add(readable=[payload])
        driver.kick(TX)
    assert 1 not in msi.triggered
    tx.add(readable=[b"c"])
    driver.kick(TX)
    assert msi.triggered.count(1) == 1
    # The device re-armed avail_event after each pop, so every TX add needed a kick.
    assert device.notifies.count(TX) == 3


def test_indirect_through_transport(env):
    driver, transport, device, *_ = env
    rx, tx = bring_up(driver)
    rx.add(writable=[2, 2, 4], use_indirect=True)
    tx.add(readable=[b"ab", b"cdef"], use_indirect=True)
    driver.kick(RX)
    driver.kick(TX)
    assert [u.data for u in rx.get_used()] == [b"abcdef"]


def test_reset(env):
    driver, transport, device, intx, msi = env
    rx, tx = bring_up(driver, msix=True)
    transport.signal_config()
    driver.reset()
    assert device.resets >= 2  # negotiate() reset once, this is another
    assert driver.io_read(REG_GUEST_FEATURES, 4) == 0
    assert driver.read_isr() == 0
    for index in (RX, TX):
        driver.io_write(REG_QUEUE_SEL, 2, index)
        assert driver.io_read(REG_QUEUE_PFN, 4) == 0
        assert driver.io_read(REG_MSI_QUEUE_VECTOR, 2) == MSI_NO_VECTOR
    assert driver.io_read(REG_MSI_CONFIG_VECTOR, 2) == MSI_NO_VECTOR
    assert not any(q.ready for q in transport.queues)
    notifies = list(device.notifies)
    transport.queue_notify(TX)  # not activated: device not called
    assert device.notifies == notifies
    # The driver can bring it up again.
    rx, tx = bring_up(driver, msix=True)
    assert len(device.activations) == 2


def test_needs_reset_on_bad_chain(env, caplog):
    driver, transport, device, intx, msi = env
    rx, tx = bring_up(driver, features=0)
    # A descriptor pointing past guest RAM.
    tx.write_desc(tx.desc, 0, RAM - 2, 64, 0, 0)
    tx.free.remove(0)
    tx.publish(0)
    caplog.set_level(logging.WARNING, logger="microvmm.virtio.pci_legacy")
    driver.kick(TX, force=True)
    assert driver.status & STATUS_NEEDS_RESET
    assert driver.read_isr() & 2  # config change interrupt
    assert intx.asserts >= 1
    driver.kick(TX, force=True)
    driver.kick(RX, force=True)
    transport.queue_notify(TX)
    assert device.notifies == [TX]  # stopped calling the device
    transport.fail("again")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "outside guest RAM" in warnings[0].getMessage()
    # The driver writing status cannot clear NEEDS_RESET; a reset does.
    driver.io_write(18, 1, 0x7)
    assert driver.status & STATUS_NEEDS_RESET
    rx, tx = bring_up(driver, features=0)
    assert driver.status == 0x7
    rx.add(writable=[4])
    tx.add(readable=[b"ok"])
    driver.kick(RX)
    driver.kick(TX)
    assert [u.data for u in rx.get_used()] == [b"ok"]


def test_needs_reset_on_bad_pfn_and_device_fail(env):
    driver, transport, device, *_ = env
    driver.negotiate(0)
    driver.io_write(REG_QUEUE_SEL, 2, 0)
    driver.io_write(REG_QUEUE_PFN, 4, RAM // 4096)  # rings past the end of RAM
    assert driver.status & STATUS_NEEDS_RESET
    driver.driver_ok()
    assert device.activations == []  # a failed device is not activated
    bring_up(driver, features=0)
    assert not driver.status & STATUS_NEEDS_RESET
    device.fail("device found garbage")
    assert driver.status & STATUS_NEEDS_RESET


def test_device_errors_escaping_notify_become_needs_reset(env):
    driver, transport, device, *_ = env
    bring_up(driver, features=0)

    def broken(index):
        raise VirtQueueError("boom")

    device.queue_notify = broken
    driver.kick(TX, force=True)
    assert driver.status & STATUS_NEEDS_RESET


def test_odd_register_accesses_are_harmless(env):
    driver, transport, device, *_ = env
    bring_up(driver, features=0)
    for offset in range(0, 0x100):
        for size in (1, 2, 4):
            if offset + size > 0x100:
                continue
            if offset not in (18, 19):  # status / ISR have side effects checked elsewhere
                driver.io_read(offset, size)
            if offset >= 20 or (offset, size) in ((12, 2), (0, 4)):
                driver.io_write(offset, size, 0xFFFFFFFF & ((1 << (8 * size)) - 1))
    assert driver.io_read(REG_HOST_FEATURES, 4) != 0
    assert not driver.status & STATUS_NEEDS_RESET


def test_pfn_write_ignored_while_live(env):
    driver, transport, device, *_ = env
    rx, tx = bring_up(driver, features=0)
    driver.io_write(REG_QUEUE_SEL, 2, TX)
    driver.io_write(REG_QUEUE_PFN, 4, 0)
    assert driver.io_read(REG_QUEUE_PFN, 4) == tx.pfn and transport.queues[TX].ready


def test_reset_racing_io_thread_notifies(env):
    """vCPU resets/re-initialises while the I/O thread kicks: no deadlock, no errors."""
    driver, transport, device, intx, msi = env
    bring_up(driver, features=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def io_thread():
        try:
            while not stop.is_set():
                transport.queue_notify(TX)
                transport.queue_notify(RX)
                transport.signal_queue(RX)
                transport.intx_resample()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=io_thread, daemon=True)
    worker.start()
    try:
        for _ in range(30):
            rx, tx = bring_up(driver, features=0)
            rx.add(writable=[4])
            tx.add(readable=[b"r"])
            driver.kick(RX)
            driver.kick(TX)
            driver.read_isr()
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not worker.is_alive(), "I/O thread deadlocked"
    assert errors == []
    assert not driver.status & STATUS_NEEDS_RESET
    assert len(device.activations) == 31


def test_driver_seen_survives_a_reset(env):
    """The VMM's "no driver in this kernel?" hint asks whether a driver ever set DRIVER_OK."""
    driver, transport, _device, _intx, _msi = env
    assert not transport.driver_seen
    bring_up(driver)
    driver.reset()
    assert transport.driver_seen and not transport.activated
