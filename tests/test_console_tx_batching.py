"""Guest->host batching: pending transmit chains leave in one backend write.

The device gathers the readable buffers of every chain waiting on a port's
transmit queue and hands them to the backend in one `write_vectored` call; a
short write completes exactly the chains wholly written, keeps the cut chain
pending from the right byte and puts the rest back in the ring.
"""

from __future__ import annotations

import io
import threading

import pytest

from microvmm.eventloop import EventLoop
from microvmm.memory import GuestMemory
from microvmm.pci.bus import PciBus
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from microvmm.virtio_console.backends import PortBackend
from microvmm.virtio_console.device import ConsoleFeature, VirtioConsole, tx_queue_index
from microvmm.virtio_console.spec import parse_port_spec
from tests.console_helpers import run_on_loop, wait_for
from tests.test_console_device import FakeConsoleGuest
from microvmm.testing.fakes.virtio_driver import (
    STATUS_NEEDS_RESET, FakeIntxLine, FakeLegacyPciDriver, FakeMsiController, GuestAllocator,
)

RAM = 32 << 20
SLOT = 4
# No EVENT_IDX: every batch that uses buffers interrupts, so interrupts count batches.
FEATURES = 1 << ConsoleFeature.SIZE | 1 << ConsoleFeature.MULTIPORT


class RecordingBackend(PortBackend):
    """A sink that records every write call and takes at most `budget` bytes in all."""

    def __init__(self, name: str):
        super().__init__(name)
        self._connected = True
        self.calls: list[list[bytes]] = []
        self.data = bytearray()
        self.budget: int | None = None  # None: take everything
        self.lock = threading.Lock()

    def _take(self, buffers: list[bytes]) -> int:
        with self.lock:
            self.calls.append(buffers)
            wanted = sum(map(len, buffers))
            taken = wanted if self.budget is None else min(wanted, self.budget)
            if self.budget is not None:
                self.budget -= taken
            self.data += b"".join(buffers)[:taken]
            return taken

    def write(self, data) -> int:
        return self._take([bytes(data)])

    def write_vectored(self, buffers) -> int:
        return self._take([bytes(b) for b in buffers])


class Rig:
    def __init__(self, console: bool):
        self.loop = EventLoop()
        self.loop.start()
        self.backend = RecordingBackend("data")
        spec = parse_port_spec(("@" if console else "") + "socket:data=/nonexistent/unused.sock:server")
        self.device = VirtioConsole([(spec, self.backend)], self.loop, queue_size=64)
        self.memory = GuestMemory([(0, RAM)])
        self.bus = PciBus()
        self.intx = FakeIntxLine()
        self.transport = VirtioPciLegacy(self.device, self.memory, intx=self.intx, msi=FakeMsiController())
        self.bus.add_device(self.transport, SLOT)
        self.driver = FakeLegacyPciDriver(self.bus, self.memory, GuestAllocator(self.memory, 0x10000, RAM),
                                          device_id=0x1003, transport=self.transport)
        self.driver.enable()
        self.guest = FakeConsoleGuest(self.driver)
        self.guest.probe(wanted=FEATURES)
        assert self.guest.until(lambda: 0 in self.guest.names)
        self.guest.open_port(0)
        assert self.guest.until(lambda: self.device.ports[0].guest_open)
        self.ring = self.driver.rings[tx_queue_index(0)]
        self.port = self.device.ports[0]

    def quiesce(self) -> None:
        """Let every posted loop task run."""
        run_on_loop(self.loop, lambda: None)

    def post(self, payloads: list[bytes]) -> list[int]:
        """Post several chains, then kick once (as virtio_console does after a burst)."""
        heads = [self.ring.add(readable=[payload]) for payload in payloads]
        self.driver.kick(tx_queue_index(0), force=True)
        self.quiesce()
        return heads

    def backend_writable(self) -> None:
        run_on_loop(self.loop, lambda: self.backend._listener.backend_writable())

    def needs_reset(self) -> bool:
        return bool(self.driver.status & STATUS_NEEDS_RESET)

    def close(self) -> None:
        self.device.close()
        self.loop.close()


@pytest.fixture
def make_rig():
    rigs = []

    def make(console: bool = False) -> Rig:
        rig = Rig(console)
        rigs.append(rig)
        return rig
    yield make
    for rig in rigs:
        rig.close()


PAYLOADS = [bytes([65 + i]) * (100 + i) for i in range(5)]  # distinct bytes and lengths


def test_pending_chains_leave_in_one_write_call_with_one_interrupt(make_rig):
    rig = make_rig()
    asserts = rig.intx.asserts
    heads = rig.post(PAYLOADS)
    assert rig.backend.calls == [PAYLOADS], "five pending chains, one vectored write, in order"
    used = rig.ring.get_used()
    assert [u.head for u in used] == heads
    assert rig.intx.asserts - asserts == 1, "one interrupt for the whole batch"
    assert rig.device.stats()[0].to_host_bytes == sum(map(len, PAYLOADS))


