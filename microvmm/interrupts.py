"""KVM-backed interrupt sinks: INTx and MSI-X leave the VMM through irqfds.

The PCI layer only knows the IntxLine / MsiController protocols
(microvmm/pci/irq.py); these classes implement them with eventfds that KVM
turns into interrupts, so raising an interrupt is one write(2) from the I/O
thread, never an exit or an ioctl.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from microvmm.kvm import IrqchipRoute, MsiRoute

logger = logging.getLogger(__name__)

# The in-kernel irqchip's default routes, which KVM_SET_GSI_ROUTING replaces
# wholesale and which must therefore be restated: GSI 0-15 go to both PICs and
# the IOAPIC, 16-23 to the IOAPIC only.
IOAPIC_PINS = 24
_PIC_MASTER, _PIC_SLAVE, _IOAPIC = 0, 1, 2


def default_irqchip_routes() -> list:
    routes = []
    for gsi in range(IOAPIC_PINS):
        if gsi < 8:
            routes.append(IrqchipRoute(gsi=gsi, irqchip=_PIC_MASTER, pin=gsi))
        elif gsi < 16:
            routes.append(IrqchipRoute(gsi=gsi, irqchip=_PIC_SLAVE, pin=gsi - 8))
        routes.append(IrqchipRoute(gsi=gsi, irqchip=_IOAPIC, pin=gsi))
    return routes


class GsiRouter:
    """Owns the VM's GSI routing table: the irqchip defaults plus MSI routes."""

    def __init__(self, vm):
        self._vm = vm
        self._lock = threading.Lock()
        self._msi: dict[int, MsiRoute] = {}
        self._next_gsi = IOAPIC_PINS

    def allocate(self) -> int:
        with self._lock:
            gsi, self._next_gsi = self._next_gsi, self._next_gsi + 1
            return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        with self._lock:
            route = MsiRoute(gsi=gsi, address_lo=address & 0xFFFFFFFF,
                             address_hi=address >> 32, data=data)
            if self._msi.get(gsi) == route:
                return
            self._msi[gsi] = route
            self._vm.set_gsi_routing(default_irqchip_routes() + list(self._msi.values()))


class KvmIntxLine:
    """A level-triggered INTx line: an irqfd with a resample eventfd.

    KVM raises the IOAPIC pin on each eventfd write and lowers it when the
    guest EOIs; the resample eventfd then tells us, and `on_resample` lets
    the device raise it again while its interrupt condition holds.
    """

    def __init__(self, vm, gsi: int, loop, on_resample: Callable[[], None]):
        self.gsi = gsi
        self._vm = vm
        self._trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._resample = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        vm.irqfd(self._trigger, gsi, resample_fd=self._resample)
        self._loop = loop
        self._on_resample = on_resample
        loop.add_reader(self._resample, self._resampled)

    def assert_line(self) -> None:
        os.eventfd_write(self._trigger, 1)

    def _resampled(self) -> None:
        try:
            os.eventfd_read(self._resample)
        except BlockingIOError:
            return
        self._on_resample()

    def close(self) -> None:
        self._loop.remove_reader(self._resample)
        try:
            self._vm.irqfd_remove(self._trigger, self.gsi)
        except OSError:
            pass
        os.close(self._trigger)
        os.close(self._resample)


class KvmMsiController:
    """MSI-X vectors of one PCI function, one GSI route + irqfd per vector."""

    def __init__(self, vm, router: GsiRouter, num_vectors: int):
        self._vm = vm
        self._router = router
        self._gsis: list[int] = []
        self._fds: list[int] = []
        for _ in range(num_vectors):
            gsi = router.allocate()
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._gsis.append(gsi)
            self._fds.append(fd)
        self._wired: set[int] = set()

    def program_vector(self, vector: int, address: int, data: int, masked: bool) -> None:
        if not 0 <= vector < len(self._gsis):
            return
        if address == 0:  # never programmed: KVM would refuse or misroute it
            return
        self._router.set_msi(self._gsis[vector], address, data)
        if vector not in self._wired:
            # the irqfd is attached only once a route exists for its GSI
            self._vm.irqfd(self._fds[vector], self._gsis[vector])
            self._wired.add(vector)

    def trigger(self, vector: int) -> None:
        if vector in self._wired:
            os.eventfd_write(self._fds[vector], 1)
        else:
            logger.debug("MSI-X vector %d triggered before the guest programmed it", vector)

    def close(self) -> None:
        for vector in self._wired:
            try:
                self._vm.irqfd_remove(self._fds[vector], self._gsis[vector])
            except OSError:
                pass
        for fd in self._fds:
            os.close(fd)
