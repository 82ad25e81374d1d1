"""OS thread names: what `top -H` shows for the vCPU and I/O threads."""

from __future__ import annotations

import threading
from pathlib import Path

from microvmm.host.osthread import COMM_MAX, set_os_thread_name


def _named_in_thread(name: str) -> tuple[bool, str]:
    result: list = []

    def body() -> None:
        ok = set_os_thread_name(name)
        result.append((ok, Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return result[0]


def test_names_the_calling_thread_only() -> None:
    before = Path("/proc/thread-self/comm").read_text()
    assert _named_in_thread("vcpu3") == (True, "vcpu3")
    assert Path("/proc/thread-self/comm").read_text() == before


def test_long_names_are_cut_to_what_the_kernel_keeps() -> None:
    ok, comm = _named_in_thread("a-very-long-thread-name")
    assert ok and comm == "a-very-long-thread-name"[:COMM_MAX]


def test_event_loop_thread_is_named_io() -> None:
    from microvmm.eventloop import EventLoop
    loop = EventLoop()
    loop.start()
    try:
        ran = threading.Event()
        loop.call_soon_threadsafe(ran.set)  # the loop thread is running, so it has named itself
        assert ran.wait(5)
        names = {p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")}
        assert "io" in names
    finally:
        loop.stop()
