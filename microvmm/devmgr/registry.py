"""`--device NAME[,OPTIONS]`: the virtio devices that plug into the device manager.

A device plugs in with one line in DEVICE_MODULES (its `--device` name and its
module) and a module that defines:

    parse_options(text: str) -> options
        The OPTIONS after "NAME," ("" when none), checked at the command line;
        raises ValueError (its message names the bad token). Must import
        nothing heavy: it runs before the VM starts.
    open_host(options, context: HostContext) -> opened
        Host resources the device needs (files, sockets, terminals), opened
        before the guest runs so that a failure stops the VMM first; raises
        DeviceSetupError. Closers go to context.closers.
    create_device(opened, context: DeviceContext) -> VirtioDevice
        The device model, built while vCPU 0 boots; the manager puts it on
        the PCI bus behind the legacy virtio transport and wires its queues
        and interrupts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from microvmm.devmgr.plan import DeviceRequest  # noqa: F401 (re-exported: the request type)

if TYPE_CHECKING:
    from types import ModuleType

    from microvmm.eventloop import EventLoop
    from microvmm.memory import GuestMemory

#: --device name -> the module of the device (see the module docstring).
DEVICE_MODULES: dict[str, str] = {
    "virtio-console": "microvmm.virtio_console.plug",
    "virtio-rng": "microvmm.devices.virtio_rng",
    "virtio-9p": "microvmm.devices.virtio_9p",
}


class DeviceOptionError(ValueError):
    """A `--device` option is invalid; the message names the bad token."""


class DeviceSetupError(Exception):
    """A device's host resources could not be opened (before the guest runs)."""


@dataclass
class HostContext:
    """What a device may use while its host resources are opened (before the boot)."""

    #: Where messages for the user go (e.g. "redirected to /dev/pts/N").
    announce: Any
    #: Teardown callbacks, run in reverse order when the VM ends.
    closers: list[Callable[[], None]]
    #: Filters input read from this terminal (the Ctrl-A escape), for stdio backends.
    stdio_filter: Callable[[bytes], bytes] | None = None


@dataclass
class DeviceContext:
    """What a device may use when it is built (vCPU 0 already runs)."""

    memory: "GuestMemory"
    loop: "EventLoop"
    closers: list[Callable[[], None]]
    queue_size: int
    #: This device's number among those of its kind (0 = the first).
    ordinal: int
    #: Sees every byte a device delivers to a host backend: (port name, data).
    output_tap: Callable[[str, bytes], None] | None = None
    #: Ports the run itself needs (a `-- CMD` run's ports, the kernel's log
    #: port): (spec, backend) pairs, added after the user's on the first console.
    run_ports: Callable[[], list] = field(default=lambda: [])
    #: Ports may be added while the guest runs (a control socket): a
    #: console advertises every port id it may ever use.
    hotplug: bool = False


def device_module(kind: str) -> "ModuleType":
    return importlib.import_module(DEVICE_MODULES[kind])


def parse_device_option(text: str) -> DeviceRequest:
    """`NAME[,OPTIONS]` -> a request; DeviceOptionError names the bad token."""
    kind, _, rest = text.partition(",")
    if kind not in DEVICE_MODULES:
        known = ", ".join(sorted(DEVICE_MODULES))
        raise DeviceOptionError(f"--device {text!r}: unknown device {kind!r} (known: {known})")
    try:
        options = device_module(kind).parse_options(rest)
    except ValueError as err:
        raise DeviceOptionError(f"--device {text!r}: {err}") from None
    return DeviceRequest(kind, options, text)
