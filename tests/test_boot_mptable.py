"""MP table: found, checksummed and parsed the way Linux's mpparse reads it."""

from __future__ import annotations

import struct

import pytest

from microvmm.boot.errors import MpTableError
from microvmm.boot.mptable import PciIrq, write_mptable
from microvmm.memory import GuestMemory

MiB = 1 << 20
ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def find_and_parse(mem: GuestMemory) -> dict:
    """Scan the BIOS area for the floating pointer as Linux does; parse and verify it."""
    for addr in range(0xF0000, 0x100000, 16):
        if mem.read(addr, 4) == b"_MP_":
            break
    else:
        raise AssertionError("no _MP_ floating pointer in 0xF0000-0xFFFFF")
    floating = mem.read(addr, 16)
    assert sum(floating) % 256 == 0, "floating pointer checksum"
    physptr, length, spec, _csum, f1, f2 = struct.unpack_from("<IBBBB B", floating, 4)[:6]
    assert length == 1 and spec == 4 and f1 == 0 and f2 & 0x80 == 0
    header = mem.read(physptr, 44)
    assert header[:4] == b"PCMP"
    base_len, spec_rev = struct.unpack_from("<HB", header, 4)
    count, lapic = struct.unpack_from("<HI", header, 34)
    table = mem.read(physptr, base_len)
    assert sum(table) % 256 == 0, "config table checksum"
    assert spec_rev == 4
    entries = []
    offset = 44
    for _ in range(count):
        kind = table[offset]
        size = ENTRY_SIZES[kind]
        entries.append((kind, table[offset:offset + size]))
        offset += size
    assert offset == base_len, "entry count and base table length disagree"
    kinds = [k for k, _ in entries]
    assert kinds == sorted(kinds), "entries must be in ascending type order"
    result = {"addr": addr, "lapic": lapic, "oem": header[8:16], "cpus": [], "buses": {},
              "ioapics": [], "ioints": [], "lints": []}
    for kind, raw in entries:
        if kind == 0:
            _, apic_id, ver, flags, sig, feat = struct.unpack_from("<BBBBII", raw)
            result["cpus"].append((apic_id, ver, flags, sig, feat))
        elif kind == 1:
            result["buses"][raw[1]] = raw[2:8]
        elif kind == 2:
            _, ioapic_id, ver, flags, ioaddr = struct.unpack("<BBBBI", raw)
            result["ioapics"].append((ioapic_id, ver, flags, ioaddr))
        elif kind == 3:
            result["ioints"].append(struct.unpack("<BBHBBBB", raw)[1:])
        else:
            result["lints"].append(struct.unpack("<BBHBBBB", raw)[1:])
    return result


@pytest.fixture
def mem():
    memory = GuestMemory([(0, 16 * MiB)])
    yield memory
    memory.close()


def test_single_cpu_no_pci(mem):
    addr = write_mptable(mem, 1)
    table = find_and_parse(mem)
    assert table["addr"] == addr == 0xF0000
    assert table["lapic"] == 0xFEE00000
    assert table["cpus"] == [(0, 0x14, 0b11, 0x600, 0x201)]  # enabled + BSP
    assert table["buses"] == {0: b"PCI   ", 1: b"ISA   "}
    assert table["ioapics"] == [(1, 0x11, 1, 0xFEC00000)]
    # ISA IRQ n -> IOAPIC pin n, conforming polarity/trigger
    assert table["ioints"] == [(0, 0, 1, irq, 1, irq) for irq in range(16)]
    assert table["lints"] == [(3, 0, 1, 0, 0xFF, 0), (1, 0, 1, 0, 0xFF, 1)]


def test_several_cpus_and_pci_devices(mem):
    irqs = [PciIrq(device=1, pin=1, ioapic_pin=16), PciIrq(device=2, pin=1, ioapic_pin=17),
            PciIrq(device=3, pin=4, ioapic_pin=18)]
    write_mptable(mem, 3, irqs, cpu_signature=0x830F10, cpu_features=0x178BFBFF)
    table = find_and_parse(mem)
    assert [c[0] for c in table["cpus"]] == [0, 1, 2]
    assert [c[2] for c in table["cpus"]] == [3, 1, 1]  # only CPU 0 is the BSP
    assert all(c[3:] == (0x830F10, 0x178BFBFF) for c in table["cpus"])
    ioapic_id = table["ioapics"][0][0]
    assert ioapic_id == 3  # after the CPUs' APIC ids
    pci = [e for e in table["ioints"] if e[2] == 0]
    # (type INT, flags level|active-low, bus 0, (dev << 2)|(pin-1), ioapic, pin)
    assert pci == [(0, 0x0F, 0, (1 << 2) | 0, 3, 16), (0, 0x0F, 0, (2 << 2) | 0, 3, 17),
                   (0, 0x0F, 0, (3 << 2) | 3, 3, 18)]
    assert len([e for e in table["ioints"] if e[2] == 1]) == 16


@pytest.mark.parametrize("irq,pattern", [
    (PciIrq(device=32, pin=1, ioapic_pin=16), r"slot number"),
    (PciIrq(device=1, pin=0, ioapic_pin=16), r"pin 0 is not 1..4"),
    (PciIrq(device=1, pin=5, ioapic_pin=16), r"pin 5 is not 1..4"),
    (PciIrq(device=1, pin=1, ioapic_pin=4), r"IOAPIC pin 4 must be 16..23"),
    (PciIrq(device=1, pin=1, ioapic_pin=24), r"IOAPIC pin 24 must be 16..23"),
])
def test_invalid_pci_irq_rejected(mem, irq, pattern):
    with pytest.raises(MpTableError, match=pattern):
        write_mptable(mem, 1, [irq])


def test_invalid_cpu_count_rejected(mem):
    with pytest.raises(MpTableError, match=r"0 CPUs"):
        write_mptable(mem, 0)
    with pytest.raises(MpTableError, match=r"255 CPUs"):
        write_mptable(mem, 255)


def test_many_cpus_fit_and_checksum(mem):
    write_mptable(mem, 254)
    table = find_and_parse(mem)
    assert len(table["cpus"]) == 254
    assert table["ioapics"][0][0] == 254


def test_duck_typed_pci_lines_and_shared_pins(mem):
    class Line:  # e.g. a PCI layer's own assignment record
        def __init__(self, device, pin, ioapic_pin):
            self.device, self.pin, self.ioapic_pin = device, pin, ioapic_pin

    # two functions of device 4 share INTA -> one entry; device 5 INTB
    write_mptable(mem, 1, [Line(4, 1, 19), Line(4, 1, 19), Line(5, 2, 20)])
    pci = [e for e in find_and_parse(mem)["ioints"] if e[2] == 0]
    assert pci == [(0, 0x0F, 0, 4 << 2, 1, 19), (0, 0x0F, 0, (5 << 2) | 1, 1, 20)]
    with pytest.raises(MpTableError, match=r"wired to two IOAPIC pins \(19 and 21\)"):
        write_mptable(mem, 1, [Line(4, 1, 19), Line(4, 1, 21)])
