"""Intel MultiProcessor Specification 1.4 table: how Linux finds CPUs and IRQ routing.

Without ACPI, Linux (CONFIG_X86_MPPARSE) scans 0xF0000-0xFFFFF for the MP
floating pointer ("_MP_"), which points to the configuration table ("PCMP").
The table lists the CPUs (local APIC ids), the buses, the IOAPIC and which
IOAPIC pin each ISA IRQ and each PCI INTx line is wired to.

Interrupt wiring matches KVM's in-kernel irqchip with its default GSI routing
(GSI n -> IOAPIC pin n, and to the PIC for n < 16): ISA IRQ n -> IOAPIC pin n,
as Firecracker does. The in-kernel PIT raises GSI 0, hence pin 0. A VMM that
installs its own routing table must keep GSI n -> pin n for n < 16.

PCI INTx entries are level-triggered, active-low as PCI defines. KVM's IOAPIC
ignores the polarity bit, so the VMM asserts a line with level 1 regardless.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass

from . import layout
from .errors import MpTableError

logger = logging.getLogger(__name__)

MP_FLOATING_SIGNATURE = b"_MP_"
MP_CONFIG_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4  # MP spec 1.4
OEM_ID = b"MICROVMM"
PRODUCT_ID = b"MICROVMM-PC "

LAPIC_VERSION = 0x14  # KVM's local APIC version
IOAPIC_VERSION = 0x11  # KVM's in-kernel IOAPIC version
IOAPIC_NUM_PINS = 24  # KVM_IOAPIC_NUM_PINS
ISA_IRQS = 16

PCI_BUS_ID = 0
ISA_BUS_ID = 1

# CPUID leaf 1 EAX / EDX defaults for processor entries: family 6, FPU + APIC.
DEFAULT_CPU_SIGNATURE = 0x600
DEFAULT_CPU_FEATURES = (1 << 0) | (1 << 9)

# Local APIC ids are 8-bit here and the IOAPIC takes id num_cpus; 0xFF means "all".
MAX_CPUS = 254

_FLOATING = struct.Struct("<4sIBBB5s")  # 16 bytes
_CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")  # 44 bytes
_PROCESSOR = struct.Struct("<BBBBII8x")  # 20 bytes
_BUS = struct.Struct("<BB6s")  # 8 bytes
_IOAPIC = struct.Struct("<BBBBI")  # 8 bytes
_INTERRUPT = struct.Struct("<BBHBBBB")  # 8 bytes (I/O and local interrupt entries)


class EntryType(enum.IntEnum):
    PROCESSOR = 0
    BUS = 1
    IOAPIC = 2
    IO_INTERRUPT = 3
    LOCAL_INTERRUPT = 4


class InterruptType(enum.IntEnum):
    INT = 0  # vectored interrupt, vector from the APIC redirection entry
    NMI = 1
    SMI = 2
    EXTINT = 3  # 8259-compatible external interrupt


class IrqFlag(enum.IntFlag):
    """Polarity (bits 1:0) and trigger mode (bits 3:2) of an interrupt entry; 0 = conforms."""

    ACTIVE_HIGH = 0b01
    ACTIVE_LOW = 0b11
    EDGE = 0b01 << 2
    LEVEL = 0b11 << 2


class CpuFlag(enum.IntFlag):
    ENABLED = 1 << 0
    BOOTSTRAP = 1 << 1


@dataclass(frozen=True)
class PciIrq:
    """One PCI INTx line: device (slot) on bus 0, pin 1..4 = INTA#..INTD#, wired to ioapic_pin.

    write_mptable reads only these three attributes, so any object having them will do.
    With KVM's default routing the IOAPIC pin equals the GSI the VMM raises.
    """

    device: int
    pin: int
    ioapic_pin: int

    @property
    def source_irq(self) -> int:
        return pci_source_irq(self.device, self.pin)


def pci_source_irq(device: int, pin: int) -> int:
    """MP spec encoding of a PCI interrupt source: device in bits 6:2, pin-1 (INTA#=0) in 1:0."""
    return (device << 2) | (pin - 1)


def _checksum(data: bytes) -> int:
    """The byte that makes `data` (with a zero checksum byte) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _validate(num_cpus: int, pci_irqs: list[PciIrq]) -> list[PciIrq]:
    """Check the request; return the PCI lines with duplicates folded.

    The MP table identifies a PCI source by (device, pin) only, so functions of
    one multi-function device that share a pin are one entry; they must then
    share the IOAPIC pin too.
    """
    if not 1 <= num_cpus <= MAX_CPUS:
        raise MpTableError(f"{num_cpus} CPUs: the MP table supports 1..{MAX_CPUS}")
    seen: dict[tuple[int, int], int] = {}
    unique = []
    for irq in pci_irqs:
        if not 0 <= irq.device < 32:
            raise MpTableError(f"PCI device {irq.device} is not a slot number 0..31")
        if not 1 <= irq.pin <= 4:
            raise MpTableError(f"PCI device {irq.device}: interrupt pin {irq.pin} is not "
                               f"1..4 (INTA#..INTD#)")
        if not ISA_IRQS <= irq.ioapic_pin < IOAPIC_NUM_PINS:
            raise MpTableError(
                f"PCI device {irq.device} INT{'ABCD'[irq.pin - 1]}#: IOAPIC pin {irq.ioapic_pin} "
                f"must be {ISA_IRQS}..{IOAPIC_NUM_PINS - 1} (pins 0..15 carry the ISA IRQs)")
        key = (irq.device, irq.pin)
        if key in seen:
            if seen[key] != irq.ioapic_pin:
                raise MpTableError(
                    f"PCI device {irq.device} pin {irq.pin} is wired to two IOAPIC pins "
                    f"({seen[key]} and {irq.ioapic_pin})")
            continue
        seen[key] = irq.ioapic_pin
        unique.append(irq)
    return unique


def build_mp_config_entries(num_cpus: int, pci_irqs: list[PciIrq],
                            cpu_signature: int = DEFAULT_CPU_SIGNATURE,
                            cpu_features: int = DEFAULT_CPU_FEATURES) -> list[bytes]:
    """The configuration table entries, in the ascending type order the spec requires."""
    ioapic_id = num_cpus
    entries: list[bytes] = []
    for apic_id in range(num_cpus):
        flags = CpuFlag.ENABLED | (CpuFlag.BOOTSTRAP if apic_id == 0 else 0)
        entries.append(_PROCESSOR.pack(EntryType.PROCESSOR, apic_id, LAPIC_VERSION, int(flags),
                                       cpu_signature & 0xFFFF_FFFF, cpu_features & 0xFFFF_FFFF))
    entries.append(_BUS.pack(EntryType.BUS, PCI_BUS_ID, b"PCI   "))
    entries.append(_BUS.pack(EntryType.BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(_IOAPIC.pack(EntryType.IOAPIC, ioapic_id, IOAPIC_VERSION, CpuFlag.ENABLED,
                                layout.IOAPIC_ADDR))
    for isa_irq in range(ISA_IRQS):
        entries.append(_INTERRUPT.pack(EntryType.IO_INTERRUPT, InterruptType.INT, 0,
                                       ISA_BUS_ID, isa_irq, ioapic_id, isa_irq))
    for irq in pci_irqs:
        entries.append(_INTERRUPT.pack(EntryType.IO_INTERRUPT, InterruptType.INT,
                                       int(IrqFlag.ACTIVE_LOW | IrqFlag.LEVEL), PCI_BUS_ID,
                                       pci_source_irq(irq.device, irq.pin), ioapic_id,
                                       irq.ioapic_pin))
    # LINT0 carries the 8259 (virtual wire mode), LINT1 NMI; 0xFF = every local APIC.
    entries.append(_INTERRUPT.pack(EntryType.LOCAL_INTERRUPT, InterruptType.EXTINT, 0,
                                   ISA_BUS_ID, 0, 0xFF, 0))
    entries.append(_INTERRUPT.pack(EntryType.LOCAL_INTERRUPT, InterruptType.NMI, 0,
                                   ISA_BUS_ID, 0, 0xFF, 1))
    return entries


def write_mptable(mem, num_cpus: int, pci_irqs: list[PciIrq] | tuple[PciIrq, ...] = (),
                  cpu_signature: int = DEFAULT_CPU_SIGNATURE,
                  cpu_features: int = DEFAULT_CPU_FEATURES,
                  addr: int = layout.MPTABLE_START) -> int:
    """Write the MP floating pointer at `addr` and the config table right after it.

    Returns the floating pointer's address. `mem` is a GuestMemory.
    """
    pci_irqs = _validate(num_cpus, list(pci_irqs))
    if addr % 16 or not layout.BIOS_START <= addr < layout.BIOS_END:
        raise MpTableError(f"MP table address {addr:#x} must be 16-byte aligned in the BIOS area")
    entries = build_mp_config_entries(num_cpus, pci_irqs, cpu_signature, cpu_features)
    body = b"".join(entries)
    config_addr = addr + _FLOATING.size
    length = _CONFIG_HEADER.size + len(body)
    if config_addr + length > layout.BIOS_END:
        raise MpTableError(f"MP table of {length} bytes does not fit below {layout.BIOS_END:#x}")

    def config_header(checksum: int) -> bytes:
        return _CONFIG_HEADER.pack(MP_CONFIG_SIGNATURE, length, MP_SPEC_REV, checksum, OEM_ID,
                                   PRODUCT_ID, 0, 0, len(entries), layout.LAPIC_ADDR, 0, 0, 0)

    config = config_header(_checksum(config_header(0) + body)) + body

    def floating(checksum: int) -> bytes:
        # length 1 paragraph; feature byte 1 = 0: a config table is present;
        # feature byte 2 bit 7 (IMCRP) = 0: virtual wire mode, no IMCR.
        return _FLOATING.pack(MP_FLOATING_SIGNATURE, config_addr, 1, MP_SPEC_REV, checksum,
                              bytes(5))

    mem.write(addr, floating(_checksum(floating(0))))
    mem.write(config_addr, config)
    logger.debug("MP table at %#x: %d CPUs, %d PCI INTx entries, %d bytes",
                 addr, num_cpus, len(pci_irqs), length)
    return addr
