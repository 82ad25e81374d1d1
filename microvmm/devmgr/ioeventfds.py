"""One VM-wide registry of queue-kick ioeventfds, keyed by (device, queue).

A device's notify register moves when the guest reprograms its BAR; only that
device's ioeventfds follow it, never another device's.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Iterable

if TYPE_CHECKING:
    from microvmm.eventloop import EventLoop
    from microvmm.virtio.pci_legacy import IoEventFdSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Registration:
    fd: int
    port: int
    size: int
    datamatch: int


class IoEventFdRegistry:
    """Registers each queue's kick as a KVM ioeventfd whose reads call the device.

    `vm` needs ioeventfd(fd, addr, size, datamatch=, pio=) and
    ioeventfd_remove(...) (microvmm.kvm.Vm); the loop watches the eventfds.
    """

    def __init__(self, vm, loop: "EventLoop"):
        self._vm = vm
        self._loop = loop
        self._entries: dict[tuple[Hashable, int], _Registration] = {}
        #: BAR changes of several devices may arrive on several vCPU threads at once.
        self._lock = threading.Lock()

    def sync(self, device: Hashable, specs: Iterable["IoEventFdSpec"],
             on_kick: Callable[[int], None]) -> None:
        """Make `device`'s ioeventfds exactly `specs` (its notify register's
        current address; none while its I/O decode is off), leaving every
        other device's alone."""
        wanted = {spec.queue_index: spec for spec in specs}
        with self._lock:
            self._sync(device, wanted, on_kick)

    def _sync(self, device: Hashable, wanted: dict[int, "IoEventFdSpec"],
              on_kick: Callable[[int], None]) -> None:
        for key in [k for k in self._entries if k[0] == device]:
            entry, spec = self._entries[key], wanted.get(key[1])
            if spec is None or (spec.port, spec.size, spec.datamatch) != (entry.port, entry.size,
                                                                         entry.datamatch):
                self._remove(key)
        for queue, spec in wanted.items():
            if (device, queue) in self._entries:
                continue
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self._vm.ioeventfd(fd, spec.port, spec.size, datamatch=spec.datamatch, pio=True)
            except BaseException:
                os.close(fd)
                raise
            self._entries[(device, queue)] = _Registration(fd, spec.port, spec.size, spec.datamatch)

            def kicked(fd: int = fd, queue: int = queue) -> None:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    return
                on_kick(queue)
            self._loop.add_reader(fd, kicked)

    def registered(self, device: Hashable) -> dict[int, tuple[int, int]]:
        """queue -> (port, datamatch) of `device`'s ioeventfds."""
        with self._lock:
            return {queue: (e.port, e.datamatch) for (owner, queue), e in self._entries.items()
                    if owner == device}

    def remove_device(self, device: Hashable) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == device]:
                self._remove(key)

    def close(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._remove(key)

    def _remove(self, key: tuple[Hashable, int]) -> None:
        entry = self._entries.pop(key)
        self._loop.remove_reader(entry.fd)
        try:
            self._vm.ioeventfd_remove(entry.fd, entry.port, entry.size, datamatch=entry.datamatch,
                                      pio=True)
        except OSError as err:  # the VM may be going away already
            logger.debug("ioeventfd %s: %s", key, err)
        os.close(entry.fd)
