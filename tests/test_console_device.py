"""virtio-console over the real legacy PCI transport, driven like Linux's virtio_console.c."""

from __future__ import annotations

import fcntl
import io
import os
import socket
import struct
import termios
import threading

import pytest

from microvmm.eventloop import EventLoop
from microvmm.memory import GuestMemory
from microvmm.pci.bus import PciBus
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from microvmm.virtio_console.control import BAD_ID, ControlEvent
from microvmm.virtio_console.device import (
    CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, ConsoleFeature, VirtioConsole, rx_queue_index,
    tx_queue_index,
)
from microvmm.virtio_console.port import CONSOLE_BUFFER_LIMIT
from microvmm.virtio_console.spec import parse_port_spec
from tests.console_helpers import wait_for
from microvmm.testing.fakes.virtio_driver import (
    F_EVENT_IDX, F_INDIRECT_DESC, STATUS_NEEDS_RESET, FakeIntxLine, FakeLegacyPciDriver,
    FakeMsiController, GuestAllocator,
)

RAM = 32 << 20
SLOT = 4
F_SIZE = 1 << ConsoleFeature.SIZE
F_MULTIPORT = 1 << ConsoleFeature.MULTIPORT
F_EMERG = 1 << ConsoleFeature.EMERG_WRITE
ALL = F_SIZE | F_MULTIPORT | F_EMERG | F_EVENT_IDX | F_INDIRECT_DESC
CTRL = struct.Struct("<IHH")


class FakeConsoleGuest:
    """The guest side of virtio_console.c, reduced to its protocol behaviour."""

    def __init__(self, driver: FakeLegacyPciDriver, rx_buffer: int = 512, control_buffer: int = 4096):
        self.driver = driver
        self.rx_buffer = rx_buffer
        self.control_buffer = control_buffer
        self.lock = threading.Lock()
        self.reset_state()

    def reset_state(self) -> None:
        self.control_log: list[tuple[int, ControlEvent, int, bytes]] = []
        self.received: dict[int, bytearray] = {}
        self.names: dict[int, str] = {}
        self.consoles: set[int] = set()
        self.host_open: dict[int, bool] = {}
        self.sizes: dict[int, tuple[int, int]] = {}
        self.tx_completed: dict[int, int] = {}

    def probe(self, wanted: int = ALL, control_buffers: int = 16, device_ready: bool = True) -> None:
        driver = self.driver
        self.reset_state()
        self.features = driver.negotiate(wanted)
        self.multiport = bool(self.features & F_MULTIPORT)
        self.max_ports = driver.read_device_config(4, 4) if self.multiport else 1
        queues = 2 * self.max_ports + 2 if self.multiport else 2
        for index in range(queues):
            driver.setup_queue(index)
        if self.multiport:
            for _ in range(control_buffers):
                driver.rings[CONTROL_RX_QUEUE].add(writable=[self.control_buffer])
        else:
            self.fill_rx(0)
            self.consoles.add(0)
        driver.driver_ok()
        if self.multiport and device_ready:
            self.send_control(BAD_ID, ControlEvent.DEVICE_READY, 1)

    def fill_rx(self, port: int, count: int = 8) -> None:
        ring = self.driver.rings[rx_queue_index(port)]
        for _ in range(count):
            ring.add(writable=[self.rx_buffer])
        self.driver.kick(rx_queue_index(port))
        self.received.setdefault(port, bytearray())

    def send_control(self, port_id: int, event: int, value: int, extra: bytes = b"") -> None:
        self.driver.rings[CONTROL_TX_QUEUE].add(readable=[CTRL.pack(port_id, event, value) + extra])
        self.driver.kick(CONTROL_TX_QUEUE, force=True)

    def open_port(self, port: int, is_open: bool = True) -> None:
        self.send_control(port, ControlEvent.PORT_OPEN, int(is_open))

    def write(self, port: int, data: bytes) -> None:
        self.driver.rings[tx_queue_index(port)].add(readable=[data])
        self.driver.kick(tx_queue_index(port))

    def tx_room(self, port: int) -> int:
        return len(self.driver.rings[tx_queue_index(port)].free)

    def pump(self) -> None:
        """Handle whatever the device used: control messages, received data, sent buffers."""
        rings = self.driver.rings
        if self.multiport and CONTROL_RX_QUEUE in rings:
            for used in rings[CONTROL_RX_QUEUE].get_used():
                self.handle_control(used.data)
                rings[CONTROL_RX_QUEUE].add(writable=[self.control_buffer])
                self.driver.kick(CONTROL_RX_QUEUE)
            rings[CONTROL_TX_QUEUE].get_used()
        for port in list(self.received):
            ring = rings[rx_queue_index(port)]
            for used in ring.get_used():
                self.received[port] += used.data
                ring.add(writable=[self.rx_buffer])
                self.driver.kick(rx_queue_index(port))
        for port in range(self.max_ports):
            index = tx_queue_index(port)
            if index in rings:
                self.tx_completed[port] = self.tx_completed.get(port, 0) + len(rings[index].get_used())

    def handle_control(self, data: bytes) -> None:
        port_id, event, value = CTRL.unpack_from(data)
        payload = data[CTRL.size:]
        self.control_log.append((port_id, ControlEvent(event), value, payload))
        if event == ControlEvent.DEVICE_ADD:
            self.fill_rx(port_id)
            self.send_control(port_id, ControlEvent.PORT_READY, 1)
        elif event == ControlEvent.CONSOLE_PORT:
            self.consoles.add(port_id)
            self.open_port(port_id)  # init_port_console tells the host it is open
        elif event == ControlEvent.PORT_NAME:
            self.names[port_id] = payload.decode()
        elif event == ControlEvent.PORT_OPEN:
            self.host_open[port_id] = bool(value)
        elif event == ControlEvent.RESIZE:
            self.sizes[port_id] = struct.unpack("<HH", payload[:4])

    def until(self, predicate, timeout: float = 5.0) -> bool:
        def check():
            self.pump()
            return predicate()
        return wait_for(check, timeout)

    def events(self, port_id: int) -> list[tuple[ControlEvent, int]]:
        return [(event, value) for pid, event, value, _ in self.control_log if pid == port_id]


