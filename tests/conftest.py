"""Fixtures shared by several test modules."""

from __future__ import annotations

import signal

import pytest

from microvmm.eventloop import EventLoop
from microvmm.kvm import Kvm, KvmUnavailableError
from microvmm.vcpu_runner import KICK_SIGNAL


@pytest.fixture
def loop():
    """A started backend I/O thread (EventLoop), closed afterwards."""
    event_loop = EventLoop()
    event_loop.start()
    yield event_loop
    event_loop.close()


@pytest.fixture(scope="module")
def kvm():
    """/dev/kvm, or a skip saying why it cannot be used."""
    try:
        k = Kvm()
    except KvmUnavailableError as exc:
        pytest.skip(f"/dev/kvm not usable: {exc}")
    yield k
    k.close()


@pytest.fixture
def kick_handler():
    """The VMM installs a no-op handler for the vCPU kick signal; so do tests
    that run vCPUs (the default action of SIGUSR2 would end the process)."""
    previous = signal.signal(KICK_SIGNAL, lambda *_: None)
    yield
    signal.signal(KICK_SIGNAL, previous)
