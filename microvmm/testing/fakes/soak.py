"""No-loss soak harness: every port of a 16-port console streaming both ways at once.

The real VirtioConsole, legacy PCI transport and EventLoop (I/O thread), with
unix socket server ports ("socket:NAME=PATH:server", '@' for console ports),
driven by the fake Linux front-end of microvmm/testing/fakes/virtio_driver.py. Three
parties run concurrently:

- the fake guest (the calling thread): multiport bring-up over the control
  queues, then for every port keeps its transmit ring full of seeded random
  chains of random length and its receive ring full of fixed buffers, waking on
  the device's INTx like virtio_console.c;
- the I/O thread: the device and its backends;
- the host peer (one thread, one selector over all peer sockets): writes a
  seeded random stream into every port and reads everything every port sends,
  keeping up (console ports must therefore never drop).

Each side hashes (sha256) exactly what it sent and what it received, per port
and direction; the streams are generated on the fly, so memory stays flat at
any volume. Used by tests/test_soak.py (CI size) and bench/bench_soak.py.
"""

from __future__ import annotations

import hashlib
import io
import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from microvmm.eventloop import EventLoop
from microvmm.memory import GuestMemory
from microvmm.pci.bus import PciBus
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from microvmm.virtio.queue import DescFlags, UsedFlags
from microvmm.virtio_console.control import BAD_ID, ControlEvent
from microvmm.virtio_console.device import (
    CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, ConsoleFeature, VirtioConsole, rx_queue_index,
    tx_queue_index,
)
from microvmm.virtio_console.port import PortStats
from microvmm.virtio_console.spec import parse_port_spec
from microvmm.testing.fakes.virtio_driver import (CONSOLE_CONTROL, EventIntx, FakeLegacyPciDriver, FakeMsiController,
                                      GuestAllocator)

RAM = 32 << 20
SLOT = 4
F_MULTIPORT = 1 << ConsoleFeature.MULTIPORT
CONTROL_BUFFER = 4096
CONTROL_BUFFERS = 32
REG_QUEUE_NOTIFY = 16
#: Largest host-side write of one chunk into a peer socket.
HOST_CHUNK_MAX = 64 * 1024


class SoakStuck(RuntimeError):
    """The soak made no progress before its deadline (a lost byte or a stalled queue)."""


class SeededStream:
    """A deterministic random byte stream of a fixed length, hashed as it is produced."""

    def __init__(self, seed: int, total: int, max_chunk: int):
        self._data = random.Random(seed)
        self._sizes = random.Random(seed ^ 0x5EED)
        self.total = total
        self.max_chunk = max_chunk
        self.produced = 0
        self.digest = hashlib.sha256()

    @property
    def remaining(self) -> int:
        return self.total - self.produced

    def next_chunk(self) -> bytes:
        """The next chunk (random length 1..max_chunk, never past the end)."""
        size = min(self._sizes.randint(1, self.max_chunk), self.remaining)
        chunk = self._data.randbytes(size)
        self.produced += size
        self.digest.update(chunk)
        return chunk