class Env:
    def __init__(self, tmp_path, specs: list[str], queue_size: int = 64):
        self.tmp = tmp_path
        self.loop = EventLoop()
        self.loop.start()
        self.announce = io.StringIO()
        self.device = VirtioConsole.from_specs([parse_port_spec(s) for s in specs], self.loop,
                                               queue_size=queue_size, announce=self.announce)
        self.memory = GuestMemory([(0, RAM)])
        self.bus = PciBus()
        self.intx, self.msi = FakeIntxLine(), FakeMsiController()
        self.transport = VirtioPciLegacy(self.device, self.memory, intx=self.intx, msi=self.msi)
        self.bus.add_device(self.transport, SLOT)
        self.driver = FakeLegacyPciDriver(self.bus, self.memory, GuestAllocator(self.memory, 0x10000, RAM),
                                          device_id=0x1003, transport=self.transport)
        self.driver.enable()
        self.guest = FakeConsoleGuest(self.driver)

    def connect(self, name: str) -> socket.socket:
        peer = socket.socket(socket.AF_UNIX)
        peer.connect(str(self.tmp / name))
        return peer

    def needs_reset(self) -> bool:
        return bool(self.driver.status & STATUS_NEEDS_RESET)

    def close(self):
        self.device.close()
        self.loop.close()
        # (guest memory stays mapped: the queues hold views into it until collected)


@pytest.fixture
def make_env(tmp_path):
    envs = []

    def make(specs, **kwargs):
        env = Env(tmp_path, [s.format(tmp=tmp_path) for s in specs], **kwargs)
        envs.append(env)
        return env
    yield make
    for env in envs:
        env.close()


def recv_exact(peer: socket.socket, count: int, timeout: float = 10.0) -> bytes:
    peer.settimeout(timeout)
    data = bytearray()
    while len(data) < count:
        chunk = peer.recv(count - len(data))
        assert chunk, f"peer closed after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


THREE_PORTS = ["@socket:con={tmp}/con.sock:server", "socket:data={tmp}/data.sock:server",
               "file:log={tmp}/log.txt"]


def test_identity_features_and_config(make_env):
    env = make_env(THREE_PORTS, queue_size=32)
    assert env.driver.config_read(0, 4) == 0x1003_1AF4
    assert env.transport.num_queues == 8
    host = env.driver.io_read(0, 4)
    assert host & (F_SIZE | F_MULTIPORT | F_EMERG) == F_SIZE | F_MULTIPORT | F_EMERG
    assert env.driver.read_device_config(4, 4) == 3  # max_nr_ports
    env.driver.io_write(14, 2, 7)
    assert env.driver.io_read(12, 2) == 32  # configurable queue size


