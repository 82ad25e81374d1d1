"""The device manager against a fake VM: slot planning, the one GSI router,
the ioeventfd registry keyed by (device, queue), BAR-change dispatch. The
point of each: a second device never takes the first one's interrupts or
queue kicks away."""

from __future__ import annotations

import os

import pytest

from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
from microvmm.devmgr.ioeventfds import IoEventFdRegistry
from microvmm.devmgr.manager import DeviceManager
from microvmm.devmgr.plan import INTX_GSIS, MAX_DEVICES, DevicePlanError, plan_functions
from microvmm.devmgr.registry import DeviceRequest, parse_device_option
from microvmm.interrupts import IOAPIC_PINS
from microvmm.kvm import MsiRoute
from microvmm.memory import GuestMemory
from microvmm.pci.bus import DEFAULT_INTX_GSIS
from microvmm.virtio.pci_legacy import IoEventFdSpec
from microvmm.testing.fakes.virtio_driver import FakeLegacyPciDriver, GuestAllocator

RAM = 4 << 20
NOTIFY = 16  # LegacyReg.QUEUE_NOTIFY


class FakeVm:
    """Records routing tables, irqfds and ioeventfds like KVM would hold them."""

    def __init__(self) -> None:
        self.tables: list[list] = []
        self.irqfds: dict[int, int] = {}  # fd -> gsi
        self.ioeventfds: dict[tuple[int, int], int] = {}  # (port, datamatch) -> fd

    def set_gsi_routing(self, routes) -> None:
        self.tables.append(list(routes))

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        assert fd not in self.irqfds
        self.irqfds[fd] = gsi

    def irqfd_remove(self, fd: int, gsi: int) -> None:
        assert self.irqfds.pop(fd) == gsi

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=True) -> None:
        assert (addr, datamatch) not in self.ioeventfds, "KVM refuses a second identical ioeventfd"
        self.ioeventfds[(addr, datamatch)] = fd

    def ioeventfd_remove(self, fd, addr, length, datamatch=None, pio=True) -> None:
        assert self.ioeventfds.pop((addr, datamatch)) == fd


class FakeLoop:
    def __init__(self) -> None:
        self.readers: dict[int, object] = {}

    def add_reader(self, fd, callback) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd) -> bool:
        return self.readers.pop(fd, None) is not None

    def call_soon_threadsafe(self, callback) -> None:
        callback()

    def in_loop_thread(self) -> bool:
        return True


def requests(*texts: str) -> list[DeviceRequest]:
    return [parse_device_option(text) for text in texts]


# ---- planning ----------------------------------------------------------------


def test_the_plan_gives_each_device_a_slot_an_intx_gsi_and_a_name():
    plan = plan_functions([DeviceRequest("virtio-console", [])] + requests("virtio-rng", "virtio-console,pty:x"))
    assert [(f.name, f.slot, f.pin, f.gsi) for f in plan] == [
        ("virtio-console0", 1, 1, 16), ("virtio-rng0", 2, 1, 17), ("virtio-console1", 3, 1, 18)]
    # The plan's GSIs are those the bus hands out, in the same order.
    assert INTX_GSIS == DEFAULT_INTX_GSIS


def test_the_plan_refuses_more_devices_than_intx_lines():
    with pytest.raises(DevicePlanError, match=f"at most {MAX_DEVICES}"):
        plan_functions(requests(*["virtio-rng"] * (MAX_DEVICES + 1)))


# ---- the ioeventfd registry ---------------------------------------------------


def test_syncing_one_device_leaves_the_other_devices_ioeventfds_alone():
    vm, loop = FakeVm(), FakeLoop()
    registry = IoEventFdRegistry(vm, loop)
    kicks: list[tuple[str, int]] = []
    specs_a = [IoEventFdSpec(0xC000 + NOTIFY, 2, q, q) for q in range(2)]
    specs_b = [IoEventFdSpec(0xC100 + NOTIFY, 2, q, q) for q in range(2)]
    registry.sync("a", specs_a, lambda q: kicks.append(("a", q)))
    registry.sync("b", specs_b, lambda q: kicks.append(("b", q)))
    fds_a = dict(vm.ioeventfds)
    assert len(vm.ioeventfds) == 4
    # b's BAR moves: only b's ioeventfds follow it.
    moved = [IoEventFdSpec(0xC200 + NOTIFY, 2, q, q) for q in range(2)]
    registry.sync("b", moved, lambda q: kicks.append(("b", q)))
    assert {k: v for k, v in vm.ioeventfds.items() if k[0] == 0xC000 + NOTIFY} == \
        {k: v for k, v in fds_a.items() if k[0] == 0xC000 + NOTIFY}
    assert registry.registered("b") == {0: (0xC200 + NOTIFY, 0), 1: (0xC200 + NOTIFY, 1)}
    # A guest write to each notify address reaches its own device and queue.
    for (port, queue), fd in vm.ioeventfds.items():
        os.eventfd_write(fd, 1)
        loop.readers[fd]()
    assert sorted(kicks) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    # b's decode off: its ioeventfds go, a's stay.
    registry.sync("b", [], lambda q: None)
    assert registry.registered("b") == {} and len(registry.registered("a")) == 2
    registry.close()
    assert vm.ioeventfds == {} and loop.readers == {}