class StreamSink:
    """What one side received of one stream: byte count and running sha256."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()

    def take(self, data: bytes | memoryview) -> None:
        self.received += len(data)
        self.digest.update(data)


@dataclass
class DirectionResult:
    sent_bytes: int
    sent_sha256: str
    received_bytes: int
    received_sha256: str

    @property
    def intact(self) -> bool:
        return self.sent_bytes == self.received_bytes and self.sent_sha256 == self.received_sha256


@dataclass
class PortResult:
    index: int
    name: str
    console: bool
    guest_to_host: DirectionResult
    host_to_guest: DirectionResult
    stats: PortStats


@dataclass
class SoakResult:
    seconds: float
    ports: list[PortResult] = field(default_factory=list)

    @property
    def bytes_moved(self) -> int:
        """Bytes that arrived, both directions, every port."""
        return sum(p.guest_to_host.received_bytes + p.host_to_guest.received_bytes for p in self.ports)

    @property
    def bytes_lost(self) -> int:
        """Bytes sent that did not arrive (or arrived altered: a digest mismatch counts the stream)."""
        lost = 0
        for port in self.ports:
            for direction in (port.guest_to_host, port.host_to_guest):
                if not direction.intact:
                    lost += max(direction.sent_bytes - direction.received_bytes, 0) or direction.sent_bytes
        return lost

    @property
    def console_drops(self) -> int:
        return sum(p.stats.dropped_bytes for p in self.ports if p.console)


def port_specs(workdir: Path, ports: int, consoles: tuple[int, ...]) -> list[str]:
    specs = []
    for index in range(ports):
        if index in consoles:
            specs.append(f"@socket:con{index}={workdir}/con{index}.sock:server")
        else:
            specs.append(f"socket:ser{index}={workdir}/ser{index}.sock:server")
    return specs


class _HostPeers(threading.Thread):
    """Host side of every port: one selector, writes each port's stream, reads all it gets."""

    def __init__(self, peers: list[socket.socket], streams: list[SeededStream], expected: int):
        super().__init__(name="soak-host", daemon=True)
        self.peers = peers
        self.streams = streams
        self.sinks = [StreamSink() for _ in peers]
        self.expected = expected
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def done(self) -> bool:
        return (all(s.remaining == 0 for s in self.streams)
                and all(s.received >= self.expected for s in self.sinks))

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        pending: list[memoryview] = [memoryview(b"") for _ in self.peers]
        buffer = bytearray(1 << 18)
        try:
            for index, peer in enumerate(self.peers):
                peer.setblocking(False)
                selector.register(peer, selectors.EVENT_READ | selectors.EVENT_WRITE, index)
            while not self.stop.is_set() and not self.done():
                for key, events in selector.select(0.1):
                    index, peer = key.data, key.fileobj
                    if events & selectors.EVENT_READ:
                        count = peer.recv_into(buffer)
                        if not count:
                            raise SoakStuck(f"port {index}: device closed the connection after "
                                            f"{self.sinks[index].received} bytes")
                        self.sinks[index].take(memoryview(buffer)[:count])
                    if events & selectors.EVENT_WRITE:
                        stream = self.streams[index]
                        if not pending[index] and stream.remaining:
                            pending[index] = memoryview(stream.next_chunk())
                        if pending[index]:
                            try:
                                pending[index] = pending[index][peer.send(pending[index]):]
                            except BlockingIOError:
                                pass
                        if not pending[index] and not stream.remaining:
                            selector.modify(peer, selectors.EVENT_READ, index)
        except BaseException as exc:  # reported by the guest thread
            self.error = exc
        finally:
            selector.close()