def test_multiport_bring_up(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: len(guest.names) == 3)
    assert guest.names == {0: "con", 1: "data", 2: "log"}
    # Each port: DEVICE_ADD first; after PORT_READY the console flag, the name,
    # and PORT_OPEN only where something is connected (the file always is).
    assert guest.events(0) == [(ControlEvent.DEVICE_ADD, 1), (ControlEvent.CONSOLE_PORT, 1),
                               (ControlEvent.PORT_NAME, 1)]
    assert guest.events(1) == [(ControlEvent.DEVICE_ADD, 1), (ControlEvent.PORT_NAME, 1)]
    assert guest.events(2) == [(ControlEvent.DEVICE_ADD, 1), (ControlEvent.PORT_NAME, 1),
                               (ControlEvent.PORT_OPEN, 1)]
    adds = [i for i, (_, event, _, _) in enumerate(guest.control_log) if event == ControlEvent.DEVICE_ADD]
    assert adds == [0, 1, 2]
    assert guest.consoles == {0}
    assert not env.needs_reset()


def test_port_open_follows_socket_peer(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: len(guest.names) == 3)
    peer = env.connect("data.sock")
    assert guest.until(lambda: guest.host_open.get(1) is True)
    peer.close()
    assert guest.until(lambda: guest.host_open.get(1) is False)
    peer = env.connect("data.sock")
    assert guest.until(lambda: guest.host_open.get(1) is True)
    peer.close()


def test_data_both_ways_on_a_serial_port(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    peer = env.connect("data.sock")
    assert guest.until(lambda: guest.host_open.get(1) is True)
    peer.sendall(b"typed before the guest opened the port")
    threading.Event().wait(0.1)
    guest.pump()
    assert guest.received[1] == b""  # Linux would discard it: the device holds it back
    guest.open_port(1)
    assert guest.until(lambda: bytes(guest.received[1]) == b"typed before the guest opened the port")
    out = b"guest \x00\xff output"
    guest.write(1, out)
    assert recv_exact(peer, len(out)) == out
    big = os.urandom(5000)  # larger than the guest's 512-byte receive buffers
    peer.sendall(big)
    assert guest.until(lambda: len(guest.received[1]) == 38 + 5000)
    assert bytes(guest.received[1][38:]) == big
    stats = env.device.stats()[1]
    assert (stats.name, stats.to_host_bytes, stats.to_guest_bytes, stats.dropped_bytes) == ("data", len(out), 5038, 0)
    peer.close()


def test_console_port_output_and_input(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    peer = env.connect("con.sock")
    assert guest.until(lambda: guest.host_open.get(0) is True)
    guest.write(0, b"login: ")
    assert recv_exact(peer, 7) == b"login: "
    peer.sendall(b"root\r")
    assert guest.until(lambda: bytes(guest.received[0]) == b"root\r")
    peer.close()


def test_file_port_output(make_env, tmp_path):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: 2 in guest.names)
    guest.open_port(2)
    guest.write(2, b"log line\n")
    assert wait_for(lambda: (tmp_path / "log.txt").read_bytes() == b"log line\n")


def test_console_resize_and_pty_size_changes(make_env):
    env = make_env(["@pty:con", "pty:other"])
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: len(guest.names) == 2)
    env.device.resize(0, 132, 43)
    assert guest.until(lambda: guest.sizes.get(0) == (132, 43))  # spec order: cols, rows
    assert env.driver.read_device_config(0, 2) == 132 and env.driver.read_device_config(2, 2) == 43
    # A terminal emulator resizing the pty slave is noticed without any signal.
    path = env.device.ports[0].backend.path
    slave = os.open(path, os.O_RDWR | os.O_NOCTTY)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    assert guest.until(lambda: guest.sizes.get(0) == (160, 50))
    # RESIZE goes to console ports only.
    env.device.resize(1, 10, 10)
    threading.Event().wait(0.1)
    guest.pump()
    assert 1 not in guest.sizes
    os.close(slave)
    assert "virt-console backend redirected to /dev/pts/" in env.announce.getvalue()


def test_pty_reader_drives_port_open(make_env):
    env = make_env(["@pty:con"])
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: 0 in guest.names)
    assert 0 not in guest.host_open
    slave = os.open(env.device.ports[0].backend.path, os.O_RDWR | os.O_NOCTTY)
    assert guest.until(lambda: guest.host_open.get(0) is True)
    guest.write(0, b"hello pty")
    assert wait_for(lambda: True)
    data = b""
    while len(data) < 9:
        data += os.read(slave, 100)
    assert data == b"hello pty"
    os.close(slave)
    assert guest.until(lambda: guest.host_open.get(0) is False)


