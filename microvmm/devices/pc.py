"""The legacy PC devices a Linux guest expects, on a fresh port-I/O bus.

COM1 (16550A, IRQ 4), the i8042 (only its reset line matters: reboot=k),
the CMOS RTC and the I/O-delay ports Linux writes to. The caller gives the
host side as callbacks; nothing here knows KVM or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
from microvmm.devices.i8042 import I8042, I8042_BASE, I8042_PORT_COUNT
from microvmm.devices.legacy import IO_DELAY_PORTS, NullDevice
from microvmm.devices.rtc import RTC_BASE, RTC_PORT_COUNT, CmosRtc
from microvmm.devices.serial import COM1_BASE, COM1_IRQ, UART_PORT_COUNT, Serial16550A


@dataclass
class PcBuses:
    """The buses vCPU exits are dispatched on, and the UART the VMM feeds."""

    io_bus: Bus
    mmio_bus: Bus
    serial: Serial16550A


def legacy_pc_devices(irq_line: Callable[[int, int], None], serial_output: Callable[[bytes], None],
                      serial_rx_ready: Callable[[], None], reset_requested: Callable[[], None]) -> PcBuses:
    """`irq_line(irq, level)`: the interrupt controller's input (KVM_IRQ_LINE);
    `serial_rx_ready`: the UART can take input; `reset_requested`: the i8042's reset."""
    io_bus = Bus("pio", address_limit=PIO_ADDRESS_LIMIT)
    mmio_bus = Bus("mmio", unclaimed_granule=0x1000)
    serial = Serial16550A(irq_level=lambda level: irq_line(COM1_IRQ, level), output=serial_output,
                          rx_ready=serial_rx_ready)
    io_bus.register(COM1_BASE, UART_PORT_COUNT, serial, "com1")
    io_bus.register(I8042_BASE, I8042_PORT_COUNT, I8042(reset_requested=reset_requested), "i8042")
    io_bus.register(RTC_BASE, RTC_PORT_COUNT, CmosRtc(), "rtc")
    for delay_port in IO_DELAY_PORTS:
        io_bus.register(delay_port.base, delay_port.length, NullDevice(), delay_port.name)
    return PcBuses(io_bus, mmio_bus, serial)
