"""The virtio-console device's control queues (multiport): the messages that
add ports, name them, mark consoles, open and resize them.

A mixin of VirtioConsole (device.py): it runs on the event loop thread under
the device's lock, like the rest of the device, and uses its queues, ports
and signalling.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from microvmm.virtio_console import control
from microvmm.virtio_console.control import ControlError, ControlEvent, ControlMessage

if TYPE_CHECKING:
    from collections import deque

    from microvmm.virtio.queue import VirtQueue
    from microvmm.virtio_console.port import Port

logger = logging.getLogger("microvmm.virtio_console.device")

CONTROL_RX_QUEUE = 2
CONTROL_TX_QUEUE = 3
#: Control messages waiting for guest receive buffers. A driver keeps its
#: control receive queue filled; one that never takes them while sending
#: DEVICE_READY again and again would otherwise grow this without bound.
MAX_CONTROL_BACKLOG = 1024


class ControlQueues:
    """Control receive (host->guest) and transmit (guest->host) queue handling."""

    ports: list["Port"]
    _multiport: bool
    _queues: "list[VirtQueue] | None"
    _control_out: "deque[bytes]"
    _driver_ready: bool

    if TYPE_CHECKING:  # provided by VirtioConsole
        def _signal(self, index: int) -> None: ...
        def _process_tx(self, port: "Port") -> None: ...
        def _process_rx(self, port: "Port") -> None: ...

    def _send_control(self, message: ControlMessage) -> None:
        if not self._multiport or self._queues is None:
            return
        if len(self._control_out) >= MAX_CONTROL_BACKLOG:
            raise ControlError(f"{len(self._control_out)} control messages wait for receive buffers "
                               "the driver does not post")
        self._control_out.append(message.encode())
        self._deliver_control()

    def _deliver_control(self) -> None:
        if not self._multiport or self._queues is None:
            return
        queue = self._queues[CONTROL_RX_QUEUE]
        used = False
        while self._control_out:
            chain = queue.pop()
            if chain is None:
                break
            message = self._control_out[0]
            if chain.writable_len < len(message):
                raise ControlError(f"control receive buffer of {chain.writable_len} bytes is "
                                   f"shorter than a {len(message)}-byte message")
            chain.write(message)
            queue.add_used(chain.head, len(message))
            self._control_out.popleft()
            used = True
        if used:
            self._signal(CONTROL_RX_QUEUE)

    def _process_control_tx(self) -> None:
        if not self._multiport or self._queues is None:
            return
        queue = self._queues[CONTROL_TX_QUEUE]
        while self._queues is not None and (chain := queue.pop()) is not None:
            data = chain.read_all()
            queue.add_used(chain.head, 0)
            self._signal(CONTROL_TX_QUEUE)
            self._handle_control(ControlMessage.decode_from_guest(data))

    def _control_port(self, message: ControlMessage) -> Port:
        if message.port_id >= len(self.ports) or not self.ports[message.port_id].added:
            raise ControlError(f"{message.event.name} for port id {message.port_id}, "
                               f"which the device did not add")
        return self.ports[message.port_id]

    def _handle_control(self, message: ControlMessage) -> None:
        event = message.event
        if event is ControlEvent.DEVICE_READY:
            if not message.value:
                logger.error("virtio-console: the guest driver failed to initialise")
                return
            self._driver_ready = True
            for port in self.ports:
                if port.unplugged:
                    continue
                port.added = True
                self._send_control(control.device_add(port.index))
        elif event is ControlEvent.PORT_READY:
            port = self._control_port(message)
            if port.unplugged:
                return  # removed before the guest had set it up
            if not message.value:
                logger.error("virtio-console: the guest failed to add port %d (%s)",
                             port.index, port.spec.name)
                return
            port.ready = True
            if port.console:
                self._send_control(control.console_port(port.index))
                if port.size is not None:
                    self._send_control(control.resize(port.index, port.size.cols, port.size.rows))
            self._send_control(control.port_name(port.index, port.spec.name))
            if port.host_open:
                self._send_control(control.port_open(port.index, True))
            self._process_tx(port)
        elif event is ControlEvent.PORT_OPEN:
            port = self._control_port(message)
            port.guest_open = bool(message.value)
            self._process_rx(port)