# ---- the manager: two devices on one bus ------------------------------------------


@pytest.fixture
def two_devices():
    vm, loop = FakeVm(), FakeLoop()
    memory = GuestMemory([(0, RAM)])
    io_bus, mmio_bus = Bus("pio", address_limit=PIO_ADDRESS_LIMIT), Bus("mmio", unclaimed_granule=0x1000)
    closers: list = []
    manager = DeviceManager(plan_functions(requests("virtio-rng", "virtio-rng,max-bytes=64")))
    manager.build(vm, memory, loop, io_bus, mmio_bus, closers, queue_size=16)
    allocator = GuestAllocator(memory, 0x10000, RAM)
    drivers = []
    for running in manager:
        driver = FakeLegacyPciDriver(manager.pci, memory, allocator, device_id=0x1005,
                                     transport=running.transport)
        driver.slot = running.slot
        drivers.append(driver)
    yield manager, vm, loop, drivers, closers
    for close in reversed(closers):
        close()


def test_the_bus_assigns_what_the_mp_table_says(two_devices):
    manager, *_ = two_devices
    assert [(d.name, d.slot) for d in manager] == [("virtio-rng0", 1), ("virtio-rng1", 2)]
    assert [(i.device, i.pin, i.ioapic_pin) for i in manager.mp_table_irqs()] == [(1, 1, 16), (2, 1, 17)]
    assert [d.intx.gsi for d in manager] == [16, 17]
    assert manager.get("virtio-rng1").transport is manager.pci.function_at(2)
    assert [d.name for d in manager.of_kind("virtio-rng")] == ["virtio-rng0", "virtio-rng1"]


def test_enabling_and_moving_the_second_device_keeps_the_first_ones_queue_kicks(two_devices):
    manager, vm, loop, (first, second), _ = two_devices
    first.enable()
    before = dict(vm.ioeventfds)
    assert manager.ioeventfds.registered("virtio-rng0") == {0: (first.io_base + NOTIFY, 0)}
    second.enable()
    assert manager.ioeventfds.registered("virtio-rng1") == {0: (second.io_base + NOTIFY, 0)}
    # The guest moves the second device's BAR0: its kick follows, the first's stays.
    second.config_write(0x10, 4, 0xD000)
    second.io_base = 0xD000
    assert manager.ioeventfds.registered("virtio-rng1") == {0: (0xD000 + NOTIFY, 0)}
    assert vm.ioeventfds[(first.io_base + NOTIFY, 0)] == before[(first.io_base + NOTIFY, 0)]
    assert len(vm.ioeventfds) == 2


def test_msix_routes_of_both_devices_live_in_the_one_routing_table(two_devices):
    manager, vm, loop, (first, second), _ = two_devices
    for driver in (first, second):
        driver.enable()
        driver.negotiate(0)
        driver.enable_msix(2)
    table = vm.tables[-1]
    msi = [r for r in table if isinstance(r, MsiRoute)]
    # Two vectors of each device, each on its own GSI above the IOAPIC's pins,
    # and the last table (written for the second device) still has the first's.
    assert len(msi) == 4 and len({r.gsi for r in msi}) == 4
    assert all(r.gsi >= IOAPIC_PINS for r in msi)
    gsis_first = set(manager.get("virtio-rng0").msi._gsis)
    gsis_second = set(manager.get("virtio-rng1").msi._gsis)
    assert gsis_first.isdisjoint(gsis_second)
    assert gsis_first | gsis_second == {r.gsi for r in msi}
    # Every wired irqfd points at a GSI the table routes.
    assert set(vm.irqfds.values()) - set(INTX_GSIS) <= {r.gsi for r in msi}


def test_teardown_removes_every_ioeventfd_and_irqfd(two_devices):
    manager, vm, loop, drivers, closers = two_devices
    for driver in drivers:
        driver.enable()
        driver.negotiate(0)
        driver.enable_msix(2)
    assert vm.ioeventfds and vm.irqfds
    for close in reversed(closers):
        close()
    closers.clear()
    assert vm.ioeventfds == {} and vm.irqfds == {} and loop.readers == {}
