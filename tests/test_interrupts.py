"""KVM-backed interrupt sinks (GSI routing, MSI-X and INTx through irqfds)
against a fake VM that records every call, plus one run against real KVM."""

from __future__ import annotations

import os

import pytest

from microvmm.interrupts import (
    IOAPIC_PINS,
    GsiRouter,
    KvmIntxLine,
    KvmMsiController,
    default_irqchip_routes,
)
from microvmm.kvm import Irqchip, IrqchipRoute, Kvm, KvmUnavailableError, MsiRoute

MSI_ADDRESS = 0xFEE00000


class FakeVm:
    """Records the routing tables and irqfd calls the sinks make."""

    def __init__(self) -> None:
        self.tables: list[list] = []
        self.irqfds: list[tuple[int, int, int | None]] = []
        self.removed: list[tuple[int, int]] = []

    def set_gsi_routing(self, routes) -> None:
        self.tables.append(list(routes))

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        self.irqfds.append((fd, gsi, resample_fd))

    def irqfd_remove(self, fd: int, gsi: int) -> None:
        self.removed.append((fd, gsi))


class FakeLoop:
    def __init__(self) -> None:
        self.readers: dict[int, object] = {}

    def add_reader(self, fd, callback) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd) -> bool:
        return self.readers.pop(fd, None) is not None


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def pending(fd: int) -> int:
    """The eventfd's counter (0 when nothing was written), consuming it."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


EXPECTED_DEFAULTS = (
    [IrqchipRoute(g, Irqchip.PIC_MASTER, g) for g in range(8)]
    + [IrqchipRoute(g, Irqchip.PIC_SLAVE, g - 8) for g in range(8, 16)]
    + [IrqchipRoute(g, Irqchip.IOAPIC, g) for g in range(24)]
)


def test_default_irqchip_routes_restate_kvms_defaults():
    routes = default_irqchip_routes()
    assert sorted(routes) == sorted(EXPECTED_DEFAULTS)
    assert len(routes) == 16 + 24
    assert IOAPIC_PINS == 24


def assert_defaults_kept(table) -> None:
    irqchip = [r for r in table if isinstance(r, IrqchipRoute)]
    assert sorted(irqchip) == sorted(EXPECTED_DEFAULTS)


def test_router_allocates_gsis_above_the_ioapic_pins():
    router = GsiRouter(FakeVm())
    gsis = [router.allocate() for _ in range(5)]
    assert gsis == [24, 25, 26, 27, 28]


def test_every_routing_table_keeps_the_irqchip_defaults_and_all_msi_routes():
    vm = FakeVm()
    router = GsiRouter(vm)
    router.set_msi(24, MSI_ADDRESS, 0x31)
    router.set_msi(25, MSI_ADDRESS | 0x1000, 0x32)
    router.set_msi(24, MSI_ADDRESS, 0x41)          # re-programmed
    assert len(vm.tables) == 3
    for table in vm.tables:
        assert_defaults_kept(table)
    msi = [r for r in vm.tables[-1] if isinstance(r, MsiRoute)]
    assert sorted(msi) == [MsiRoute(24, MSI_ADDRESS, 0, 0x41), MsiRoute(25, MSI_ADDRESS | 0x1000, 0, 0x32)]
    assert [r for r in vm.tables[0] if isinstance(r, MsiRoute)] == [MsiRoute(24, MSI_ADDRESS, 0, 0x31)]


def test_msi_route_update_only_when_address_or_data_change():
    vm = FakeVm()
    router = GsiRouter(vm)
    router.set_msi(24, MSI_ADDRESS, 0x31)
    router.set_msi(24, MSI_ADDRESS, 0x31)
    router.set_msi(24, MSI_ADDRESS, 0x31)
    assert len(vm.tables) == 1
    router.set_msi(24, MSI_ADDRESS | 0x2000, 0x31)   # new destination
    assert len(vm.tables) == 2
    router.set_msi(24, MSI_ADDRESS | 0x2000, 0x32)   # new vector
    assert len(vm.tables) == 3


def test_64_bit_msi_address_is_split():
    vm = FakeVm()
    GsiRouter(vm).set_msi(30, 0x0000_0012_FEE0_1000, 7)
    (route,) = [r for r in vm.tables[0] if isinstance(r, MsiRoute)]
    assert route == MsiRoute(30, address_lo=0xFEE01000, address_hi=0x12, data=7)


def test_msi_controller_programs_routes_and_irqfds_once_per_vector():
    vm = FakeVm()
    router = GsiRouter(vm)
    msi = KvmMsiController(vm, router, num_vectors=3)
    try:
        assert vm.tables == [] and vm.irqfds == []      # nothing until the guest programs
        msi.program_vector(1, MSI_ADDRESS, 0x41, masked=False)
        assert len(vm.irqfds) == 1
        fd1, gsi1, resample = vm.irqfds[0]
        assert resample is None and gsi1 >= IOAPIC_PINS
        assert MsiRoute(gsi1, MSI_ADDRESS, 0, 0x41) in vm.tables[-1]
        # Same message again: no new table, no second irqfd.
        msi.program_vector(1, MSI_ADDRESS, 0x41, masked=False)
        assert len(vm.tables) == 1 and len(vm.irqfds) == 1
        # New message: the route changes, the irqfd stays.
        msi.program_vector(1, MSI_ADDRESS, 0x42, masked=True)
        assert len(vm.tables) == 2 and len(vm.irqfds) == 1
        assert MsiRoute(gsi1, MSI_ADDRESS, 0, 0x42) in vm.tables[-1]
        msi.program_vector(0, MSI_ADDRESS, 0x40, masked=False)
        fd0, gsi0, _ = vm.irqfds[1]
        assert gsi0 != gsi1 and fd0 != fd1
        for table in vm.tables:
            assert_defaults_kept(table)
        # Triggering writes that vector's eventfd only.
        msi.trigger(1)
        msi.trigger(1)
        assert (pending(fd1), pending(fd0)) == (2, 0)
    finally:
        msi.close()


def test_unprogrammed_and_out_of_range_vectors_do_nothing():
    vm = FakeVm()
    msi = KvmMsiController(vm, GsiRouter(vm), num_vectors=2)
    try:
        msi.trigger(0)                                  # before programming: no write
        msi.program_vector(0, 0, 0x41, masked=False)    # address 0: never programmed
        msi.trigger(0)
        msi.program_vector(5, MSI_ADDRESS, 0x41, masked=False)
        msi.program_vector(-1, MSI_ADDRESS, 0x41, masked=False)
        msi.trigger(5)
        assert vm.tables == [] and vm.irqfds == []
        msi.program_vector(0, MSI_ADDRESS, 0x41, masked=False)
        fd0 = vm.irqfds[0][0]
        assert pending(fd0) == 0, "a trigger before programming reached the eventfd"
    finally:
        msi.close()


def test_msi_close_removes_irqfds_and_closes_every_fd():
    vm = FakeVm()
    msi = KvmMsiController(vm, GsiRouter(vm), num_vectors=3)
    msi.program_vector(0, MSI_ADDRESS, 0x40, masked=False)
    msi.program_vector(2, MSI_ADDRESS, 0x42, masked=False)
    wired = {(fd, gsi) for fd, gsi, _ in vm.irqfds}
    open_fds = list(msi._fds)  # includes vector 1's, never wired
    assert len(open_fds) == 3 and not any(is_closed(fd) for fd in open_fds)
    msi.close()
    assert set(vm.removed) == wired and len(vm.removed) == 2
    assert all(is_closed(fd) for fd in open_fds)


def test_intx_line_asserts_resamples_and_closes():
    vm = FakeVm()
    loop = FakeLoop()
    resampled = []
    line = KvmIntxLine(vm, 10, loop, on_resample=lambda: resampled.append(True))
    ((trigger, gsi, resample),) = vm.irqfds
    assert gsi == 10 and resample is not None and resample != trigger
    assert list(loop.readers) == [resample]

    line.assert_line()
    assert pending(trigger) == 1
    # KVM signals the resample eventfd on EOI: the device hears about it once.
    os.eventfd_write(resample, 1)
    loop.readers[resample]()
    assert resampled == [True]
    loop.readers[resample]()                # spurious wake-up: nothing to read
    assert resampled == [True]

    line.close()
    assert vm.removed == [(trigger, 10)]
    assert loop.readers == {}
    assert is_closed(trigger) and is_closed(resample)


# -- real KVM --------------------------------------------------------------------

@pytest.fixture
def real_vm():
    try:
        kvm = Kvm()
    except KvmUnavailableError as exc:
        pytest.skip(f"/dev/kvm not usable: {exc}")
    vm = kvm.create_vm()
    vm.create_irqchip()
    yield vm
    vm.close()
    kvm.close()


APIC_SVR, APIC_IRR = 0xF0, 0x200
APIC_SOFTWARE_ENABLE = 0x100


def irr_vectors(vcpu) -> set[int]:
    lapic = vcpu.get_lapic()
    vectors = set()
    for reg in range(8):
        word = int.from_bytes(lapic[APIC_IRR + reg * 16:APIC_IRR + reg * 16 + 4], "little")
        vectors |= {reg * 32 + bit for bit in range(32) if word >> bit & 1}
    return vectors


def wait_for_irr(vcpu, vector: int) -> set[int]:
    import time
    deadline = time.monotonic() + 2
    while True:
        vectors = irr_vectors(vcpu)
        if vector in vectors or time.monotonic() > deadline:
            return vectors
        time.sleep(0.005)


def test_msi_through_irqfd_reaches_the_lapic_of_real_kvm(real_vm):
    """The routing tables GsiRouter writes are accepted by KVM_SET_GSI_ROUTING,
    and a trigger arrives as the programmed vector; re-programming the data
    changes the vector that arrives (the table was really replaced)."""
    vcpu = real_vm.create_vcpu(0)
    lapic = bytearray(vcpu.get_lapic())
    svr = int.from_bytes(lapic[APIC_SVR:APIC_SVR + 4], "little") | APIC_SOFTWARE_ENABLE
    lapic[APIC_SVR:APIC_SVR + 4] = svr.to_bytes(4, "little")
    vcpu.set_lapic(bytes(lapic))

    router = GsiRouter(real_vm)
    msi = KvmMsiController(real_vm, router, num_vectors=2)
    loop = FakeLoop()
    line = KvmIntxLine(real_vm, 10, loop, on_resample=lambda: None)
    try:
        assert irr_vectors(vcpu) == set()
        msi.program_vector(0, MSI_ADDRESS, 0x31, masked=False)   # fixed, APIC ID 0
        msi.program_vector(1, MSI_ADDRESS, 0x52, masked=False)
        msi.trigger(0)
        assert wait_for_irr(vcpu, 0x31) == {0x31}
        msi.program_vector(0, MSI_ADDRESS, 0x43, masked=False)
        msi.trigger(0)
        assert wait_for_irr(vcpu, 0x43) == {0x31, 0x43}
        msi.trigger(1)
        assert wait_for_irr(vcpu, 0x52) == {0x31, 0x43, 0x52}
        line.assert_line()   # the IOAPIC pin is masked: accepted, nothing delivered
    finally:
        line.close()
        msi.close()
