"""virtio-console: ACRN port syntax, host backends and the multiport device."""

from microvmm.virtio_console.backends import BackendError, PortBackend, TerminalSize, create_backend
from microvmm.virtio_console.device import VirtioConsole
from microvmm.virtio_console.port import PortStats
from microvmm.virtio_console.spec import PortSpec, PortSpecError, parse_device_option, parse_port_spec

__all__ = [
    "BackendError", "PortBackend", "PortSpec", "PortSpecError", "PortStats", "TerminalSize",
    "VirtioConsole", "create_backend", "parse_device_option", "parse_port_spec",
]