def test_short_write_in_the_middle_completes_exactly_the_written_chains(make_rig):
    rig = make_rig()
    rig.backend.budget = len(PAYLOADS[0]) + 30  # all of chain 0, 30 bytes of chain 1
    heads = rig.post(PAYLOADS)
    assert [u.head for u in rig.ring.get_used()] == heads[:1]
    assert rig.port.pending is not None and rig.port.pending.head == heads[1]
    assert rig.port.pending.offset == 30
    queue = rig.transport.queues[tx_queue_index(0)]
    assert queue.last_avail_idx == 2, "chains after the cut one stay in the ring, unconsumed"
    assert rig.device.stats()[0].buffered_bytes == len(PAYLOADS[1]) - 30

    rig.backend.budget = None
    calls_before = len(rig.backend.calls)
    rig.backend_writable()
    assert bytes(rig.backend.data) == b"".join(PAYLOADS), "no loss, no duplicate, order kept"
    resumed = rig.backend.calls[calls_before:]
    assert resumed == [[PAYLOADS[1][30:]] + PAYLOADS[2:]], \
        "the cut chain resumes at its first unwritten byte, the chains put back follow in the same write"
    assert [u.head for u in rig.ring.get_used()] == heads[1:]
    assert rig.port.pending is None


def test_short_write_on_a_chain_boundary_keeps_the_next_chain_whole(make_rig):
    rig = make_rig()
    rig.backend.budget = len(PAYLOADS[0]) + len(PAYLOADS[1])
    heads = rig.post(PAYLOADS)
    assert [u.head for u in rig.ring.get_used()] == heads[:2]
    assert rig.port.pending is not None and rig.port.pending.head == heads[2]
    assert rig.port.pending.offset == 0
    rig.backend.budget = None
    rig.backend_writable()
    assert bytes(rig.backend.data) == b"".join(PAYLOADS)
    assert [u.head for u in rig.ring.get_used()] == heads[2:]


def test_short_write_inside_the_pending_chain_keeps_it_pending(make_rig):
    rig = make_rig()
    rig.backend.budget = 30
    heads = rig.post(PAYLOADS)
    assert rig.port.pending.head == heads[0] and rig.port.pending.offset == 30
    rig.backend.budget = 20  # still not the whole of chain 0
    rig.backend_writable()
    assert rig.port.pending.head == heads[0] and rig.port.pending.offset == 50
    assert rig.ring.get_used() == []
    assert rig.transport.queues[tx_queue_index(0)].last_avail_idx == 1
    rig.backend.budget = None
    rig.backend_writable()
    assert bytes(rig.backend.data) == b"".join(PAYLOADS)
    assert [u.head for u in rig.ring.get_used()] == heads
    assert rig.port.pending is None


def test_blocked_backend_uses_nothing_until_writable(make_rig):
    rig = make_rig()
    rig.backend.budget = 0
    rig.post(PAYLOADS)
    assert rig.ring.get_used() == []
    assert rig.transport.queues[tx_queue_index(0)].last_avail_idx == 1  # only the pending chain
    rig.backend.budget = None
    rig.backend_writable()
    assert bytes(rig.backend.data) == b"".join(PAYLOADS)
    assert len(rig.ring.get_used()) == len(PAYLOADS)


def test_console_port_uses_the_whole_batch_and_holds_the_rest_in_order(make_rig):
    rig = make_rig(console=True)
    rig.backend.budget = 150
    heads = rig.post(PAYLOADS)
    assert [u.head for u in rig.ring.get_used()] == heads, "hvc spins: every chain is used at once"
    total = sum(map(len, PAYLOADS))
    assert rig.device.stats()[0].buffered_bytes == total - 150
    rig.backend.budget = None
    rig.backend_writable()
    assert bytes(rig.backend.data) == b"".join(PAYLOADS)
    assert rig.device.stats()[0].buffered_bytes == 0


def test_bad_descriptor_mid_batch_fails_after_the_good_chains_and_consumes_nothing_after(make_rig):
    rig = make_rig()
    heads = [rig.ring.add(readable=[payload]) for payload in PAYLOADS[:2]]
    bad = rig.ring.add(readable=[b"x" * 16])
    rig.ring.write_desc(rig.ring.desc, bad, RAM + 4096, 16, 0, 0)  # buffer outside guest RAM
    rig.ring.add(readable=[PAYLOADS[3]])
    rig.driver.kick(tx_queue_index(0), force=True)
    assert wait_for(rig.needs_reset)
    rig.quiesce()
    assert bytes(rig.backend.data) == PAYLOADS[0] + PAYLOADS[1], "nothing at or after the bad chain"
    assert [u.head for u in rig.ring.get_used()] == heads
