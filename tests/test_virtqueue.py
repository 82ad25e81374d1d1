"""Split virtqueue: chain parsing, validation of hostile rings, notification suppression."""

from __future__ import annotations

import pytest

from microvmm.memory import GuestMemory
from microvmm.virtio.features import VirtioFeature
from microvmm.virtio.queue import (
    DESC_SIZE,
    MAX_INDIRECT_ENTRIES,
    AvailFlags,
    DescFlags,
    UsedFlags,
    VirtQueue,
    VirtQueueError,
    legacy_ring_bytes,
    legacy_ring_layout,
    vring_need_event,
)
from microvmm.testing.fakes.virtio_driver import DriverRing, GuestAllocator

RAM = 1 << 20
SIZE = 8


@pytest.fixture
def memory():
    mem = GuestMemory([(0, RAM)])
    yield mem


def make(memory, size=SIZE, event_idx=False, indirect=False):
    alloc = GuestAllocator(memory, 0x1000, RAM)
    ring = DriverRing(memory, alloc, size, event_idx=event_idx, indirect=indirect)
    queue = VirtQueue(memory, size)
    features = 0
    if event_idx:
        features |= 1 << VirtioFeature.RING_EVENT_IDX
    if indirect:
        features |= 1 << VirtioFeature.RING_INDIRECT_DESC
    queue.set_features(features)
    queue.configure_legacy(ring.pfn)
    return ring, queue, alloc


def test_legacy_layout_matches_linux_vring_size():
    # Linux: vring_size(256, 4096) = ALIGN(16*256 + 2*(3+256), 4096) + 2*3 + 8*256
    assert legacy_ring_layout(3, 256) == (3 * 4096, 3 * 4096 + 4096, 3 * 4096 + 8192)
    assert legacy_ring_bytes(256) == 8192 + 6 + 8 * 256
    # Small queue: avail ends well inside the first page, used ring on the next page.
    assert legacy_ring_layout(1, 8) == (4096, 4096 + 128, 8192)


def test_queue_size_must_be_power_of_two(memory):
    with pytest.raises(ValueError):
        VirtQueue(memory, 6)
    with pytest.raises(ValueError):
        VirtQueue(memory, 65536)


def test_pop_direct_chain_and_complete(memory):
    ring, queue, _ = make(memory)
    assert queue.pop() is None and not queue.has_available()
    head = ring.add(readable=[b"hello ", b"world"], writable=[4, 8])
    assert queue.has_available()
    chain = queue.pop()
    assert chain is not None and chain.head == head
    assert chain.read_all() == b"hello world"
    assert chain.readable_len == 11 and chain.writable_len == 12
    assert chain.write(b"0123456789") == 10
    assert chain.write(b"x" * 20) == 12  # truncated to the writable space
    assert chain.write(b"AB", offset=3) == 2
    queue.add_used(chain.head, 12)
    assert queue.pop() is None
    used = ring.get_used()
    assert [(u.head, u.length) for u in used] == [(head, 12)]
    assert used[0].data == b"xxxABxxxxxxx"


def test_many_chains_in_order_and_undo_pop(memory):
    ring, queue, _ = make(memory)
    heads = [ring.add(readable=[bytes([i])]) for i in range(5)]
    first = queue.pop()
    queue.undo_pop()
    again = queue.pop()
    assert first.head == again.head == heads[0]
    got = [again.read_all()]
    while (chain := queue.pop()) is not None:
        got.append(chain.read_all())
        queue.add_used(chain.head, 0)
    assert got == [bytes([i]) for i in range(5)]


def test_index_wraparound_past_65535(memory):
    ring, queue, _ = make(memory, event_idx=True)
    start = 65533
    ring.avail_idx = ring.last_used_idx = ring._idx_at_last_kick = start
    ring.set_avail_idx(start)
    memory.write_u16(ring.used + 2, start)
    queue.last_avail_idx = queue.used_idx = start
    queue._signalled_used = start
    queue.set_avail_event(start)
    ring.set_used_event(start)
    for round_ in range(6):
        ring.add(readable=[bytes([round_])], writable=[1])
        assert ring.kick_prepare()  # avail_event tracks what the device consumed
        chain = queue.pop()
        assert chain.read_all() == bytes([round_])
        chain.write(b"!")
        queue.add_used(chain.head, 1)
        assert queue.needs_notification()  # used_event == previous used idx
        assert [u.data for u in ring.get_used()] == [b"!"]
    assert queue.used_idx == (start + 6) & 0xFFFF == 3


@pytest.mark.parametrize("event,new,old,expected", [
    (0, 1, 0, True),
    (5, 5, 4, False),   # wants a notify once entry 5 is published, i.e. idx reaches 6
    (4, 5, 4, True),
    (10, 5, 0, False),
    (65535, 0, 65535, True),   # wraps: 65535 -> 0 crosses event 65535
    (65535, 2, 65534, True),
    (0, 65535, 65530, False),
    (3, 2, 65534, False),
    (1, 2, 65534, True),
])
def test_vring_need_event(event, new, old, expected):
    assert vring_need_event(event, new, old) is expected