class SoakRig:
    """A 16-port console (a few '@' console ports), a fake guest and a host peer per port."""

    def __init__(self, workdir: Path, per_direction: int, ports: int = 16,
                 consoles: tuple[int, ...] = (0, 5, 10, 15), seed: int = 1,
                 queue_size: int = 64, guest_buffer: int = 4096):
        self.per_direction = per_direction
        self.nports = ports
        self.consoles = consoles
        self.guest_buffer = guest_buffer
        self.specs = port_specs(workdir, ports, consoles)
        self.loop = EventLoop()
        self.loop.start()
        self.device = VirtioConsole.from_specs([parse_port_spec(s) for s in self.specs], self.loop,
                                               queue_size=queue_size, announce=io.StringIO())
        self.memory = GuestMemory([(0, RAM)])
        self.bus = PciBus()
        self.intx = EventIntx()
        self.transport = VirtioPciLegacy(self.device, self.memory, intx=self.intx, msi=FakeMsiController())
        self.bus.add_device(self.transport, SLOT)
        self.allocator = GuestAllocator(self.memory, 0x10000, RAM)
        self.driver = FakeLegacyPciDriver(self.bus, self.memory, self.allocator, device_id=0x1003)
        self.driver.enable()
        # Host peers connect at once (the backlog holds them until the I/O thread
        # accepts) and start writing before the guest has opened anything.
        self.peers = []
        for spec in self.specs:
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(parse_port_spec(spec).path)
            self.peers.append(peer)
        self.guest_tx = [SeededStream(seed * 1000 + 2 * p, per_direction, guest_buffer) for p in range(ports)]
        self.guest_rx = [StreamSink() for _ in range(ports)]
        host_tx = [SeededStream(seed * 1000 + 2 * p + 1, per_direction, HOST_CHUNK_MAX) for p in range(ports)]
        self.host = _HostPeers(self.peers, host_tx, per_direction)
        # Guest state: fixed buffers per descriptor, per data queue.
        self._buffers: dict[int, list[int]] = {}
        self._tx_free: dict[int, list[int]] = {}
        self._tx_inflight: dict[int, int] = {}
        self._ready: set[int] = set()

    # ---- guest ----------------------------------------------------------------------

    def _send_control(self, port: int, event: int, value: int) -> None:
        self.driver.rings[CONTROL_TX_QUEUE].add(readable=[CONSOLE_CONTROL.pack(port, event, value)])
        self.driver.kick(CONTROL_TX_QUEUE, force=True)

    def _fixed_buffers(self, index: int, writable: bool) -> None:
        ring = self.driver.rings[index]
        addrs = []
        for desc in range(ring.size):
            addr = self.allocator.alloc(self.guest_buffer, align=64)
            addrs.append(addr)
            ring.write_desc(ring.desc, desc, addr, self.guest_buffer, DescFlags.WRITE if writable else 0, 0)
        self._buffers[index] = addrs

    def _kick(self, index: int) -> None:
        if not self.driver.rings[index].used_flags & UsedFlags.NO_NOTIFY:
            self.driver.io_write(REG_QUEUE_NOTIFY, 2, index)

    def _reap(self, index: int) -> list[tuple[int, int]]:
        return self.driver.rings[index].reap_used_elems()

    def _bring_up(self) -> None:
        driver = self.driver
        features = driver.negotiate(F_MULTIPORT)
        assert features & F_MULTIPORT, "device does not offer MULTIPORT"
        max_ports = driver.read_device_config(4, 4)
        assert max_ports == self.nports, f"device reports {max_ports} ports"
        for index in range(2 * self.nports + 2):
            driver.setup_queue(index)
        for _ in range(CONTROL_BUFFERS):
            driver.rings[CONTROL_RX_QUEUE].add(writable=[CONTROL_BUFFER])
        for port in range(self.nports):
            self._fixed_buffers(rx_queue_index(port), writable=True)
            self._fixed_buffers(tx_queue_index(port), writable=False)
            self._tx_free[port] = list(range(driver.rings[tx_queue_index(port)].size))
            self._tx_inflight[port] = 0
        driver.driver_ok()
        self._send_control(BAD_ID, ControlEvent.DEVICE_READY, 1)

    def _handle_control(self) -> None:
        rx = self.driver.rings[CONTROL_RX_QUEUE]
        for used in rx.get_used():
            port, event, value = CONSOLE_CONTROL.unpack_from(used.data)
            if event == ControlEvent.DEVICE_ADD:
                ring = self.driver.rings[rx_queue_index(port)]
                for desc in range(ring.size):
                    ring.publish(desc)
                self._kick(rx_queue_index(port))
                self._send_control(port, ControlEvent.PORT_READY, 1)
            elif event == ControlEvent.CONSOLE_PORT:
                self._send_control(port, ControlEvent.PORT_OPEN, 1)  # init_port_console
            elif event == ControlEvent.PORT_NAME:
                self._ready.add(port)
                if port not in self.consoles:
                    self._send_control(port, ControlEvent.PORT_OPEN, 1)  # userspace opens the vport
            rx.add(writable=[CONTROL_BUFFER])
            self.driver.kick(CONTROL_RX_QUEUE)
        self.driver.rings[CONTROL_TX_QUEUE].get_used()

    def _post_tx(self, port: int) -> None:
        stream = self.guest_tx[port]
        free = self._tx_free[port]
        if not free or not stream.remaining:
            return
        index = tx_queue_index(port)
        ring = self.driver.rings[index]
        while free and stream.remaining:
            desc = free.pop()
            chunk = stream.next_chunk()
            addr = self._buffers[index][desc]
            self.memory.write(addr, chunk)
            ring.write_desc(ring.desc, desc, addr, len(chunk), 0, 0)
            ring.publish(desc)
            self._tx_inflight[port] += 1
        self._kick(index)

    def _pump_data(self, port: int) -> None:
        rx_index = rx_queue_index(port)
        reaped = self._reap(rx_index)
        if reaped:
            ring = self.driver.rings[rx_index]
            for head, length in reaped:
                if length > self.guest_buffer:
                    raise AssertionError(f"port {port}: device used {length} bytes of a "
                                         f"{self.guest_buffer}-byte buffer")
                self.guest_rx[port].take(self.memory.read(self._buffers[rx_index][head], length))
                ring.publish(head)
            self._kick(rx_index)
        for head, _ in self._reap(tx_queue_index(port)):
            self._tx_free[port].append(head)
            self._tx_inflight[port] -= 1

    def _guest_done(self) -> bool:
        return all(s.remaining == 0 for s in self.guest_tx) and \
            not any(self._tx_inflight.values()) and \
            all(s.received >= self.per_direction for s in self.guest_rx)

    def _progress(self) -> str:
        lines = []
        for port, stats in enumerate(self.device.stats()):
            lines.append(f"  {stats.name}: guest sent {self.guest_tx[port].produced} "
                         f"(in flight {self._tx_inflight.get(port)}), host got {self.host.sinks[port].received}; "
                         f"host sent {self.host.streams[port].produced}, guest got {self.guest_rx[port].received}; "
                         f"{stats}")
        return "\n".join(lines)

    def _moved(self) -> int:
        return sum(s.received for s in self.guest_rx) + sum(s.received for s in self.host.sinks)

    def run(self, timeout: float, stall: float = 5.0) -> SoakResult:
        """Stream everything both ways; raise SoakStuck if not done within `timeout` s
        or if no byte arrives anywhere for `stall` s (a lost byte stalls its stream)."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        moved, last_progress = -1, time.monotonic()
        self.host.start()
        self._bring_up()
        while not (self._guest_done() and self.host.done()):
            if self.host.error is not None:
                raise SoakStuck(f"host peer failed: {self.host.error!r}\n{self._progress()}")
            now = time.monotonic()
            if now > deadline:
                raise SoakStuck(f"not done after {timeout} s:\n{self._progress()}")
            if self._moved() != moved:
                moved, last_progress = self._moved(), now
            elif now - last_progress > stall:
                raise SoakStuck(f"no byte arrived for {stall} s:\n{self._progress()}")
            for port in self._ready:
                self._post_tx(port)
            self.intx.event.wait(0.02)
            self.intx.event.clear()
            self.driver.read_isr()
            self._handle_control()
            for port in self._ready:
                self._pump_data(port)
        seconds = time.perf_counter() - started
        self.host.stop.set()
        self.host.join(5)
        # Anything beyond the expected volume (a duplicate) would still be on its way: let it land.
        time.sleep(0.05)
        self.intx.event.clear()
        self.driver.read_isr()
        for port in self._ready:
            self._pump_data(port)
        self._drain_host_extra()
        return self._result(seconds)

    def _drain_host_extra(self) -> None:
        for port, peer in enumerate(self.peers):
            while True:
                try:
                    data = peer.recv(1 << 16)
                except BlockingIOError:
                    break
                if not data:
                    break
                self.host.sinks[port].take(data)

    def _result(self, seconds: float) -> SoakResult:
        result = SoakResult(seconds)
        for port, stats in enumerate(self.device.stats()):
            g2h = DirectionResult(self.guest_tx[port].produced, self.guest_tx[port].digest.hexdigest(),
                                  self.host.sinks[port].received, self.host.sinks[port].digest.hexdigest())
            h2g = DirectionResult(self.host.streams[port].produced, self.host.streams[port].digest.hexdigest(),
                                  self.guest_rx[port].received, self.guest_rx[port].digest.hexdigest())
            result.ports.append(PortResult(port, stats.name, port in self.consoles, g2h, h2g, stats))
        return result

    def close(self) -> None:
        self.host.stop.set()
        if self.host.is_alive():
            self.host.join(5)
        for peer in self.peers:
            peer.close()
        self.device.close()
        self.loop.close()
