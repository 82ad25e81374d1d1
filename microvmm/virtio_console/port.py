"""Per-port state of the console device: guest-side flags, output held back, counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from microvmm.virtio_console.backends import PortBackend, TerminalSize
from microvmm.virtio_console.spec import PortSpec

if TYPE_CHECKING:
    from microvmm.virtio_console.device import VirtioConsole

#: Host-side buffer for console ports, whose guest (hvc) spins until its
#: output buffer is used: beyond this, output is dropped and counted.
CONSOLE_BUFFER_LIMIT = 1 << 20


@dataclass
class PendingChain:
    """A guest->host chain the backend has not fully taken yet (not used yet)."""

    head: int
    data: bytes
    offset: int = 0

    @property
    def remaining(self) -> memoryview:
        return memoryview(self.data)[self.offset:]


@dataclass
class PortStats:
    name: str
    to_host_bytes: int = 0    # guest -> backend, written
    to_guest_bytes: int = 0   # backend -> guest, delivered
    dropped_bytes: int = 0    # console output beyond CONSOLE_BUFFER_LIMIT
    buffered_bytes: int = 0   # held host-side right now


@dataclass
class Port:
    index: int
    spec: PortSpec
    backend: PortBackend
    size: TerminalSize | None = None
    # Guest-side state, cleared by a device reset.
    added: bool = False        # DEVICE_ADD sent
    ready: bool = False        # PORT_READY(1) received
    guest_open: bool = False   # PORT_OPEN(1) received (consoles count as open)
    # Output not yet taken by the backend.
    pending: PendingChain | None = None
    held: bytearray = field(default_factory=bytearray)
    to_host_bytes: int = 0
    to_guest_bytes: int = 0
    dropped_bytes: int = 0
    # Run-time changes (the control socket, hotplug.py).
    #: The host end is held closed (PORT_OPEN 0) whatever the backend says.
    host_closed: bool = False
    #: DEVICE_REMOVE sent: output still in the ring is taken and held until
    #: the backend has it all, then the backend is closed; no more input.
    unplugged: bool = False
    #: Bytes for the guest that came from the control socket, not the backend.
    injected: bytearray = field(default_factory=bytearray)

    @property
    def console(self) -> bool:
        return self.spec.console

    @property
    def host_open(self) -> bool:
        """What the guest is told of the host end (PORT_OPEN)."""
        return self.backend.connected and not self.host_closed and not self.unplugged

    def hold(self, data: bytes | memoryview) -> None:
        """Keep console output host-side, up to the limit; count the rest as dropped."""
        room = max(0, CONSOLE_BUFFER_LIMIT - len(self.held))
        self.held += data[:room]
        self.dropped_bytes += max(0, len(data) - room)

    def take_injected(self, max_bytes: int) -> bytes:
        data = bytes(self.injected[:max_bytes])
        del self.injected[:max_bytes]
        return data

    def reset_guest_state(self) -> None:
        self.added = self.ready = self.guest_open = False
        if self.pending is not None:
            # The driver reset the device: its chain is gone, its bytes are not.
            self.hold(self.pending.remaining)
            self.pending = None

    def stats(self) -> PortStats:
        buffered = len(self.held) + (len(self.pending.remaining) if self.pending else 0)
        return PortStats(self.spec.name, self.to_host_bytes, self.to_guest_bytes,
                         self.dropped_bytes, buffered)


class PortListener:
    """Routes one backend's events to the device (on the loop thread)."""

    def __init__(self, device: "VirtioConsole", port: Port):
        self._device = device
        self._port = port

    def backend_readable(self) -> None:
        self._device._guarded(lambda: self._device._process_rx(self._port))

    def backend_writable(self) -> None:
        self._device._guarded(lambda: self._device._process_tx(self._port))

    def backend_connection_changed(self, connected: bool) -> None:
        self._device._guarded(lambda: self._device._connection_changed(self._port, connected))

    def backend_resized(self, size: TerminalSize) -> None:
        self._device._guarded(lambda: self._device._apply_resize(self._port, size))
