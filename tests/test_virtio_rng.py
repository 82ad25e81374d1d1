"""virtio-rng driven by the fake Linux-like front-end over a real PciBus and the
legacy transport: filling requests, the rate limit (a fake clock and loop),
hostile requests (NEEDS_RESET, logged once) and its --device options."""

from __future__ import annotations

import logging

import pytest

from microvmm.devices.virtio_rng import MAX_REQUEST_BYTES, RngOptions, VirtioRng, parse_options
from microvmm.devmgr.registry import DeviceOptionError, parse_device_option
from microvmm.memory import GuestMemory
from microvmm.pci.bus import PciBus
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from microvmm.testing.fakes.virtio_driver import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    STATUS_NEEDS_RESET,
    FakeIntxLine,
    FakeLegacyPciDriver,
    FakeMsiController,
    GuestAllocator,
)

RAM = 4 << 20
SLOT = 2
REQUESTQ = 0


class InlineLoop:
    """Runs posted work at once; keeps call_later timers for the test to fire."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, object]] = []

    def in_loop_thread(self) -> bool:
        return True

    def call_soon_threadsafe(self, callback) -> None:
        callback()

    def call_later(self, delay: float, callback):
        from microvmm.eventloop import TimerHandle
        handle = TimerHandle(delay, len(self.timers), callback)
        self.timers.append((delay, handle))
        return handle

    def fire_timers(self) -> None:
        timers, self.timers = self.timers, []
        for _, handle in timers:
            if not handle.cancelled:
                handle.callback()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_env(options: RngOptions = RngOptions(), entropy=None):
    memory = GuestMemory([(0, RAM)])
    bus = PciBus()
    loop, clock = InlineLoop(), Clock()
    device = VirtioRng(loop, options, queue_size=16, clock=clock,
                       **({"entropy": entropy} if entropy else {}))
    intx = FakeIntxLine()
    transport = VirtioPciLegacy(device, memory, intx=intx, msi=FakeMsiController())
    bus.add_device(transport, SLOT)
    driver = FakeLegacyPciDriver(bus, memory, GuestAllocator(memory, 0x10000, RAM),
                                 device_id=0x1005, transport=transport)
    driver.enable()
    driver.negotiate(F_EVENT_IDX | F_INDIRECT_DESC)
    queue = driver.setup_queue(REQUESTQ)
    driver.driver_ok()
    return driver, queue, device, loop, clock, intx


def test_identity_is_the_legacy_entropy_device():
    driver, *_ = make_env()
    ids = driver.config_read(0, 4)
    assert ids == 0x1005 << 16 | 0x1AF4
    assert driver.config_read(0x2E, 2) == 4  # subsystem id: virtio device type 4


def test_requests_are_filled_with_random_bytes_and_their_length():
    driver, queue, device, _, _, intx = make_env()
    queue.add(writable=[64])
    queue.add(writable=[8, 24])  # one request in two writable buffers
    driver.kick(REQUESTQ)
    used = queue.get_used()
    assert [u.length for u in used] == [64, 32]
    assert used[0].data != used[1].data[:32] and len(set(used[0].data)) > 8
    assert intx.asserts >= 1
    assert device.bytes_delivered == 96


def test_a_huge_request_gets_at_most_max_request_bytes():
    driver, queue, *_ = make_env()
    queue.add(writable=[MAX_REQUEST_BYTES + 4096])
    driver.kick(REQUESTQ)
    assert [u.length for u in queue.get_used()] == [MAX_REQUEST_BYTES]


def test_the_rate_limit_holds_requests_until_the_next_period():
    driver, queue, device, loop, clock, _ = make_env(RngOptions(max_bytes=48, period_ms=500))
    for _ in range(3):
        queue.add(writable=[32])
    driver.kick(REQUESTQ)
    # 48 bytes a period, requests filled whole: one request now; the second
    # (32 > the 16 left) waits in the ring for a timer at the period's end.
    assert [u.length for u in queue.get_used()] == [32]
    assert [delay for delay, _ in loop.timers] == [pytest.approx(0.5)]
    loop.fire_timers()  # early: the period is not over, nothing more
    assert queue.get_used() == [] and len(loop.timers) == 1
    clock.now += 0.5
    loop.fire_timers()
    assert [u.length for u in queue.get_used()] == [32]
    clock.now += 0.5
    loop.fire_timers()
    assert [u.length for u in queue.get_used()] == [32]
    assert device.bytes_delivered == 96
    assert loop.timers == []  # nothing waits any more


def test_a_request_larger_than_max_bytes_gets_max_bytes_per_period():
    driver, queue, device, loop, clock, _ = make_env(RngOptions(max_bytes=16, period_ms=100))
    queue.add(writable=[64])
    queue.add(writable=[64])
    driver.kick(REQUESTQ)
    assert [u.length for u in queue.get_used()] == [16]
    clock.now += 0.1
    loop.fire_timers()
    assert [u.length for u in queue.get_used()] == [16]


def test_a_reset_cancels_the_refill_timer():
    driver, queue, device, loop, clock, _ = make_env(RngOptions(max_bytes=8, period_ms=1000))
    queue.add(writable=[8])
    queue.add(writable=[8])
    driver.kick(REQUESTQ)
    assert len(loop.timers) == 1
    driver.reset()
    clock.now += 2
    loop.fire_timers()
    assert device.bytes_delivered == 8


@pytest.mark.parametrize("post, reason", [
    (lambda q: q.add(readable=[b"guest data"], writable=[16]), "device-readable"),
    (lambda q: q.add(readable=[b"only readable"]), "device-readable"),
    (lambda q: q.add(writable=[0]), "no writable byte"),
])
def test_bad_requests_need_a_reset_logged_once(caplog, post, reason):
    driver, queue, device, _, _, _ = make_env()
    caplog.set_level(logging.WARNING, logger="microvmm.virtio.pci_legacy")
    post(queue)
    driver.kick(REQUESTQ, force=True)
    assert driver.status & STATUS_NEEDS_RESET
    queue.add(writable=[16])
    driver.kick(REQUESTQ, force=True)  # ignored until the driver resets the device
    assert device.bytes_delivered == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0] and "entropy" in warnings[0]
    # After a reset the device works again.
    driver.negotiate(0)
    queue = driver.setup_queue(REQUESTQ)
    driver.driver_ok()
    queue.add(writable=[16])
    driver.kick(REQUESTQ)
    assert [u.length for u in queue.get_used()] == [16]


def test_a_descriptor_outside_guest_ram_needs_a_reset(caplog):
    driver, queue, device, _, _, _ = make_env()
    caplog.set_level(logging.WARNING, logger="microvmm.virtio.pci_legacy")
    queue.write_desc(queue.desc, 0, RAM - 8, 64, 2, 0)  # WRITE, past the end of RAM
    queue.free.remove(0)
    queue.publish(0)
    driver.kick(REQUESTQ, force=True)
    assert driver.status & STATUS_NEEDS_RESET
    assert device.bytes_delivered == 0
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 1


@pytest.mark.parametrize("text, expected", [
    ("", RngOptions()),
    ("max-bytes=1024", RngOptions(1024, 1000)),
    ("max-bytes=10,period=250", RngOptions(10, 250)),
    ("period=5,max-bytes=7", RngOptions(7, 5)),
])
def test_options(text, expected):
    assert parse_options(text) == expected


@pytest.mark.parametrize("text, token", [
    ("virtio-rng,max-bytes=0", "max-bytes=0"),
    ("virtio-rng,max-bytes=x", "max-bytes=x"),
    ("virtio-rng,period=10", "period=MS needs max-bytes"),
    ("virtio-rng,max-bytes=5,period=0", "period=0"),
    ("virtio-rng,speed=3", "speed=3"),
    ("virtio-rng,max-bytes=5,max-bytes=6", "max-bytes=6"),
    ("virtio-rnd", "virtio-rnd"),
])
def test_bad_options_name_the_token(text, token):
    with pytest.raises(DeviceOptionError, match=token):
        parse_device_option(text)
