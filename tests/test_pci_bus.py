"""PCI config mechanism #1, config-space semantics, BAR assignment/sizing/decode."""

from __future__ import annotations

import pytest

from microvmm.pci.bus import IO_BAR_WINDOW, MMIO_BAR_WINDOW, PciBus, PciBusError
from microvmm.pci.config import BarKind, InterruptPin, PciFunction, PciIds, Status
from microvmm.testing.fakes.virtio_driver import ConfigMechanism1


class Recorder:
    """BAR register handler that records accesses and returns offset-derived values."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return 0xA0 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class TestFunction(PciFunction):
    __test__ = False

    def __init__(self, io_size=0x40, mem_size=0x1000, pin=InterruptPin.INTA):
        super().__init__(PciIds(vendor_id=0x1234, device_id=0x5678, class_code=0x078000,
                                revision=3, subsystem_vendor_id=0xAAAA, subsystem_id=0xBBBB,
                                interrupt_pin=pin))
        self.io = Recorder()
        self.mem = Recorder()
        if io_size:
            self.add_bar(0, BarKind.IO, io_size, self.io)
        if mem_size:
            self.add_bar(1, BarKind.MEMORY32, mem_size, self.mem)


@pytest.fixture
def bus():
    return PciBus()


def test_host_bridge(bus):
    cfg = ConfigMechanism1(bus)
    assert cfg.read(0, 0, 0, 2) == 0x8086
    assert cfg.read(0, 0, 0x08, 4) >> 8 == 0x060000
    assert cfg.read(0, 0, 0x0E, 1) == 0  # header type 0, single function
    assert bus.pci_irq_assignments() == []


def test_config_address_latch_linux_type1_probe(bus):
    # pci_check_type1: outb(0x01, 0xCFB); tmp = inl(0xCF8); outl(0x80000000, 0xCF8); inl == 0x80000000
    bus.write(3, 1, 0x01)
    assert bus.read(0, 4) == 0
    bus.write(0, 4, 0x80000000)
    assert bus.read(0, 4) == 0x80000000
    # Narrow accesses do not touch CONFIG_ADDRESS.
    bus.write(0, 2, 0x1234)
    bus.write(2, 1, 0x56)
    assert bus.read(0, 4) == 0x80000000
    assert bus.read(0, 2) == 0xFFFF and bus.read(1, 1) == 0xFF
    # Register low bits and reserved bits 30:24 are not latched.
    bus.write(0, 4, 0xFFFFFFFF)
    assert bus.read(0, 4) == 0x80FFFFFC


def test_data_window_every_size_and_offset(bus):
    function = TestFunction()
    bus.add_device(function, 3)
    cfg = ConfigMechanism1(bus)
    raw = bytes(function.config)
    for offset in range(0, 64):
        for size in (1, 2, 4):
            if (offset & 3) + size > 4:
                continue
            expected = int.from_bytes(raw[offset:offset + size], "little")
            assert cfg.read(3, 0, offset, size) == expected, (offset, size)
    assert cfg.read(3, 0, 0, 4) == 0x56781234
    assert cfg.read(3, 0, 2, 2) == 0x5678
    assert cfg.read(3, 0, 0x0B, 1) == 0x07
    assert cfg.read(3, 0, 0x2C, 4) == 0xBBBBAAAA


def test_absent_functions_and_disabled_window_read_all_ones(bus):
    cfg = ConfigMechanism1(bus)
    for size, ones in ((1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)):
        assert cfg.read(7, 0, 0, size) == ones
        assert cfg.read(0, 1, 0, size) == ones  # function 1 of the bridge
    bus.write(0, 4, 0x80010000)  # bus 1
    assert bus.read(4, 4) == 0xFFFFFFFF
    bus.write(0, 4, 0x00000000)  # enable bit clear
    assert bus.read(4, 2) == 0xFFFF
    bus.write(0, 4, 0x80000000)
    assert bus.read(7, 2) == 0xFFFF  # word access crossing the dword
    bus.write(4, 4, 0)  # writes to nowhere are harmless
    cfg.write(9, 0, 0x04, 2, 0xFFFF)


def test_readonly_writable_and_w1c(bus):
    function = TestFunction()
    bus.add_device(function, 2)
    cfg = ConfigMechanism1(bus)
    cfg.write(2, 0, 0x00, 4, 0xFFFFFFFF)
    assert cfg.read(2, 0, 0, 4) == 0x56781234
    cfg.write(2, 0, 0x3C, 1, 0x0B)
    assert cfg.read(2, 0, 0x3C, 4) & 0xFFFF == 0x010B  # line written, pin read-only
    cfg.write(2, 0, 0x3D, 1, 0x04)
    assert cfg.read(2, 0, 0x3D, 1) == 1
    # Status: error bits are write-1-to-clear, other bits unaffected.
    function.config[0x07] |= 0xF9  # pretend errors latched
    function.config[0x06] |= 0x10
    before = cfg.read(2, 0, 0x06, 2)
    cfg.write(2, 0, 0x06, 2, Status.RCV_MASTER_ABORT | Status.CAP_LIST)
    after = cfg.read(2, 0, 0x06, 2)
    assert after == before & ~Status.RCV_MASTER_ABORT
    # Command: only defined bits are writable.
    cfg.write(2, 0, 0x04, 2, 0xFFFF)
    assert cfg.read(2, 0, 0x04, 2) == 0x0547


def test_bar_preassignment(bus):
    first, second = TestFunction(io_size=0x100, mem_size=0x2000), TestFunction()
    bus.add_device(first, 1)
    bus.add_device(second, 2)
    ranges = []
    for function in (first, second):
        for bar in function.bars:
            if bar is None:
                continue
            base = function.bar_address(bar.index)
            window = IO_BAR_WINDOW if bar.kind is BarKind.IO else MMIO_BAR_WINDOW
            assert window[0] <= base and base + bar.size <= window[1]
            assert base % bar.size == 0
            ranges.append((bar.kind, base, base + bar.size))
    for i, (kind, start, end) in enumerate(ranges):
        for other_kind, other_start, other_end in ranges[i + 1:]:
            assert kind is not other_kind or end <= other_start or other_end <= start
    with pytest.raises(PciBusError):
        bus.add_device(TestFunction(), 1)


def test_bar_size_probing(bus):
    function = TestFunction(io_size=0x20, mem_size=0x4000)
    bus.add_device(function, 4)
    cfg = ConfigMechanism1(bus)
    io_orig = cfg.read(4, 0, 0x10, 4)
    mem_orig = cfg.read(4, 0, 0x14, 4)
    assert io_orig & 0x3 == 0x1 and mem_orig & 0xF == 0x0
    for offset, orig, expected in ((0x10, io_orig, 0xFFFFFFE1), (0x14, mem_orig, 0xFFFFC000)):
        cfg.write(4, 0, offset, 4, 0xFFFFFFFF)
        assert cfg.read(4, 0, offset, 4) == expected
        cfg.write(4, 0, offset, 4, orig)
        assert cfg.read(4, 0, offset, 4) == orig
    for offset in (0x18, 0x1C, 0x20, 0x24, 0x30):  # unimplemented BARs and ROM
        cfg.write(4, 0, offset, 4, 0xFFFFFFFF)
        assert cfg.read(4, 0, offset, 4) == 0


def test_command_bits_gate_decode_and_listener(bus):
    events = []
    bus.bar_listener = lambda f, index, old, new: events.append((index, old, new))
    function = TestFunction()
    bus.add_device(function, 5)
    cfg = ConfigMechanism1(bus)
    io_base = function.bar_address(0)
    mem_base = function.bar_address(1)
    assert bus.io_read(io_base, 1) is None and not bus.io_write(io_base, 1, 0)
    assert bus.mmio_read(mem_base, 4) is None
    cfg.write(5, 0, 0x04, 2, 0x1)  # I/O only
    assert events == [(0, None, io_base)]
    assert bus.io_read(io_base + 5, 2) == 0xA5 and function.io.reads[-1] == (5, 2)
    assert bus.io_write(io_base + 1, 1, 0x42) and function.io.writes[-1] == (1, 1, 0x42)
    assert bus.io_read(io_base + 0x40, 1) is None  # one past the BAR
    assert bus.mmio_read(mem_base, 4) is None
    cfg.write(5, 0, 0x04, 2, 0x3)
    assert events[-1] == (1, None, mem_base)
    assert bus.mmio_read(mem_base + 8, 4) == 0xA8
    assert bus.mmio_write(mem_base + 0xFFC, 4, 7) and function.mem.writes[-1] == (0xFFC, 4, 7)
    # Moving the memory BAR moves decode.
    new_mem = mem_base + 0x10000
    cfg.write(5, 0, 0x14, 4, new_mem)
    assert events[-1] == (1, mem_base, new_mem)
    assert bus.mmio_read(mem_base, 4) is None and bus.mmio_read(new_mem, 4) == 0xA0
    # Size probing with decode on (Linux turns it off first, but the guest may not).
    cfg.write(5, 0, 0x04, 2, 0x0)
    assert events[-2:] == [(0, io_base, None), (1, new_mem, None)]
    assert bus.io_read(io_base, 1) is None and bus.mmio_read(new_mem, 4) is None


def test_irq_assignments_go_to_interrupt_line(bus):
    functions = [TestFunction() for _ in range(3)]
    bridge_like = TestFunction(pin=InterruptPin.NONE)
    for slot, function in enumerate(functions, start=1):
        bus.add_device(function, slot)
    bus.add_device(bridge_like, 8)
    assignments = bus.pci_irq_assignments()
    assert [(a.slot, a.pin) for a in assignments] == [(1, InterruptPin.INTA), (2, InterruptPin.INTA),
                                                        (3, InterruptPin.INTA)]
    gsis = [a.gsi for a in assignments]
    assert len(set(gsis)) == 3 and not set(gsis) & {0, 1, 2, 4, 8}
    cfg = ConfigMechanism1(bus)
    for assignment in assignments:
        assert cfg.read(assignment.slot, 0, 0x3C, 1) == assignment.gsi
        assert assignment.device is functions[assignment.slot - 1]
    assert bridge_like.interrupt_line == 0


def test_gsi_exhaustion_is_reported():
    bus = PciBus(intx_gsis=(5,))
    bus.add_device(TestFunction(), 1)
    with pytest.raises(PciBusError, match="GSI"):
        bus.add_device(TestFunction(), 2)
