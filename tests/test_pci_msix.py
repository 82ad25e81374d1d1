"""MSI-X capability: config layout, table/PBA, masking and pending delivery."""

from __future__ import annotations

import pytest

from microvmm.pci.bus import PciBus
from microvmm.pci.config import InterruptPin, PciFunction, PciIds
from microvmm.pci.msix import MsixCapability
from microvmm.testing.fakes.virtio_driver import ConfigMechanism1, FakeMsiController

SLOT = 6
NVEC = 3


@pytest.fixture
def setup():
    bus = PciBus()
    function = PciFunction(PciIds(0x1AF4, 0x1003, 0x078000, interrupt_pin=InterruptPin.INTA))
    controller = FakeMsiController()
    msix = MsixCapability(function, NVEC, bar_index=1, controller=controller)
    bus.add_device(function, SLOT)
    cfg = ConfigMechanism1(bus)
    cfg.write(SLOT, 0, 0x04, 2, 0x6)  # memory + bus master
    return bus, function, msix, controller, cfg


def cap_offset(cfg):
    assert cfg.read(SLOT, 0, 0x06, 2) & 0x10  # capability list present
    pointer = cfg.read(SLOT, 0, 0x34, 1)
    assert cfg.read(SLOT, 0, pointer, 1) == 0x11
    return pointer


def table(function, vector):
    return function.bar_address(1) + 16 * vector


def program(bus, function, vector, address, data, masked):
    base = table(function, vector)
    bus.mmio_write(base, 4, address & 0xFFFFFFFF)
    bus.mmio_write(base + 4, 4, address >> 32)
    bus.mmio_write(base + 8, 4, data)
    bus.mmio_write(base + 12, 4, int(masked))


def control(cfg, enable, function_mask):
    cap = cap_offset(cfg)
    cfg.write(SLOT, 0, cap + 2, 2, (0x8000 if enable else 0) | (0x4000 if function_mask else 0))


def pba(bus, function, msix):
    return bus.mmio_read(function.bar_address(1) + msix.pba_offset, 8)


def test_capability_layout(setup):
    bus, function, msix, _, cfg = setup
    cap = cap_offset(cfg)
    assert cfg.read(SLOT, 0, cap + 2, 2) == NVEC - 1  # table size N-1, disabled
    assert cfg.read(SLOT, 0, cap + 4, 4) == 0x0 | 1  # table at offset 0 of BAR1
    pba_reg = cfg.read(SLOT, 0, cap + 8, 4)
    assert pba_reg & 7 == 1 and pba_reg & ~7 == msix.pba_offset
    # Table size bits are read-only; only enable/function-mask are writable.
    cfg.write(SLOT, 0, cap + 2, 2, 0xFFFF)
    assert cfg.read(SLOT, 0, cap + 2, 2) == 0xC000 | (NVEC - 1)
    cfg.write(SLOT, 0, cap + 4, 4, 0xFFFFFFFF)
    assert cfg.read(SLOT, 0, cap + 4, 4) == 1
    # Table entries start masked.
    for vector in range(NVEC):
        assert bus.mmio_read(table(function, vector) + 12, 4) == 1


def test_program_vector_on_every_change(setup):
    bus, function, msix, controller, cfg = setup
    control(cfg, enable=True, function_mask=False)
    controller.program_calls.clear()
    program(bus, function, 1, 0x1_FEE0_1000, 0x4041, masked=False)
    assert controller.vectors[1].address == 0x1_FEE0_1000
    assert controller.vectors[1].data == 0x4041
    assert controller.vectors[1].masked is False
    assert all(call[0] == 1 for call in controller.program_calls)
    assert bus.mmio_read(table(function, 1), 8) == 0x1_FEE0_1000
    assert bus.mmio_read(table(function, 1) + 8, 4) == 0x4041
    # Function mask reports every vector masked; clearing it unmasks again.
    control(cfg, enable=True, function_mask=True)
    assert all(controller.vectors[v].masked for v in range(NVEC))
    control(cfg, enable=True, function_mask=False)
    assert controller.vectors[1].masked is False and controller.vectors[0].masked is True
    # A 64-bit write of address updates both halves.
    bus.mmio_write(table(function, 2), 8, 0xFEE0_2000)
    assert controller.vectors[2].address == 0xFEE0_2000


def test_trigger_masked_sets_pending_then_delivers(setup):
    bus, function, msix, controller, cfg = setup
    control(cfg, enable=True, function_mask=False)
    program(bus, function, 0, 0xFEE00000, 0x30, masked=True)
    program(bus, function, 2, 0xFEE00000, 0x32, masked=False)
    msix.trigger(2)
    assert controller.triggered == [2]
    msix.trigger(0)
    assert controller.triggered == [2]
    assert pba(bus, function, msix) == 0b001
    bus.mmio_write(table(function, 0) + 12, 4, 0)  # unmask vector 0
    assert controller.triggered == [2, 0]
    assert pba(bus, function, msix) == 0
    # Function mask: pending while set, delivered when cleared.
    control(cfg, enable=True, function_mask=True)
    msix.trigger(2)
    msix.trigger(2)
    assert controller.triggered == [2, 0] and pba(bus, function, msix) == 0b100
    control(cfg, enable=True, function_mask=False)
    assert controller.triggered == [2, 0, 2]  # pending is one bit: delivered once
    assert pba(bus, function, msix) == 0


def test_disabled_msix_holds_pending(setup):
    bus, function, msix, controller, cfg = setup
    program(bus, function, 1, 0xFEE00000, 0x31, masked=False)
    msix.trigger(1)
    assert controller.triggered == [] and msix.pending[1]
    control(cfg, enable=True, function_mask=False)
    assert controller.triggered == [1]


def test_out_of_range_and_odd_accesses_are_harmless(setup):
    bus, function, msix, controller, cfg = setup
    base = function.bar_address(1)
    control(cfg, enable=True, function_mask=False)
    before = bytes(msix.table)
    for offset, size in ((16 * NVEC, 4), (16 * NVEC - 4, 8), (2, 4), (1, 1), (3, 2), (0xFFC, 4),
                         (msix.pba_offset, 8)):
        if offset != msix.pba_offset:
            assert bus.mmio_read(base + offset, size) == 0
        bus.mmio_write(base + offset, size, 0xFFFFFFFF)
    assert bytes(msix.table) == before
    assert pba(bus, function, msix) == 0
    msix.trigger(NVEC)  # absent vector
    msix.trigger(-1)
    assert controller.triggered == []
