"""virtio-console: ACRN port syntax, host backends and the multiport device.

The names below load on first use (PEP 562): `microvmm run` parses --console
specs (spec.py) before it knows whether it needs the device at all, and a run
without ports should not pay for importing the device, its backends and socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from microvmm.lazyexports import lazy_exports

if TYPE_CHECKING:
    from microvmm.virtio_console.backends import BackendError, PortBackend, TerminalSize, create_backend
    from microvmm.virtio_console.device import VirtioConsole
    from microvmm.virtio_console.port import PortStats
    from microvmm.virtio_console.spec import PortSpec, PortSpecError, parse_device_option, parse_port_spec

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "BackendError": "backends", "PortBackend": "backends", "TerminalSize": "backends",
    "create_backend": "backends", "VirtioConsole": "device", "PortStats": "port",
    "PortSpec": "spec", "PortSpecError": "spec", "parse_device_option": "spec",
    "parse_port_spec": "spec",
}

__all__ = [
    "BackendError", "PortBackend", "PortSpec", "PortSpecError", "PortStats", "TerminalSize",
    "VirtioConsole", "create_backend", "parse_device_option", "parse_port_spec",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