def test_needs_notification_event_idx(memory):
    ring, queue, _ = make(memory, event_idx=True)
    for _ in range(3):
        ring.add(writable=[4])
    # Driver wants an interrupt only once used idx passes 2 (i.e. after the 3rd entry).
    ring.set_used_event(2)
    chains = [queue.pop() for _ in range(3)]
    queue.add_used(chains[0].head, 0)
    assert not queue.needs_notification()  # used idx 1, event 2 not yet passed
    queue.add_used(chains[1].head, 0)
    assert not queue.needs_notification()  # used idx 2, event 2 not yet passed
    queue.add_used(chains[2].head, 0)
    assert queue.needs_notification()  # used idx 3 passed event 2
    assert not queue.needs_notification()  # nothing new since
    # Batches: one decision for several entries crossing the event.
    ring.get_used()
    ring.set_used_event(3)
    for _ in range(2):
        ring.add(writable=[4])
    for _ in range(2):
        queue.add_used(queue.pop().head, 0)
    assert queue.needs_notification()  # 3 -> 5 crossed event 3


def test_needs_notification_no_interrupt_flag(memory):
    ring, queue, _ = make(memory)
    ring.add(writable=[4])
    ring.add(writable=[4])
    ring.set_avail_flags(AvailFlags.NO_INTERRUPT)
    queue.add_used(queue.pop().head, 0)
    assert not queue.needs_notification()
    ring.set_avail_flags(0)
    queue.add_used(queue.pop().head, 0)
    assert queue.needs_notification()


def test_avail_event_suppresses_kicks_while_draining(memory):
    ring, queue, _ = make(memory, event_idx=True)
    ring.add(readable=[b"a"])
    assert ring.kick_prepare()
    queue.disable_notification()
    assert queue.pop() is not None
    ring.add(readable=[b"b"])
    # Device is draining with notifications off: avail_event stays at 0, no kick.
    assert ring.avail_event == 0
    assert not ring.kick_prepare()
    assert queue.enable_notification()  # 'b' arrived meanwhile: caller must re-drain
    assert queue.pop().read_all() == b"b"
    assert not queue.enable_notification()
    ring.add(readable=[b"c"])
    assert ring.kick_prepare()


def test_no_notify_flag_without_event_idx(memory):
    ring, queue, _ = make(memory)
    queue.disable_notification()
    assert ring.used_flags & UsedFlags.NO_NOTIFY
    ring.add(readable=[b"a"])
    assert not ring.kick_prepare()
    assert queue.enable_notification()
    assert ring.used_flags == 0
    ring.add(readable=[b"b"])
    assert ring.kick_prepare()


def test_indirect_chain(memory):
    ring, queue, _ = make(memory, indirect=True)
    head = ring.add(readable=[b"ab", b"cd"], writable=[3, 3], use_indirect=True)
    chain = queue.pop()
    assert chain.head == head
    assert chain.read_all() == b"abcd" and chain.writable_len == 6
    assert chain.write(b"uvwxyz") == 6
    queue.add_used(head, 6)
    assert ring.get_used()[0].data == b"uvwxyz"


# ---- malformed rings -------------------------------------------------------

def post_raw(ring, head):
    ring.publish(head)


def test_head_out_of_range(memory):
    ring, queue, _ = make(memory)
    post_raw(ring, SIZE)
    with pytest.raises(VirtQueueError, match="head"):
        queue.pop()


def test_next_out_of_range(memory):
    ring, queue, alloc = make(memory)
    buf = alloc.alloc(16)
    ring.write_desc(ring.desc, 0, buf, 16, DescFlags.NEXT, SIZE + 3)
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError, match="next"):
        queue.pop()


def test_descriptor_loop(memory):
    ring, queue, alloc = make(memory)
    buf = alloc.alloc(16)
    ring.write_desc(ring.desc, 0, buf, 16, DescFlags.NEXT, 1)
    ring.write_desc(ring.desc, 1, buf, 16, DescFlags.NEXT, 0)
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError, match="loop"):
        queue.pop()


def test_readable_after_writable(memory):
    ring, queue, alloc = make(memory)
    buf = alloc.alloc(16)
    ring.write_desc(ring.desc, 0, buf, 16, DescFlags.NEXT | DescFlags.WRITE, 1)
    ring.write_desc(ring.desc, 1, buf, 16, 0, 0)
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError, match="readable"):
        queue.pop()


