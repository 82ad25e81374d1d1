"""Helpers shared by the console tests: run code on the I/O thread, wait for conditions."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from microvmm.eventloop import EventLoop


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return bool(predicate())


def run_on_loop(loop: EventLoop, function: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Run `function` on the loop thread and return its result (or raise its exception)."""
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # re-raised in the caller
            outcome["error"] = exc
        finally:
            done.set()

    loop.call_soon_threadsafe(call)
    if not done.wait(timeout):
        raise TimeoutError("loop did not run the call")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
