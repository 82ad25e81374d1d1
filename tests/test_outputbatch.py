"""OutputBatcher: per-byte console output leaves in runs, and nothing waits long or gets lost."""

from __future__ import annotations

import threading
import time

import pytest

from microvmm.eventloop import EventLoop
from microvmm.run.outputbatch import OutputBatcher


class ManualScheduler:
    def __init__(self) -> None:
        self.timers: list[tuple[float, object]] = []

    def call_later(self, delay, callback):
        self.timers.append((delay, callback))

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for _, callback in timers:
            callback()


def test_bytes_leave_as_one_run_at_the_newline() -> None:
    out: list[bytes] = []
    batcher = OutputBatcher(out.append, ManualScheduler())
    for byte in b"hello world":
        batcher.write(bytes([byte]))
    assert out == []
    batcher.write(b"\n")
    assert out == [b"hello world\n"]


def test_a_run_without_newline_leaves_when_the_timer_fires() -> None:
    out: list[bytes] = []
    scheduler = ManualScheduler()
    batcher = OutputBatcher(out.append, scheduler, delay=0.005)
    for byte in b"microvmm# ":
        batcher.write(bytes([byte]))
    assert len(scheduler.timers) == 1 and scheduler.timers[0][0] == 0.005  # one timer per run
    scheduler.fire()
    assert out == [b"microvmm# "]
    scheduler.fire()
    assert out == [b"microvmm# "]  # nothing twice


def test_limit_bounds_a_run() -> None:
    out: list[bytes] = []
    batcher = OutputBatcher(out.append, ManualScheduler(), limit=4)
    for byte in b"abcdefghij":
        batcher.write(bytes([byte]))
    batcher.flush()
    assert out == [b"abcd", b"efgh", b"ij"]


def test_without_a_scheduler_every_write_is_delivered_at_once() -> None:
    out: list[bytes] = []
    batcher = OutputBatcher(out.append, None)
    batcher.write(b"a")
    assert out == [b"a"]


def test_rejects_empty_limit() -> None:
    with pytest.raises(ValueError):
        OutputBatcher(print, None, limit=0)


def test_real_loop_flushes_a_prompt_soon_and_keeps_order_across_threads() -> None:
    out: list[bytes] = []
    loop = EventLoop()
    loop.start()
    try:
        batcher = OutputBatcher(out.append, loop, delay=0.005)
        batcher.write(b"$ ")
        deadline = time.monotonic() + 2
        while not out and time.monotonic() < deadline:
            time.sleep(0.001)
        assert out == [b"$ "]
        # two writers: every byte arrives once, each writer's bytes in its order
        def writer(tag: bytes) -> None:
            for index in range(500):
                batcher.write(tag + str(index).encode() + b";")
        threads = [threading.Thread(target=writer, args=(tag,)) for tag in (b"a", b"b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        batcher.flush()
        text = b"".join(out[1:]).decode()
        for tag in "ab":
            seen = [int(item[1:]) for item in text.split(";") if item.startswith(tag)]
            assert seen == list(range(500))
    finally:
        loop.stop()
