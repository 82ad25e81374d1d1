"""Run-time port changes (virtio_console/hotplug.py) over the real legacy PCI
transport, with the fake virtio_console.c driver of test_console_device.py:
the control messages each change sends and what reaches the host ends."""

from __future__ import annotations

import io
import socket

import pytest

from microvmm.eventloop import EventLoop
from microvmm.memory import GuestMemory
from microvmm.pci.bus import PciBus
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from microvmm.virtio_console.backends import create_backend
from microvmm.virtio_console.control import ControlEvent
from microvmm.virtio_console.device import VirtioConsole
from microvmm.virtio_console.hotplug import PortControlError
from microvmm.virtio_console.spec import MAX_PORTS, parse_port_spec
from tests.test_console_device import ALL, F_MULTIPORT, RAM, SLOT, FakeConsoleGuest, Env
from microvmm.testing.fakes.virtio_driver import FakeIntxLine, FakeLegacyPciDriver, FakeMsiController, GuestAllocator


class HotplugEnv(Env):
    """Env with a console that advertises MAX_PORTS port ids (as with --control)."""

    def __init__(self, tmp_path, specs: list[str]):  # noqa: super().__init__ builds a fixed-size console
        self.tmp = tmp_path
        self.loop = EventLoop()
        self.loop.start()
        self.announce = io.StringIO()
        opened = [(spec, create_backend(spec)) for spec in map(parse_port_spec, specs)]
        self.device = VirtioConsole(opened, self.loop, max_ports=MAX_PORTS)
        self.memory = GuestMemory([(0, RAM)])
        self.bus = PciBus()
        self.intx, self.msi = FakeIntxLine(), FakeMsiController()
        self.transport = VirtioPciLegacy(self.device, self.memory, intx=self.intx, msi=self.msi)
        self.bus.add_device(self.transport, SLOT)
        self.driver = FakeLegacyPciDriver(self.bus, self.memory, GuestAllocator(self.memory, 0x10000, RAM),
                                          device_id=0x1003, transport=self.transport)
        self.driver.enable()
        self.guest = FakeConsoleGuest(self.driver)

    def add(self, text: str) -> int:
        spec = parse_port_spec(text.format(tmp=self.tmp))
        return self.device.add_port(spec, create_backend(spec))


@pytest.fixture
def env(tmp_path):
    made = HotplugEnv(tmp_path, ["socket:first={}/first.sock:server".format(tmp_path)])
    yield made
    made.close()


def up(env: HotplugEnv) -> FakeConsoleGuest:
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: guest.names == {0: "first"})
    return guest


def test_capacity_is_advertised_and_an_added_port_carries_data(env):
    guest = up(env)
    assert guest.max_ports == MAX_PORTS
    assert env.transport.num_queues == 2 * MAX_PORTS + 2
    assert env.add("socket:hot={tmp}/hot.sock:server") == 1
    assert guest.until(lambda: guest.names.get(1) == "hot")
    assert guest.events(1) == [(ControlEvent.DEVICE_ADD, 1), (ControlEvent.PORT_NAME, 1)]
    peer = env.connect("hot.sock")
    assert guest.until(lambda: guest.host_open.get(1) is True)
    guest.open_port(1)
    peer.sendall(b"in")
    assert guest.until(lambda: bytes(guest.received[1]) == b"in")
    guest.write(1, b"out")
    peer.settimeout(5)
    assert peer.recv(10) == b"out"
    assert [s["name"] for s in env.device.port_states()] == ["first", "hot"]
    assert not env.needs_reset()
    peer.close()


def test_changes_wait_for_the_driver_and_need_multiport(tmp_path):
    env = HotplugEnv(tmp_path, ["file:log={}/log".format(tmp_path)])
    try:
        with pytest.raises(PortControlError) as err:
            env.add("file:x={tmp}/x")
        assert err.value.code == "not-ready"
        env.guest.probe(wanted=ALL & ~F_MULTIPORT)
        with pytest.raises(PortControlError) as err:
            env.add("file:x={tmp}/x")
        assert err.value.code == "no-multiport"
    finally:
        env.close()


def test_remove_takes_what_the_guest_queued_then_closes_the_host_end(env):
    guest = up(env)
    env.add("socket:gone={tmp}/gone.sock:server")
    assert guest.until(lambda: guest.names.get(1) == "gone")
    peer = env.connect("gone.sock")
    assert guest.until(lambda: guest.host_open.get(1) is True)
    guest.open_port(1)
    chunks = [bytes([i]) * 3000 for i in range(40)]  # more than the socket takes at once
    for chunk in chunks:
        while not guest.tx_room(1):
            guest.pump()
        guest.write(1, chunk)
    assert env.device.remove_port("gone") == 1
    assert guest.until(lambda: (ControlEvent.DEVICE_REMOVE, 1) in guest.events(1))
    peer.settimeout(10)
    received = bytearray()
    while data := peer.recv(65536):
        received += data
    assert bytes(received) == b"".join(chunks)  # every byte, then end-of-file
    assert env.device.find_port("gone") is None
    assert not env.needs_reset()
    peer.close()


def test_ids_are_not_reused_and_run_out(env):
    guest = up(env)
    env.add("file:a={tmp}/a")
    env.device.remove_port("a")
    assert env.add("file:a={tmp}/a2") == 2
    for index in range(3, MAX_PORTS):
        assert env.add(f"file:p{index}={{tmp}}/p{index}") == index
    with pytest.raises(PortControlError) as err:
        env.add("file:last={tmp}/last")
    assert err.value.code == "no-port-id"
    assert guest.until(lambda: len(guest.names) == MAX_PORTS - 1)
    assert not env.needs_reset()


def test_close_and_open_the_host_end(env):
    guest = up(env)
    peer = env.connect("first.sock")
    assert guest.until(lambda: guest.host_open.get(0) is True)
    guest.open_port(0)
    assert env.device.set_host_open("first", False) is False
    assert guest.until(lambda: guest.host_open.get(0) is False)
    peer.sendall(b"held back")
    assert not guest.until(lambda: guest.received[0], timeout=0.5)  # nothing while closed
    assert env.device.set_host_open("first", True) is True
    assert guest.until(lambda: guest.host_open.get(0) is True)
    assert guest.until(lambda: bytes(guest.received[0]) == b"held back")
    peer.close()


def test_resize_a_console_and_refuse_others(env):
    guest = up(env)
    env.add("@file:con={tmp}/con")
    assert guest.until(lambda: 1 in guest.consoles and guest.names.get(1) == "con")
    env.device.resize_port("con", 132, 43)
    assert guest.until(lambda: guest.sizes.get(1) == (132, 43))
    with pytest.raises(PortControlError) as err:
        env.device.resize_port("first", 80, 24)
    assert err.value.code == "not-a-console"


def test_send_reaches_the_guest_without_a_peer(env):
    guest = up(env)
    guest.open_port(0)
    assert 0 <= env.device.send_to_port("first", b"injected") <= len(b"injected")  # still waiting
    assert guest.until(lambda: bytes(guest.received[0]) == b"injected")
    with pytest.raises(PortControlError) as err:
        env.device.send_to_port("nosuch", b"x")
    assert err.value.code == "unknown-port"