def test_output_tap_sees_console_output_when_the_guest_prints_it(make_env):
    """The VMM's monitor (--expect, --log, failure watch) sees what the guest
    printed on a console even while no one has the pty open (the bytes wait
    in the port), once; a serial port's bytes when its backend takes them."""
    env = make_env(["@pty:con", "socket:data={tmp}/data.sock:server"])
    tapped: list[tuple[str, bytes]] = []
    env.device.output_tap = lambda name, data: tapped.append((name, bytes(data)))
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: 0 in guest.consoles and 1 in guest.names)
    guest.write(0, b"microvmm: init reached\n")
    assert guest.until(lambda: guest.tx_room(0) == 64)  # console buffers are used at once
    assert wait_for(lambda: tapped == [("con", b"microvmm: init reached\n")])
    assert env.device.stats()[0].buffered_bytes == len(b"microvmm: init reached\n")
    slave = os.open(env.device.ports[0].backend.path, os.O_RDWR | os.O_NOCTTY)
    try:
        data = b""
        while len(data) < len(b"microvmm: init reached\n"):
            data += os.read(slave, 100)
        assert data == b"microvmm: init reached\n"
        assert wait_for(lambda: env.device.stats()[0].buffered_bytes == 0)
        assert tapped == [("con", b"microvmm: init reached\n")]  # not seen twice
    finally:
        os.close(slave)
    peer = env.connect("data.sock")
    assert guest.until(lambda: guest.host_open.get(1) is True)
    guest.open_port(1)
    guest.write(1, b"data bytes")
    assert recv_exact(peer, 10) == b"data bytes"
    assert wait_for(lambda: ("data", b"data bytes") in tapped)
    peer.close()


def test_emergency_write_before_and_after_driver_ok(make_env):
    env = make_env(THREE_PORTS)
    peer = env.connect("con.sock")
    env.driver.negotiate(ALL)
    for char in b"EW":
        env.driver.write_device_config(8, 4, char)  # before DRIVER_OK: early console
    assert recv_exact(peer, 2) == b"EW"
    env.guest.probe()
    for index, char in enumerate(b"!\n"):
        for offset, byte in enumerate(char.to_bytes(4, "little")):  # legacy byte-wise cwrite
            env.driver.write_device_config(8 + offset, 1, byte)
    assert recv_exact(peer, 2) == b"!\n"
    assert env.driver.read_device_config(8, 4) == 0
    peer.close()


