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
