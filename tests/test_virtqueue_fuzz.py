"""Hostile rings, generated: pop() either yields buffers inside guest RAM or raises VirtQueueError."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvmm.memory import GuestMemory
from microvmm.virtio.features import VirtioFeature
from microvmm.virtio.queue import DESC_SIZE, VirtQueue, VirtQueueError, legacy_ring_layout

RAM = 64 * 1024
SIZE = 8
PFN = 1
TABLE = 0x8000  # a spare area the generated indirect descriptors may point at

MEMORY = GuestMemory([(0, RAM)])

addresses = st.one_of(
    st.integers(0, RAM + 64),
    st.sampled_from([TABLE, RAM - 16, RAM - 1, 2**64 - 16, 2**63]),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 0xFFFFFFFF, 48]), st.integers(0, 2**32 - 1))
descriptors = st.tuples(addresses, lengths, st.integers(0, 7), st.integers(0, 12))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    table=st.lists(descriptors, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(descriptors, min_size=4, max_size=4),
    heads=st.lists(st.integers(0, 10), min_size=1, max_size=SIZE),
    avail_idx=st.integers(0, 0xFFFF),
    features=st.integers(0, 3),
)
def test_pop_never_escapes_guest_ram(table, indirect, heads, avail_idx, features):
    MEMORY.view(0, RAM)[:] = bytes(RAM)
    desc, avail, _ = legacy_ring_layout(PFN, SIZE)
    for i, entry in enumerate(table):
        MEMORY.write(desc + DESC_SIZE * i, struct.pack("<QIHH", *entry))
    for i, entry in enumerate(indirect):
        MEMORY.write(TABLE + DESC_SIZE * i, struct.pack("<QIHH", *entry))
    for slot, head in enumerate(heads):
        MEMORY.write_u16(avail + 4 + 2 * slot, head)
    MEMORY.write_u16(avail + 2, avail_idx)
    queue = VirtQueue(MEMORY, SIZE)
    queue.set_features((features & 1) << VirtioFeature.RING_INDIRECT_DESC
                       | (features >> 1) << VirtioFeature.RING_EVENT_IDX)
    queue.configure_legacy(PFN)
    popped = 0
    try:
        while popped <= SIZE and (chain := queue.pop()) is not None:
            popped += 1
            assert 0 <= chain.head < SIZE
            assert chain.readable or chain.writable
            for view in chain.readable + chain.writable:
                assert len(view) <= RAM
            chain.read_all()
            chain.write(b"x" * 64)
            queue.add_used(chain.head, chain.writable_len)
            queue.needs_notification()
    except VirtQueueError:
        pass
    assert popped <= SIZE  # never more chains than the driver could have published