def test_serial_port_backpressure_without_loss(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    peer = env.connect("data.sock")
    assert guest.until(lambda: guest.host_open.get(1) is True)
    guest.open_port(1)
    chunk = 4096
    payload = os.urandom(4 << 20)  # far more than the socket buffers hold
    sent = 0
    # Write until the guest's tx ring is full: the device must stop using buffers.
    while guest.tx_room(1) and sent < len(payload):
        guest.write(1, payload[sent:sent + chunk])
        sent += chunk
    threading.Event().wait(0.2)
    guest.pump()
    assert guest.tx_room(1) < 64, "a non-reading peer must leave guest buffers in flight"
    assert env.device.stats()[1].dropped_bytes == 0

    received = bytearray()

    def reader():
        peer.settimeout(20)
        while len(received) < len(payload):
            data = peer.recv(1 << 16)
            if not data:
                break
            received.extend(data)
    thread = threading.Thread(target=reader)
    thread.start()
    while sent < len(payload):
        guest.pump()
        while guest.tx_room(1) and sent < len(payload):
            guest.write(1, payload[sent:sent + chunk])
            sent += chunk
        threading.Event().wait(0.001)
    thread.join(30)
    assert bytes(received) == payload
    assert guest.until(lambda: guest.tx_room(1) == 64)
    stats = env.device.stats()[1]
    assert stats.to_host_bytes == len(payload) and stats.dropped_bytes == 0
    peer.close()


def test_console_output_is_held_then_dropped_beyond_limit(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: 0 in guest.consoles)
    payload = os.urandom(CONSOLE_BUFFER_LIMIT + 300 * 1024)
    chunk = 4096
    sent = 0
    while sent < len(payload):  # no peer: every buffer is still used at once (hvc spins)
        while guest.tx_room(0) and sent < len(payload):
            guest.write(0, payload[sent:sent + chunk])
            sent += chunk
        assert guest.until(lambda: guest.tx_room(0) == 64)
    stats = env.device.stats()[0]
    assert stats.buffered_bytes == CONSOLE_BUFFER_LIMIT
    assert stats.dropped_bytes == len(payload) - CONSOLE_BUFFER_LIMIT
    peer = env.connect("con.sock")
    assert recv_exact(peer, CONSOLE_BUFFER_LIMIT) == payload[:CONSOLE_BUFFER_LIMIT]
    assert wait_for(lambda: env.device.stats()[0].buffered_bytes == 0)
    peer.close()


def test_control_messages_queue_until_buffers_arrive(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe(control_buffers=1)
    # One control buffer at a time: the guest reposts after each, order is kept.
    assert guest.until(lambda: len(guest.names) == 3)
    assert [event for _, event, _, _ in guest.control_log][:3] == [ControlEvent.DEVICE_ADD] * 3


@pytest.mark.parametrize("message", [
    CTRL.pack(0, ControlEvent.PORT_READY, 1)[:6],           # short
    CTRL.pack(7, ControlEvent.PORT_READY, 1),               # port id beyond max_nr_ports
    CTRL.pack(0, 99, 1),                                    # unknown event
    CTRL.pack(0, ControlEvent.DEVICE_ADD, 1),               # host-only event
])
def test_malformed_control_needs_reset(make_env, message):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: len(guest.names) == 3)
    env.driver.rings[CONTROL_TX_QUEUE].add(readable=[message])
    env.driver.kick(CONTROL_TX_QUEUE, force=True)
    assert wait_for(env.needs_reset)


def test_port_ready_before_device_add_needs_reset(make_env):
    env = make_env(THREE_PORTS)
    env.guest.probe(device_ready=False)  # so the device never announced any port
    env.guest.send_control(1, ControlEvent.PORT_READY, 1)
    assert wait_for(env.needs_reset)


def test_short_control_receive_buffer_needs_reset(make_env):
    env = make_env(THREE_PORTS)
    env.guest.control_buffer = 4
    env.guest.probe()
    assert wait_for(env.needs_reset)


def test_bad_descriptor_needs_reset_via_loop_thread_kick(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: len(guest.names) == 3)
    ring = env.driver.rings[tx_queue_index(1)]
    ring.write_desc(ring.desc, 0, RAM + 4096, 16, 0, 0)  # buffer outside guest RAM
    ring.publish(0)
    env.loop.call_soon_threadsafe(lambda: env.transport.queue_notify(tx_queue_index(1)))  # ioeventfd path
    assert wait_for(env.needs_reset)


def test_reset_and_bring_up_again(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    peer = env.connect("data.sock")
    assert guest.until(lambda: guest.host_open.get(1) is True)
    guest.open_port(1)
    guest.write(1, b"first life")
    assert recv_exact(peer, 10) == b"first life"
    env.driver.reset()
    assert env.driver.status == 0
    guest.probe()
    assert guest.until(lambda: guest.host_open.get(1) is True and len(guest.names) == 3)
    guest.open_port(1)
    guest.write(1, b"second life")
    assert recv_exact(peer, 11) == b"second life"
    peer.sendall(b"back")
    assert guest.until(lambda: bytes(guest.received[1]) == b"back")
    peer.close()


def test_reset_after_failure_recovers(make_env):
    env = make_env(THREE_PORTS)
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: len(guest.names) == 3)
    guest.send_control(0, 42, 0)
    assert wait_for(env.needs_reset)
    env.driver.reset()
    guest.probe()
    assert guest.until(lambda: len(guest.names) == 3)
    assert not env.needs_reset()


def test_single_port_mode_without_multiport(make_env):
    env = make_env(["@pty:con"])
    guest = env.guest
    slave = os.open(env.device.ports[0].backend.path, os.O_RDWR | os.O_NOCTTY)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 25, 80, 0, 0))
    # The pty backend notices the new size on its next check (no signal reaches us).
    assert wait_for(lambda: env.device.read_config(0, 4) == 80 | 25 << 16)
    guest.probe(wanted=F_SIZE | F_EVENT_IDX)
    assert not guest.multiport
    assert (env.driver.read_device_config(0, 2), env.driver.read_device_config(2, 2)) == (80, 25)
    assert wait_for(lambda: env.device.ports[0].backend.connected)
    guest.write(0, b"single")
    data = b""
    while len(data) < 6:
        data += os.read(slave, 100)
    assert data == b"single"
    os.write(slave, b"key")
    assert guest.until(lambda: bytes(guest.received[0]) == b"key")
    asserts = env.intx.asserts
    isr_config = 2
    env.device.resize(0, 100, 40)
    assert wait_for(lambda: env.intx.asserts > asserts)
    assert env.driver.read_isr() & isr_config
    assert (env.driver.read_device_config(0, 2), env.driver.read_device_config(2, 2)) == (100, 40)
    os.close(slave)
