"""The backend I/O thread: fds, timers, cross-thread calls, failure isolation."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pytest

from microvmm.eventloop import EventLoop, EventLoopError


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_thread_is_named_and_not_daemon(loop):
    threads = [t for t in threading.enumerate() if t.name == "microvmm-io"]
    assert len(threads) == 1
    assert not threads[0].daemon


def test_reader_called_with_data_and_removed(loop):
    a, b = socket.socketpair()
    received = []
    done = threading.Event()

    def on_read():
        received.append(a.recv(100))
        done.set()

    loop.add_reader(a.fileno(), on_read)
    b.send(b"ping")
    assert done.wait(2)
    assert received == [b"ping"]
    assert loop.remove_reader(a.fileno())
    assert not loop.remove_reader(a.fileno())
    done.clear()
    b.send(b"more")
    assert not done.wait(0.1)
    a.close()
    b.close()


def test_writer_and_reader_on_same_fd(loop):
    a, b = socket.socketpair()
    writable = threading.Event()
    readable = threading.Event()
    loop.add_reader(a.fileno(), readable.set)
    loop.add_writer(a.fileno(), lambda: (writable.set(), loop.remove_writer(a.fileno())))
    assert writable.wait(2)
    assert not readable.is_set()
    b.send(b"x")
    assert readable.wait(2)
    loop.remove_reader(a.fileno())
    a.close()
    b.close()


def test_call_soon_threadsafe_runs_on_loop_thread_in_order(loop):
    order = []
    done = threading.Event()
    for i in range(5):
        loop.call_soon_threadsafe(lambda i=i: order.append((i, threading.current_thread().name)))
    loop.call_soon_threadsafe(done.set)
    assert done.wait(2)
    assert order == [(i, "microvmm-io") for i in range(5)]


def test_call_later_order_and_cancel(loop):
    fired = []
    loop.call_later(0.05, lambda: fired.append("late"))
    loop.call_later(0.01, lambda: fired.append("early"))
    cancelled = loop.call_later(0.02, lambda: fired.append("cancelled"))
    cancelled.cancel()
    start = time.monotonic()
    assert wait_for(lambda: len(fired) == 2)
    assert time.monotonic() - start >= 0.04
    time.sleep(0.05)
    assert fired == ["early", "late"]


def test_callback_exception_is_logged_and_loop_survives(loop, caplog):
    done = threading.Event()

    def boom():
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="microvmm.eventloop"):
        loop.call_soon_threadsafe(boom)
        loop.call_soon_threadsafe(done.set)
        assert done.wait(2)
    assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert any(t.name == "microvmm-io" and t.is_alive() for t in threading.enumerate())


def test_regular_file_registration_fails_cleanly(loop, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(PermissionError):
        loop.add_reader(fd, lambda: None)
    assert not loop.remove_reader(fd)
    os.close(fd)


def test_remove_after_fd_closed_is_tolerated(loop):
    a, b = socket.socketpair()
    loop.add_reader(a.fileno(), lambda: None)
    fd = a.fileno()
    a.close()
    assert loop.remove_reader(fd)
    b.close()


def test_close_is_idempotent_and_releases_fds():
    before = open_fds()
    event_loop = EventLoop()
    event_loop.start()
    event_loop.call_soon_threadsafe(lambda: None)
    event_loop.close()
    event_loop.close()
    assert not any(t.name == "microvmm-io" for t in threading.enumerate())
    assert open_fds() == before
    with pytest.raises(EventLoopError):
        event_loop.call_soon_threadsafe(lambda: None)


def test_stop_from_inside_a_callback():
    event_loop = EventLoop()
    event_loop.start()
    event_loop.call_soon_threadsafe(event_loop.stop)
    assert wait_for(lambda: not any(t.name == "microvmm-io" for t in threading.enumerate()))
    event_loop.close()


def test_start_twice_is_an_error(loop):
    with pytest.raises(EventLoopError):
        loop.start()
