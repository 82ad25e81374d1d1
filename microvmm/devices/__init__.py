"""Legacy devices and the port-I/O/MMIO bus they sit on."""

from microvmm.devices.bus import AccessCount, Bus, BusDevice, BusError, BusRange, BusStats
from microvmm.devices.i8042 import I8042
from microvmm.devices.legacy import IO_DELAY_PORTS, NullDevice
from microvmm.devices.rtc import CmosRtc
from microvmm.devices.serial import Serial16550A

__all__ = [
    "AccessCount", "Bus", "BusDevice", "BusError", "BusRange", "BusStats",
    "CmosRtc", "I8042", "IO_DELAY_PORTS", "NullDevice", "Serial16550A",
]
