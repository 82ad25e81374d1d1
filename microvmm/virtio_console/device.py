"""The virtio-console device (type 3): 1..16 ports, control queues, flow control.

Queues (Linux's view: "receiveq" is host->guest):
  port 0: rx 0, tx 1;  control: rx (c_ivq) 2, tx (c_ovq) 3;  port n>0: rx 2n+2, tx 2n+3.
Without MULTIPORT only port 0 on queues 0/1 exists and config cols/rows give its size.

Threading: every queue and backend operation runs on the event loop thread
under `self._lock`. vCPU-thread entry points (activate, reset, config
accesses) only change state under the lock and post work to the loop; a
generation number drops work posted before a reset. The transport may call
`queue_notify` on the loop thread (ioeventfd) or elsewhere; the latter is posted.

Flow control: guest output a backend cannot take stays in its chain (not
used) until the backend is writable, so a blocked sink blocks the guest writer.
Console ports are the exception: Linux's hvc path spins until its buffer is
used, so their output is used at once and held host-side (up to 1 MiB per
port, the excess dropped and counted). Input is read from a backend only while
the guest has receive buffers posted, at most as much as they hold.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
from collections import deque
from typing import TYPE_CHECKING, Callable

from microvmm.memory import GuestMemoryError
from microvmm.virtio.device import VirtioDevice, VirtioDeviceType
from microvmm.virtio.queue import VirtQueueError
from microvmm.virtio_console import control
from microvmm.virtio_console.backends import MAX_IOV, PortBackend, TerminalSize, create_backend
from microvmm.virtio_console.control import ControlError
from microvmm.virtio_console.control_queues import CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, ControlQueues
from microvmm.virtio_console.hotplug import PortHotplug
from microvmm.virtio_console.port import PendingChain, Port, PortListener, PortStats
from microvmm.virtio_console.spec import MAX_PORTS, PortSpec, validate_ports

if TYPE_CHECKING:
    from typing import TextIO

    from microvmm.eventloop import EventLoop
    from microvmm.memory import GuestMemory
    from microvmm.virtio.queue import VirtQueue

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 64
#: Largest single read from a backend into one receive buffer.
MAX_READ = 64 * 1024
#: Most guest->host chains gathered into one backend write.
TX_BATCH_CHAINS = 64
#: ...and at most about this many bytes: a unix socket's default send buffer
#: (~208 KiB) takes a batch this size whole, so short writes stay rare.
TX_BATCH_BYTES = 128 * 1024
_CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr
EMERG_WR_OFFSET = 8


class ConsoleFeature(enum.IntEnum):
    SIZE = 0
    MULTIPORT = 1
    EMERG_WRITE = 2


def _prefix(views: list[memoryview], count: int) -> bytes:
    """The first `count` bytes of the views' concatenation."""
    parts = []
    for view in views:
        if count <= 0:
            break
        parts.append(view[:count])
        count -= len(view)
    return b"".join(parts)


def _suffix(views: list[memoryview], count: int) -> list[memoryview]:
    """The views' concatenation without its first `count` bytes, as views."""
    rest = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        rest.append(view[count:] if count else view)
        count = 0
    return rest


def rx_queue_index(port: int) -> int:
    return 0 if port == 0 else 2 * port + 2


def tx_queue_index(port: int) -> int:
    return rx_queue_index(port) + 1


