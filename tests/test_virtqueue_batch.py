"""Split virtqueue batch operations: pop_batch, undo_pop(count), add_used_batch."""

from __future__ import annotations

import pytest

from microvmm.memory import GuestMemory
from microvmm.virtio.queue import DescFlags, VirtQueueError
from tests.test_virtqueue import RAM, make


@pytest.fixture
def memory():
    return GuestMemory([(0, RAM)])


def test_pop_batch_takes_chains_in_order_up_to_the_limit(memory):
    ring, queue, _ = make(memory)
    heads = [ring.add(readable=[bytes([i]) * (i + 1)]) for i in range(5)]
    first = queue.pop_batch(3)
    assert [c.head for c in first] == heads[:3]
    assert [c.read_all() for c in first] == [b"\x00", b"\x01\x01", b"\x02\x02\x02"]
    rest = queue.pop_batch(64)
    assert [c.head for c in rest] == heads[3:]
    assert queue.pop_batch(64) == []


def test_pop_batch_walks_multi_descriptor_and_indirect_chains(memory):
    ring, queue, _ = make(memory, indirect=True)
    ring.add(readable=[b"ab", b"cd"], use_indirect=False)
    ring.add(readable=[b"ef", b"gh"], use_indirect=True)
    ring.add(readable=[b"ij"], writable=[4], use_indirect=False)
    chains = queue.pop_batch(8)
    assert [c.read_all() for c in chains] == [b"abcd", b"efgh", b"ij"]
    assert [c.writable_len for c in chains] == [0, 0, 4]


def test_pop_batch_stops_before_a_bad_chain_and_the_next_pop_raises(memory):
    ring, queue, _ = make(memory)
    good = [ring.add(readable=[b"ok"]) for _ in range(2)]
    bad = ring.add(readable=[b"xx"])
    ring.write_desc(ring.desc, bad, RAM + 4096, 2, 0, 0)  # outside guest RAM
    ring.add(readable=[b"after"])
    chains = queue.pop_batch(8)
    assert [c.head for c in chains] == good
    assert queue.last_avail_idx == 2, "the bad chain and those after it are not consumed"
    with pytest.raises(VirtQueueError):
        queue.pop_batch(8)
    assert queue.last_avail_idx == 2
    with pytest.raises(VirtQueueError):
        queue.pop()


@pytest.mark.parametrize("corrupt", ["head", "loop", "next"])
def test_pop_batch_validates_every_chain_like_pop(memory, corrupt):
    ring, queue, _ = make(memory)
    head = ring.add(readable=[b"a", b"b"])
    second = ring.posted[head].descs[1]
    if corrupt == "head":
        ring.set_avail_ring(0, 99)  # >= queue size
    elif corrupt == "loop":
        ring.write_desc(ring.desc, second, 0x2000, 1, DescFlags.NEXT, head)
    else:
        ring.write_desc(ring.desc, second, 0x2000, 1, DescFlags.NEXT, 8)
    with pytest.raises(VirtQueueError):
        queue.pop_batch(8)


def test_undo_pop_of_several_chains_returns_them_in_order(memory):
    ring, queue, _ = make(memory)
    heads = [ring.add(readable=[bytes([i])]) for i in range(4)]
    queue.pop_batch(4)
    queue.undo_pop(3)
    assert [c.head for c in queue.pop_batch(8)] == heads[1:]


def test_add_used_batch_publishes_every_element_then_the_index(memory):
    ring, queue, _ = make(memory)
    heads = [ring.add(readable=[b"x"]) for _ in range(3)]
    chains = queue.pop_batch(8)
    queue.add_used_batch([c.head for c in chains])
    assert queue.used_idx == 3 and ring.used_idx == 3
    assert [(u.head, u.length) for u in ring.get_used()] == [(h, 0) for h in heads]
    assert queue.needs_notification()
    queue.add_used_batch([])
    assert ring.used_idx == 3
    with pytest.raises(ValueError):
        queue.add_used_batch([8])
    assert ring.used_idx == 3, "a bad head publishes nothing"


def test_pop_batch_sets_avail_event_past_the_batch(memory):
    ring, queue, _ = make(memory, event_idx=True)
    for _ in range(3):
        ring.add(readable=[b"x"])
    queue.pop_batch(8)
    assert ring.avail_event == 3


def test_pop_readable_batch_returns_heads_lengths_and_views_in_order(memory):
    ring, queue, _ = make(memory, indirect=True)
    heads = [ring.add(readable=[b"one"]),
             ring.add(readable=[b"tw", b"o!"], use_indirect=False),
             ring.add(readable=[b"thr", b"ee"], use_indirect=True),
             ring.add(readable=[b"four"], writable=[8], use_indirect=False),  # writable part not returned
             ring.add(writable=[4])]
    views = [memoryview(b"lead")]
    got_heads, lengths = queue.pop_readable_batch(8, views)
    assert got_heads == heads
    assert lengths == [3, 4, 5, 4, 0]
    assert b"".join(views) == b"leadonetwo!threefour"


def test_pop_readable_batch_stops_at_max_chains_and_max_bytes(memory):
    ring, queue, _ = make(memory)
    heads = [ring.add(readable=[b"x" * 100]) for _ in range(6)]
    views: list = []
    assert queue.pop_readable_batch(2, views)[0] == heads[:2]
    assert queue.pop_readable_batch(8, views, max_bytes=150)[0] == heads[2:4]  # stops once >= 150
    assert queue.pop_readable_batch(8, views)[0] == heads[4:]
    assert len(views) == 6


@pytest.mark.parametrize("corrupt", ["outside", "wraps", "head", "nested-loop"])
def test_pop_readable_batch_validates_and_stops_before_a_bad_chain(memory, corrupt):
    ring, queue, _ = make(memory)
    good = ring.add(readable=[b"ok"])
    bad = ring.add(readable=[b"a", b"b"])
    ring.add(readable=[b"after"])
    second = ring.posted[bad].descs[1]
    if corrupt == "outside":
        ring.write_desc(ring.desc, bad, RAM - 1, 2, 0, 0)  # straddles the end of RAM
    elif corrupt == "wraps":
        ring.write_desc(ring.desc, bad, (1 << 64) - 1, 2, 0, 0)
    elif corrupt == "head":
        ring.set_avail_ring(1, 200)
    else:
        ring.write_desc(ring.desc, second, 0x2000, 1, DescFlags.NEXT, bad)
    views: list = []
    assert queue.pop_readable_batch(8, views) == ([good], [2])
    assert queue.last_avail_idx == 1
    with pytest.raises(VirtQueueError):
        queue.pop_readable_batch(8, [])
    assert queue.last_avail_idx == 1, "nothing at or after the bad chain is consumed"