@pytest.mark.parametrize("addr,length", [
    (RAM - 8, 16),                 # straddles the end of RAM
    (RAM + 0x1000, 1),             # entirely outside
    (0xFFFFFFFFFFFFFFF0, 0x20),    # addr + len wraps 64 bits
    (0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF),
])
def test_buffer_outside_ram(memory, addr, length):
    ring, queue, _ = make(memory)
    ring.write_desc(ring.desc, 0, addr, length, 0, 0)
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError):
        queue.pop()


def test_buffer_across_ram_hole():
    memory = GuestMemory([(0, 0x10000), (0x20000, 0x10000)])
    alloc = GuestAllocator(memory, 0x1000, 0x10000)
    ring = DriverRing(memory, alloc, SIZE)
    queue = VirtQueue(memory, SIZE)
    queue.configure_legacy(ring.pfn)
    ring.write_desc(ring.desc, 0, 0xFF00, 0x200, 0, 0)  # runs into the hole
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError):
        queue.pop()


def test_indirect_without_feature(memory):
    ring, queue, _ = make(memory, indirect=False)
    ring.indirect = True
    ring.add(readable=[b"a", b"b"], use_indirect=True)
    with pytest.raises(VirtQueueError, match="INDIRECT"):
        queue.pop()


@pytest.mark.parametrize("length", [0, 15, 17, DESC_SIZE * (MAX_INDIRECT_ENTRIES + 1)])
def test_indirect_bad_length(memory, length):
    ring, queue, alloc = make(memory, indirect=True)
    table = alloc.alloc(DESC_SIZE * (MAX_INDIRECT_ENTRIES + 1))
    ring.write_desc(ring.desc, 0, table, length, DescFlags.INDIRECT, 0)
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError, match="indirect"):
        queue.pop()


def test_indirect_with_next(memory):
    ring, queue, alloc = make(memory, indirect=True)
    table = alloc.alloc(32)
    buf = alloc.alloc(8)
    ring.write_desc(table, 0, buf, 8, 0, 0)
    ring.write_desc(ring.desc, 0, table, 16, DescFlags.INDIRECT | DescFlags.NEXT, 1)
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError, match="NEXT"):
        queue.pop()


def test_nested_indirect(memory):
    ring, queue, alloc = make(memory, indirect=True)
    table = alloc.alloc(32)
    inner = alloc.alloc(16)
    buf = alloc.alloc(8)
    ring.write_desc(inner, 0, buf, 8, 0, 0)
    ring.write_desc(table, 0, inner, 16, DescFlags.INDIRECT, 0)
    ring.write_desc(ring.desc, 0, table, 16, DescFlags.INDIRECT, 0)
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError, match="nested"):
        queue.pop()


def test_indirect_loop_and_next_range(memory):
    ring, queue, alloc = make(memory, indirect=True)
    table = alloc.alloc(32)
    buf = alloc.alloc(8)
    ring.write_desc(table, 0, buf, 8, DescFlags.NEXT, 1)
    ring.write_desc(table, 1, buf, 8, DescFlags.NEXT, 0)
    ring.write_desc(ring.desc, 0, table, 32, DescFlags.INDIRECT, 0)
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError, match="loops"):
        queue.pop()
    ring2, queue2, alloc2 = make(memory, indirect=True)
    ring2.write_desc(table, 1, buf, 8, DescFlags.NEXT, 2)  # next past a 2-entry table
    ring2.write_desc(ring2.desc, 0, table, 32, DescFlags.INDIRECT, 0)
    post_raw(ring2, 0)
    with pytest.raises(VirtQueueError, match="indirect next"):
        queue2.pop()


def test_indirect_table_outside_ram(memory):
    ring, queue, _ = make(memory, indirect=True)
    ring.write_desc(ring.desc, 0, RAM - 16, 32, DescFlags.INDIRECT, 0)
    post_raw(ring, 0)
    with pytest.raises(VirtQueueError):
        queue.pop()


def test_absurd_avail_idx(memory):
    ring, queue, _ = make(memory)
    ring.set_avail_idx(SIZE + 1)
    with pytest.raises(VirtQueueError, match="avail idx"):
        queue.has_available()
    with pytest.raises(VirtQueueError):
        queue.pop()


@pytest.mark.parametrize("pfn", [RAM // 4096, RAM // 4096 - 1, 0xFFFFFFFF])
def test_rings_outside_ram(memory, pfn):
    queue = VirtQueue(memory, 256)  # 3 pages of rings
    with pytest.raises(VirtQueueError, match="outside"):
        queue.configure_legacy(pfn)
    assert not queue.ready
    assert queue.pop() is None


def test_pfn_zero_disables_and_reset(memory):
    ring, queue, _ = make(memory)
    assert queue.ready
    queue.configure_legacy(0)
    assert not queue.ready and queue.pop() is None
    queue.configure_legacy(ring.pfn)
    ring.add(readable=[b"x"])
    queue.reset()
    assert not queue.ready and not queue.has_available()