class VirtioConsole(PortHotplug, ControlQueues, VirtioDevice):
    device_type = VirtioDeviceType.CONSOLE

    def __init__(self, ports: list[tuple[PortSpec, PortBackend]], loop: "EventLoop",
                 queue_size: int = DEFAULT_QUEUE_SIZE, max_ports: int | None = None):
        # max_ports: the port ids the guest is told of (max_nr_ports), so that
        # ports can be added later (hotplug.py); default: just these ports.
        capacity = len(ports) if max_ports is None else max_ports
        least = 0 if max_ports is not None else 1
        if not least <= len(ports) <= capacity <= MAX_PORTS:
            raise ValueError(f"a console has {least}..{MAX_PORTS} ports, not {len(ports)} of {capacity}")
        if ports:
            validate_ports([spec for spec, _ in ports])
        self.capacity = capacity
        self._loop = loop
        self._lock = threading.RLock()
        self.ports = [Port(i, spec, backend, size=backend.terminal_size())
                      for i, (spec, backend) in enumerate(ports)]
        self.queue_max_sizes = (queue_size,) * (2 * capacity + 2)
        self._queues: list[VirtQueue] | None = None
        self._multiport = False
        self._driver_ready = False
        self._size_negotiated = False
        self._signal_queue: Callable[[int], None] = lambda index: None
        self._signal_config: Callable[[], None] = lambda: None
        self._fail: Callable[[str], None] = lambda reason: None
        self._generation = 0
        self._control_out: deque[bytes] = deque()
        #: Sees every byte the guest printed (the VMM's log, failure watch and
        #: --expect): on a console port when the device takes the bytes from
        #: the guest, held or not (an unattached pty takes nothing, yet the
        #: guest's console said it); on other ports when the backend takes
        #: them. Called on the I/O thread.
        self.output_tap: Callable[[str, bytes], None] | None = None
        for port in self.ports:
            listener = self._port_listener(port)
            loop.call_soon_threadsafe(lambda p=port, li=listener: p.backend.attach(loop, li))

    @classmethod
    def from_specs(cls, specs: list[PortSpec], loop: "EventLoop", queue_size: int = DEFAULT_QUEUE_SIZE,
                   announce: "TextIO | None" = None,
                   input_filter: Callable[[bytes], bytes] | None = None) -> "VirtioConsole":
        """Open a backend per spec (BackendError on failure, closing those opened)."""
        opened: list[tuple[PortSpec, PortBackend]] = []
        try:
            for spec in specs:
                opened.append((spec, create_backend(spec, announce, input_filter)))
        except Exception:
            for _, backend in opened:
                backend.close()
            raise
        return cls(opened, loop, queue_size)

    # ---- VirtioDevice: vCPU-thread side ---------------------------------------

    def device_features(self) -> int:
        return sum(1 << bit for bit in ConsoleFeature)

    def _config_bytes(self) -> bytes:
        size = (self.ports[0].size if self.ports else None) or TerminalSize(0, 0)
        return _CONFIG.pack(size.cols, size.rows, self.capacity, 0)

    def read_config(self, offset: int, size: int) -> int:
        with self._lock:
            data = self._config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        # Legacy Linux writes config byte by byte: the character is the byte at
        # offset 8; the upper bytes of the u32 are ignored.
        if offset == EMERG_WR_OFFSET:
            char = bytes((value & 0xFF,))
            self._loop.call_soon_threadsafe(lambda: self._guarded(lambda: self._emergency_write(char)))

    def activate(self, memory: "GuestMemory", queues: list["VirtQueue"], driver_features: int,
                 signal_queue: Callable[[int], None], signal_config: Callable[[], None],
                 fail: Callable[[str], None]) -> None:
        with self._lock:
            self._queues = list(queues)
            self._multiport = bool(driver_features & (1 << ConsoleFeature.MULTIPORT))
            self._size_negotiated = bool(driver_features & (1 << ConsoleFeature.SIZE))
            self._signal_queue, self._signal_config, self._fail = signal_queue, signal_config, fail
            self._generation += 1
            self._driver_ready = False
            if not self._multiport and self.ports:
                # Single-port mode: port 0 is the console, open from the start.
                port0 = self.ports[0]
                port0.added = port0.ready = port0.guest_open = True
            self._post(self._start)

    def reset(self) -> None:
        with self._lock:
            self._queues = None
            self._generation += 1
            self._driver_ready = False
            self._control_out.clear()
            for port in self.ports:
                port.reset_guest_state()
            self._post(self._quiesce)

    def queue_notify(self, index: int) -> None:
        if self._loop.in_loop_thread():
            self._guarded(lambda: self._on_kick(index))
        else:
            self._post(lambda: self._on_kick(index))

    # ---- public host-side API (any thread) --------------------------------------

    def resize(self, port_index: int, cols: int, rows: int) -> None:
        """A console port's terminal changed size (e.g. SIGWINCH on stdio)."""
        if not 0 <= port_index < len(self.ports):
            raise IndexError(f"no console port {port_index}")
        if not (0 <= cols <= 0xFFFF and 0 <= rows <= 0xFFFF):
            raise ValueError(f"terminal size {cols}x{rows} out of range")
        port = self.ports[port_index]
        self._loop.call_soon_threadsafe(
            lambda: self._guarded(lambda: self._apply_resize(port, TerminalSize(cols, rows))))

    def refresh_sizes(self) -> None:
        """Re-read every terminal backend's size (call after SIGWINCH)."""
        def refresh() -> None:
            for port in self.ports:
                size = port.backend.terminal_size()
                if size is not None:
                    self._apply_resize(port, size)
        self._loop.call_soon_threadsafe(lambda: self._guarded(refresh))

    def stats(self) -> list[PortStats]:
        with self._lock:
            return [port.stats() for port in self.ports]

    def restore_terminals(self) -> None:
        """Put terminals back in their original mode (safe from signal-handling paths)."""
        for port in self.ports:
            port.backend.restore()

    def close(self, timeout: float = 5.0) -> None:
        """Close every backend (on the loop thread if it runs); idempotent."""
        with self._lock:
            self._queues = None
            self._generation += 1
        done = threading.Event()

        def close_all() -> None:
            try:
                for port in self.ports:
                    port.backend.close()
            finally:
                done.set()
        if self._loop.running and not self._loop.in_loop_thread():
            self._loop.call_soon_threadsafe(close_all)
            if not done.wait(timeout):
                logger.error("console backends did not close within %s s", timeout)
        else:
            close_all()

    # ---- loop-thread machinery -----------------------------------------------------

    def _post(self, work: Callable[[], None]) -> None:
        generation = self._generation

        def run() -> None:
            if generation == self._generation:
                work()
        self._loop.call_soon_threadsafe(lambda: self._guarded(run))

    def _port_listener(self, port: Port) -> PortListener:
        """What a port's backend calls on the loop thread (also for hot-plugged ports)."""
        return PortListener(self, port)

    def _guarded(self, work: Callable[[], None]) -> None:
        """Run work under the lock; bad guest input fails the device."""
        with self._lock:
            try:
                work()
            except (VirtQueueError, ControlError, GuestMemoryError) as exc:
                self._failed(str(exc))

    def _failed(self, reason: str) -> None:
        fail = self._fail
        self._queues = None
        self._generation += 1
        for port in self.ports:
            port.backend.set_read_interest(False)
        fail(reason)

    @property
    def _active(self) -> bool:
        return self._queues is not None

    def _start(self) -> None:
        if self._multiport:
            self._process_control_tx()
        for port in self.ports:
            self._process_tx(port)
            self._process_rx(port)

    def _quiesce(self) -> None:
        for port in self.ports:
            port.backend.set_read_interest(False)
            self._process_tx(port)  # keeps flushing held output

    def _signal(self, index: int) -> None:
        assert self._queues is not None
        if self._queues[index].needs_notification():
            self._signal_queue(index)

    def _on_kick(self, index: int) -> None:
        if not self._active:
            return
        if index == CONTROL_RX_QUEUE:
            self._deliver_control()
        elif index == CONTROL_TX_QUEUE:
            self._process_control_tx()
        else:
            port_index = 0 if index < 2 else (index - 2) // 2
            if port_index < len(self.ports):
                port = self.ports[port_index]
                if index == rx_queue_index(port_index):
                    self._process_rx(port)
                else:
                    self._process_tx(port)

    def _port_queue(self, port: Port, index: int) -> "VirtQueue | None":
        if self._queues is None or not port.ready or (not self._multiport and port.index != 0):
            return None
        return self._queues[index]

    # ---- guest -> host data ----------------------------------------------------------

    def _write_out(self, port: Port, data: bytes | bytearray | memoryview) -> int:
        return self._write_out_vectored(port, [data])

    def _write_out_vectored(self, port: Port, views: list[bytes | bytearray | memoryview]) -> int:
        """Hand `views` to the backend in as few calls as it allows; bytes taken."""
        backend = port.backend
        if len(views) <= MAX_IOV:
            written = backend.write_vectored(views)
        else:
            written = 0
            for start in range(0, len(views), MAX_IOV):
                part = views[start:start + MAX_IOV]
                taken = backend.write_vectored(part)
                written += taken
                if taken < sum(map(len, part)):
                    break
        port.to_host_bytes += written
        if written and self.output_tap is not None and not port.console:
            self.output_tap(port.spec.name, _prefix(views, written))
        return written

    def _flush_held(self, port: Port, with_pending: bool = True) -> bool:
        """Write held output (and the pending chain); True when nothing is left."""
        if port.held:
            del port.held[:self._write_out(port, port.held)]
            if port.held:
                return False
        pending = port.pending
        if pending is not None and with_pending:
            pending.offset += self._write_out(port, pending.remaining)
            if len(pending.remaining):
                return False
            port.pending = None
            queue = self._port_queue(port, tx_queue_index(port.index))
            if queue is not None:
                queue.add_used(pending.head, 0)
                self._signal(tx_queue_index(port.index))
        return True

    def _process_tx(self, port: Port) -> None:
        """Move guest output to the backend, a batch of chains per write call.

        A batch's buffers leave in one writev/sendmsg, behind the rest of the
        pending chain if there is one. The chains wholly written are used; the
        first one cut short becomes (or stays) the port's pending chain, its
        rest copied, and the chains after it go back to the ring untouched, so
        a short write keeps order and loses nothing. Console ports hold
        whatever the backend did not take and use every chain. The driver is
        interrupted once per call, not per chain.
        """
        if port.unplugged and port.backend.closed:
            return  # removed and drained: its host end is gone
        index = tx_queue_index(port.index)
        queue = self._port_queue(port, index)
        # A removed port's output is taken at once, like a console's: the
        # guest drops what is left in its ring (hotplug.py).
        console = port.console or port.unplugged
        # A serial port's pending chain leads the next batch (one write for both).
        flushed = self._flush_held(port, with_pending=queue is None or console)
        if queue is not None and (flushed or console):
            used = False
            while console or not port.held:
                views: list[memoryview] = []
                pending = None if console else port.pending
                if pending is not None:
                    views.append(pending.remaining)
                heads, lengths = queue.pop_readable_batch(TX_BATCH_CHAINS, views, TX_BATCH_BYTES)
                if not heads and pending is None:
                    break
                written = 0 if port.held else self._write_out_vectored(port, views)
                if console:
                    if self.output_tap is not None:
                        self.output_tap(port.spec.name, b"".join(views))
                    for view in _suffix(views, written):
                        port.hold(view)
                    queue.add_used_batch(heads)
                    used = True
                    continue
                finished: list[int] = []
                if pending is not None:
                    lead = len(views[0])
                    if written < lead:
                        pending.offset += written
                        queue.undo_pop(len(heads))
                        break
                    written -= lead
                    port.pending = None
                    finished.append(pending.head)
                    del views[0]
                if written == sum(lengths):
                    finished += heads
                    queue.add_used_batch(finished)
                    used = True
                    continue
                done = 0
                while written >= lengths[done]:
                    written -= lengths[done]
                    done += 1
                # Cut short: chain `done` waits in `pending`, the later ones in the ring.
                cut = _prefix(_suffix(views, sum(lengths[:done])), lengths[done])
                port.pending = PendingChain(heads[done], cut, written)
                queue.undo_pop(len(heads) - done - 1)
                finished += heads[:done]
                if finished:
                    queue.add_used_batch(finished)
                    used = True
                break
            if used:
                self._signal(index)
        port.backend.set_write_interest(bool(port.held or port.pending))
        if port.unplugged and not port.held and port.pending is None:
            port.backend.close()  # everything the guest wrote is out: the host end goes

    def _emergency_write(self, char: bytes) -> None:
        port = self.ports[0]
        if port.console and self.output_tap is not None:
            self.output_tap(port.spec.name, bytes(char))
        port.hold(char)
        self._process_tx(port)

    # ---- host -> guest data ------------------------------------------------------------

    def _can_receive(self, port: Port) -> bool:
        return ((bool(port.injected) or (port.backend.has_input and port.host_open))
                and port.guest_open and not port.unplugged
                and self._port_queue(port, rx_queue_index(port.index)) is not None)

    def _process_rx(self, port: Port) -> None:
        index = rx_queue_index(port.index)
        if not self._can_receive(port):
            port.backend.set_read_interest(False)
            return
        assert self._queues is not None
        queue = self._queues[index]
        used = False
        while queue.has_available():
            chain = queue.pop()
            assert chain is not None
            room = chain.writable_len
            if room == 0:
                raise VirtQueueError(f"port {port.index} receive buffer has no writable space")
            data = port.take_injected(min(room, MAX_READ)) or port.backend.read(min(room, MAX_READ))
            if not data:
                queue.undo_pop()
                break
            chain.write(data)
            queue.add_used(chain.head, len(data))
            port.to_guest_bytes += len(data)
            used = True
        if used:
            self._signal(index)
        port.backend.set_read_interest(self._can_receive(port) and queue.has_available())

    def _connection_changed(self, port: Port, connected: bool) -> None:
        if port.ready and self._multiport and not port.host_closed and not port.unplugged:
            self._send_control(control.port_open(port.index, connected))
        self._process_tx(port)
        self._process_rx(port)

    def _apply_resize(self, port: Port, size: TerminalSize) -> None:
        if size == port.size:
            return
        port.size = size
        if not self._active:
            return
        if self._multiport:
            if port.console and port.ready:
                self._send_control(control.resize(port.index, size.cols, size.rows))
        elif port.index == 0 and self._size_negotiated:
            self._signal_config()
