"""virtio-console as a device-manager plug-in (devmgr/registry.py):
`--device virtio-console,SPEC[,SPEC...]`, one multiport device per option.

The first virtio-console device also takes the `--console` ports and, after
the user's, the ports the run itself needs (`-- CMD` and the kernel's log).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from microvmm.virtio_console.spec import PortSpec, parse_port_spec, validate_ports

if TYPE_CHECKING:
    from microvmm.devmgr.registry import DeviceContext, HostContext
    from microvmm.virtio_console.device import VirtioConsole

logger = logging.getLogger(__name__)


def parse_options(text: str) -> list[PortSpec]:
    """The ports of one device, port 0 first (PortSpecError names the bad token)."""
    if not text:
        raise ValueError("needs at least one port specification")
    ports = [parse_port_spec(spec) for spec in text.split(",")]
    validate_ports(ports)
    return ports


def open_host(ports: list[PortSpec], context: "HostContext") -> list:
    """Each port's backend (a socket file, a pty...): (spec, backend) pairs."""
    if not ports:
        return []  # the backends stay unimported until the device is built: start-up time
    from microvmm.devmgr.registry import DeviceSetupError
    from microvmm.virtio_console.backends import BackendError, create_backend
    opened = []
    try:
        for spec in ports:
            backend = create_backend(spec, context.announce, context.stdio_filter)
            context.closers.append(backend.close)
            opened.append((spec, backend))
    except BackendError as err:
        raise DeviceSetupError(str(err)) from err
    return opened


def create_device(opened: list, context: "DeviceContext") -> "VirtioConsole":
    from microvmm.virtio_console.device import VirtioConsole
    ports = list(opened)
    if context.ordinal == 0:
        ports += context.run_ports()  # their closers are the run's
    from microvmm.virtio_console.spec import MAX_PORTS
    console = VirtioConsole(ports, context.loop, queue_size=context.queue_size,
                            max_ports=MAX_PORTS if context.hotplug else None)
    console.output_tap = context.output_tap
    context.closers.append(console.close)
    context.closers.append(console.restore_terminals)
    return console
