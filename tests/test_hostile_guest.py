"""A hostile guest against the real console device, legacy PCI transport, PCI bus and MSI-X.

Generated with hypothesis (derandomized: CI runs the same examples every
time) over the harness in microvmm/testing/fakes/hostile/; fuzz/run_fuzz.py
runs the same cases for much longer. Every case asserts: no exception escapes
an entry point, no guest-memory access outside guest RAM succeeds, the device
is active or in NEEDS_RESET after bad input, and reset + a proper bring-up
makes data flow both ways again.
"""

from __future__ import annotations

import logging
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvmm.eventloop import EventLoop
from microvmm.pci.msix import ENTRY_SIZE
from microvmm.virtio_console.control import BAD_ID, ControlEvent
from microvmm.virtio_console.control_queues import CONTROL_TX_QUEUE, MAX_CONTROL_BACKLOG
from microvmm.testing.fakes.hostile import (
    CTRL, F_MULTIPORT, PAGE, REG_QUEUE_NOTIFY, REG_STATUS, REGIONS, SLOT, CaseResult, ConsoleRig,
    HypothesisChooser, RandomChooser, check_state, collect, run_case,
)
from microvmm.testing.fakes.virtio_driver import STATUS_NEEDS_RESET, GuestAllocator

def ci(max_examples: int) -> settings:
    """Reproducible in CI: derandomized, no example database, no deadline."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _assert_ok(result: CaseResult) -> None:
    assert result.ok, "\n".join(result.failures) + "\n-- trace --\n" + "\n".join(result.trace)


@ci(400)
@given(st.data())
def test_hostile_operation_sequences(data):
    """Random RAM, any bring-up stage, then up to 24 hostile operations of every kind."""
    _assert_ok(run_case(HypothesisChooser(data)))


def _finish(rig: ConsoleRig, result: CaseResult) -> CaseResult:
    rig.settle()
    collect(rig, result)
    check_state(rig, result)
    try:
        rig.recover_and_check(result)
    except Exception as exc:
        result.failures.append(f"no recovery after reset: {exc!r}")
    rig.settle()
    collect(rig, result)
    rig.entry("close", rig.device.close)
    rig.settle()
    return result


STATES = ("fresh", "running", "needs_reset", "reset_with_stale_work")


def _enter_state(rig: ConsoleRig, state: str) -> None:
    if state == "fresh":
        return
    guest = rig.bring_up(multiport=True, msix=rig.c.chance(50), event_idx=True, indirect=True)
    guest.wait(lambda: len(guest.opened) == 2, rounds=10)
    if state == "needs_reset":
        queue = rig.transport.queues[CONTROL_TX_QUEUE]
        rig.memory.write_u16(queue.avail_addr + 2, queue.last_avail_idx + queue.size + 1)
        rig.gbus.io_write(rig.bar0 + REG_QUEUE_NOTIFY, 2, CONTROL_TX_QUEUE)
        rig.settle()
        assert rig.transport.status & STATUS_NEEDS_RESET
    elif state == "reset_with_stale_work":
        # I/O-thread work is posted but not run when the reset lands.
        rig.backends[0].input += b"typed"
        rig.gbus.io_write(rig.bar0 + REG_QUEUE_NOTIFY, 2, 0)
        rig.gbus.io_write(rig.bar0 + REG_STATUS, 1, 0)


@ci(200)
@given(state=st.sampled_from(STATES), seed=st.integers(0, 2**32 - 1), queue_size=st.sampled_from([2, 8, 16]))
def test_every_register_offset_and_size_in_any_order(state, seed, queue_size):
    """Legacy registers 0..0xFF and config space 0..0xFF (through 0xCF8/0xCFC), each
    at sizes 1, 2 and 4, read and written with random values in a random order,
    from a fresh, running, failed or mid-reset device."""
    rig = ConsoleRig(RandomChooser(seed), queue_size=queue_size)
    result = CaseResult()
    _enter_state(rig, state)
    rng = random.Random(seed)
    accesses = [("bar0", offset, size) for offset in range(0x100) for size in (1, 2, 4)]
    accesses += [("config", offset, size) for offset in range(0x100) for size in (1, 2, 4)
                 if offset % size == 0 or rng.random() < 0.2]
    rng.shuffle(accesses)
    for space, offset, size in accesses:
        value = rng.choice((0, (1 << 8 * size) - 1, rng.getrandbits(8 * size)))
        write = rng.random() < 0.5
        if space == "bar0":
            if write:
                rig.entry("bar0_write", lambda: rig.transport.bar0_write(offset, size, value))
            else:
                rig.entry("bar0_read", lambda: rig.transport.bar0_read(offset, size))
        else:
            rig.gbus.write(0, 4, 0x80000000 | SLOT << 11 | (offset & 0xFC))
            port = 4 + (offset & 3)
            if write:
                rig.gbus.write(port, size, value)
            else:
                rig.gbus.read(port, size)
        if rng.random() < 0.05 and rig.manual:
            rig.loop.run(limit=rng.randint(0, 4))  # interleave I/O-thread work
    _assert_ok(_finish(rig, result))


@ci(200)
@given(seed=st.integers(0, 2**32 - 1), enable=st.booleans())
def test_msix_table_and_pba_accesses_out_of_range(seed, enable):
    """Every offset around the MSI-X BAR at every size: only aligned dword/qword
    writes inside the table change it, the PBA is read-only, nothing raises."""
    rig = ConsoleRig(RandomChooser(seed))
    msix = rig.transport.msix
    rng = random.Random(seed)
    if enable:
        rig.gbus.write(0, 4, 0x80000000 | SLOT << 11 | rig.msix_cap)
        rig.gbus.write(6, 2, 0x8000)
    offsets = list(range(-32, rig.bar1_size + 32)) + [rng.getrandbits(32) for _ in range(64)]
    rng.shuffle(offsets)
    for offset in offsets:
        size = rng.choice((1, 2, 4, 8))
        value = rng.getrandbits(8 * size)
        before = bytes(msix.table)
        pba_before = [msix.read(msix.pba_offset + 8 * i, 8) for i in range(msix.pba_size // 8)]
        if rng.random() < 0.6:
            rig.entry("msix write", lambda: msix.write(offset, size, value))
            in_table = size in (4, 8) and offset % size == 0 and 0 <= offset and offset + size <= msix.table_size
            if in_table:
                assert msix.table[offset:offset + size] == value.to_bytes(size, "little")
            else:
                assert bytes(msix.table) == before, f"write {offset:#x}/{size} changed the table"
            pba = [msix.read(msix.pba_offset + 8 * i, 8) for i in range(msix.pba_size // 8)]
            for word, (now, was) in enumerate(zip(pba, pba_before)):
                # The PBA is read-only: a bit only clears when its vector got unmasked and fired.
                assert now & ~was == 0, f"write {offset:#x}/{size} set pending bits"
                for bit in range(64):
                    if was >> bit & 1 and not now >> bit & 1:
                        assert not msix._effectively_masked(64 * word + bit)
        else:
            got = rig.entry("msix read", lambda: msix.read(offset, size))
            inside = 0 <= offset and offset + size <= msix.pba_offset + msix.pba_size
            if not inside or size not in (4, 8) or offset % size:
                assert got == 0, f"read {offset:#x}/{size} = {got:#x}"
        if rng.random() < 0.02:
            rig.transport.msix.trigger(rng.randint(-2, msix.num_vectors + 2))
    for vector in range(msix.num_vectors):  # the table still holds whole, addressable entries
        assert len(msix.table[ENTRY_SIZE * vector:ENTRY_SIZE * (vector + 1)]) == ENTRY_SIZE
    _assert_ok(_finish(rig, CaseResult()))


def test_device_ready_flood_without_control_buffers_is_bounded():
    """Regression: a driver that sends DEVICE_READY over and over but never posts
    control receive buffers made the device queue 2 messages per request without
    bound (40000 after 20000 requests). Now it is cut off with NEEDS_RESET."""
    rig = ConsoleRig(RandomChooser(3), queue_size=16)
    rig.restore_pci()
    driver = rig.driver
    driver.negotiate(F_MULTIPORT)
    for index in range(rig.num_queues):
        driver.setup_queue(index)
    driver.driver_ok()
    ring = driver.rings[CONTROL_TX_QUEUE]
    ring.allocator = GuestAllocator(rig.memory, REGIONS[1][0], REGIONS[1][0] + PAGE)
    for _ in range(5 * MAX_CONTROL_BACKLOG):
        ring.get_used()
        if not ring.free:
            break  # the device stopped using buffers: it gave up on this driver
        ring.allocator.next = REGIONS[1][0]
        ring.add(readable=[CTRL.pack(BAD_ID, ControlEvent.DEVICE_READY, 1)])
        driver.io_write(REG_QUEUE_NOTIFY, 2, CONTROL_TX_QUEUE)
        rig.settle()
        assert len(rig.device._control_out) <= MAX_CONTROL_BACKLOG
    assert rig.transport.status & STATUS_NEEDS_RESET
    _assert_ok(_finish(rig, CaseResult()))


class _LoopErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@ci(100)
@given(st.data())
def test_hostile_sequences_with_a_real_event_loop_thread(data):
    """The same cases with the real I/O thread running concurrently with the
    'vCPU' (this thread): the loop must log no failed callback."""
    errors = _LoopErrors()
    loop_logger = logging.getLogger("microvmm.eventloop")
    loop_logger.addHandler(errors)
    loop = EventLoop(thread_name="hostile-io")
    loop.start()
    try:
        result = run_case(HypothesisChooser(data), max_ops=12, loop=loop)
    finally:
        loop.close()
        loop_logger.removeHandler(errors)
    result.failures.extend(errors.records)
    _assert_ok(result)


def test_one_seed_replays_identically():
    """Fuzz failures are reported by seed: a seed must replay the same case."""
    first, second = [], []
    run_case(RandomChooser(1234), trace=first)
    run_case(RandomChooser(1234), trace=second)
    assert first == second and len(first) > 1
