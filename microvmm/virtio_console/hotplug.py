"""Run-time changes to a console's ports (the control socket, microvmm/control/):
add and remove ports, hold the host end closed, resize consoles, send bytes.

A mixin of VirtioConsole (device.py). Each call may come from any thread: the
change runs on the event loop thread under the device's lock, like all the
device's work, and the caller waits for its result (PortControlError when it
cannot be done).

Port ids are not reused while the driver runs: after DEVICE_REMOVE Linux
detaches the port's unused buffers from its queues, but their entries stay in
the available rings, and a new port on the same queues would meet them. So
`add-port` takes the next id never used, up to the capacity (max_nr_ports),
for the rest of the run.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

from microvmm.virtio_console import control
from microvmm.virtio_console.spec import validate_ports

if TYPE_CHECKING:
    from microvmm.eventloop import EventLoop
    from microvmm.virtio_console.backends import PortBackend, TerminalSize
    from microvmm.virtio_console.port import Port
    from microvmm.virtio_console.spec import PortSpec

logger = logging.getLogger("microvmm.virtio_console.device")

#: Bytes `send` may queue for a port whose guest side does not read.
MAX_INJECTED = 1 << 20
#: How long a caller waits for the loop thread to make a change.
CALL_TIMEOUT = 5.0


class PortControlError(Exception):
    """A run-time port change that cannot be done; `code` says which kind."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class PortHotplug:
    ports: list["Port"]
    capacity: int
    _loop: "EventLoop"
    _lock: Any
    _multiport: bool
    _driver_ready: bool

    if TYPE_CHECKING:  # provided by VirtioConsole
        def _guarded(self, work: Callable[[], None]) -> None: ...
        def _send_control(self, message: control.ControlMessage) -> None: ...
        def _process_tx(self, port: "Port") -> None: ...
        def _process_rx(self, port: "Port") -> None: ...
        def _apply_resize(self, port: "Port", size: "TerminalSize") -> None: ...
        @property
        def _active(self) -> bool: ...

    # ---- any thread -------------------------------------------------------------

    def port_states(self) -> list[dict]:
        """Every port the guest has (not removed): its state and counters."""
        return self._on_loop(lambda: [self._state(p) for p in self.ports if not p.unplugged])

    def find_port(self, name: str) -> "Port | None":
        with self._lock:
            for port in self.ports:
                if port.spec.name == name and not port.unplugged:
                    return port
        return None

    def add_port(self, spec: "PortSpec", backend: "PortBackend") -> int:
        """Hot-plug a port (DEVICE_ADD; the guest's PORT_READY brings PORT_NAME
        and PORT_OPEN); its id. The backend is the device's from here on."""
        return self._on_loop(lambda: self._add(spec, backend))

    def remove_port(self, name: str) -> int:
        """DEVICE_REMOVE; the port's output is taken first and written out
        before its backend closes. Its id."""
        return self._on_loop(lambda: self._remove(self._plugged(name)))

    def set_host_open(self, name: str, is_open: bool) -> bool:
        """Hold the host end closed (PORT_OPEN 0) or let the backend say again;
        whether the guest now sees the host end open."""
        return self._on_loop(lambda: self._set_host_open(self._plugged(name), is_open))

    def resize_port(self, name: str, cols: int, rows: int) -> None:
        from microvmm.virtio_console.backends import TerminalSize
        if not (0 <= cols <= 0xFFFF and 0 <= rows <= 0xFFFF):
            raise PortControlError("bad-arguments", f"terminal size {cols}x{rows} out of range 0..65535")

        def resize() -> None:
            port = self._plugged(name)
            if not port.console:
                raise PortControlError("not-a-console", f"port {name!r} is not a console port ('@')")
            self._need_multiport()
            self._apply_resize(port, TerminalSize(cols, rows))
        self._on_loop(resize)

    def send_to_port(self, name: str, data: bytes) -> int:
        """Queue bytes for the guest on a port; how many wait to be taken."""
        def send() -> int:
            port = self._plugged(name)
            if len(port.injected) + len(data) > MAX_INJECTED:
                raise PortControlError("busy", f"port {name!r} already holds {len(port.injected)} bytes "
                                       f"the guest has not read (limit {MAX_INJECTED})")
            port.injected += data
            self._process_rx(port)
            return len(port.injected)
        return self._on_loop(send)

    # ---- loop thread, under the lock ----------------------------------------------------

    def _on_loop(self, work: Callable[[], Any], timeout: float = CALL_TIMEOUT) -> Any:
        if self._loop.in_loop_thread() or not self._loop.running:
            with self._lock:
                return work()
        done = threading.Event()
        outcome: list = [None, None]

        def run() -> None:
            try:
                with self._lock:
                    outcome[0] = work()
            except BaseException as exc:  # handed to the caller
                outcome[1] = exc
            finally:
                done.set()
        self._loop.call_soon_threadsafe(run)
        if not done.wait(timeout):
            raise PortControlError("timeout", f"the I/O thread did not answer within {timeout:g} s")
        if outcome[1] is not None:
            raise outcome[1]
        return outcome[0]

    def _state(self, port: "Port") -> dict:
        stats = port.stats()
        return {"id": port.index, "name": port.spec.name, "backend": str(port.spec),
                "console": port.console, "host_open": port.host_open, "guest_open": port.guest_open,
                "ready": port.ready, "to_guest_bytes": stats.to_guest_bytes,
                "to_host_bytes": stats.to_host_bytes, "dropped_bytes": stats.dropped_bytes,
                "buffered_bytes": stats.buffered_bytes, "queued_input_bytes": len(port.injected)}

    def _plugged(self, name: str) -> "Port":
        for port in self.ports:
            if port.spec.name == name and not port.unplugged:
                return port
        raise PortControlError("unknown-port", f"no port named {name!r}")

    def _need_multiport(self) -> None:
        if self._active and not self._multiport:
            raise PortControlError("no-multiport", "the guest driver did not negotiate "
                                   "VIRTIO_CONSOLE_F_MULTIPORT: its ports cannot change")
        if not self._active or not self._driver_ready:
            raise PortControlError("not-ready", "the guest driver has not set the device up yet")

    def _add(self, spec: "PortSpec", backend: "PortBackend") -> int:
        from microvmm.virtio_console.port import Port
        self._need_multiport()
        validate_ports([p.spec for p in self.ports if not p.unplugged] + [spec], max_ports=None)
        index = len(self.ports)
        if index >= self.capacity:
            raise PortControlError("no-port-id", f"all {self.capacity} port ids of this device are used "
                                   "(a removed port's id is not used again)")
        port = Port(index, spec, backend, size=backend.terminal_size())
        port.added = True
        self.ports.append(port)
        backend.attach(self._loop, self._port_listener(port))  # type: ignore[attr-defined]
        self._send_control(control.device_add(index))
        logger.info("virtio-console: port %d (%s) added", index, spec.name)
        return index

    def _remove(self, port: "Port") -> int:
        self._need_multiport()
        port.unplugged = True
        port.injected.clear()
        self._process_tx(port)  # take what the guest wrote: it drops what stays in the ring
        self._send_control(control.device_remove(port.index))
        port.guest_open = False
        logger.info("virtio-console: port %d (%s) removed", port.index, port.spec.name)
        return port.index

    def _set_host_open(self, port: "Port", is_open: bool) -> bool:
        self._need_multiport()
        before = port.host_open
        port.host_closed = not is_open
        if port.ready and port.host_open != before:
            self._send_control(control.port_open(port.index, port.host_open))
        self._process_rx(port)
        return port.host_open
