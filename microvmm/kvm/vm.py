"""``Vm``: a KVM virtual machine fd (memory slots, irqchip, irqfd/ioeventfd, vCPUs)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

from microvmm.kvm._ffi import ffi
from microvmm.kvm._ioctl import ioctl
from microvmm.kvm.constants import (
    Cap,
    Ioctl,
    IoeventfdFlag,
    IrqfdFlag,
    IrqRoutingType,
)
from microvmm.kvm.vcpu import Vcpu

logger = logging.getLogger(__name__)

_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_PAGE_SIZE = 4096
_IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)  # 0 = any access width (no datamatch)


class IrqchipRoute(NamedTuple):
    """GSI -> in-kernel irqchip pin (Irqchip.PIC_MASTER/PIC_SLAVE/IOAPIC)."""

    gsi: int
    irqchip: int
    pin: int


class MsiRoute(NamedTuple):
    """GSI -> MSI message (address split as in the MSI capability)."""

    gsi: int
    address_lo: int
    address_hi: int
    data: int


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} {value:#x} does not fit in 32 bits")


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{name} {value:#x} does not fit in 64 bits")


class Vm:
    """A VM fd from ``Kvm.create_vm()``. Closing it closes its vCPUs too."""

    def __init__(self, fd: int, vcpu_mmap_size: int):
        self._fd = fd
        self._vcpu_mmap_size = vcpu_mmap_size
        self._vcpus: list[Vcpu] = []

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("Vm is closed")
        return self._fd

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (the VM-specific answer)."""
        return ioctl(self.fileno(), Ioctl.KVM_CHECK_EXTENSION, int(cap))

    def set_user_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION; size 0 deletes the slot."""
        for name, value in (("guest_addr", guest_addr), ("size", size), ("host_addr", host_addr)):
            _check_u64(name, value)
            if value % _PAGE_SIZE:
                raise ValueError(f"{name} {value:#x} is not page-aligned")
        _check_u32("slot", slot)
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": int(flags), "guest_phys_addr": guest_addr,
            "memory_size": size, "userspace_addr": host_addr})
        ioctl(self.fileno(), Ioctl.KVM_SET_USER_MEMORY_REGION, region)
        logger.debug("memory slot %d: guest %#x+%#x at host %#x flags %#x",
                     slot, guest_addr, size, host_addr, flags)

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: 3 pages of guest-physical space KVM may use (Intel)."""
        _check_u32("addr", addr)
        ioctl(self.fileno(), Ioctl.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the EPT identity map (Intel)."""
        _check_u64("addr", addr)
        ioctl(self.fileno(), Ioctl.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr))

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair + IOAPIC (+ per-vCPU LAPIC)."""
        ioctl(self.fileno(), Ioctl.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2 (flags: KVM_PIT_SPEAKER_DUMMY)."""
        ioctl(self.fileno(), Ioctl.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive GSI ``irq`` to ``level`` (0/1)."""
        _check_u32("irq", irq)
        ioctl(self.fileno(), Ioctl.KVM_IRQ_LINE,
              ffi.new("struct kvm_irq_level *", {"irq": irq, "level": 1 if level else 0}))

    def _irqfd(self, fd: int, gsi: int, flags: int, resample_fd: int) -> None:
        if fd < 0:
            raise ValueError(f"bad eventfd {fd}")
        _check_u32("gsi", gsi)
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags,
                                             "resamplefd": resample_fd})
        ioctl(self.fileno(), Ioctl.KVM_IRQFD, arg)

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises GSI ``gsi``.

        With ``resample_fd`` the GSI is level-triggered: KVM signals
        ``resample_fd`` when the guest EOIs, so the device can re-assert.
        """
        flags = 0
        if resample_fd is not None:
            if resample_fd < 0:
                raise ValueError(f"bad resample eventfd {resample_fd}")
            flags |= IrqfdFlag.RESAMPLE
        self._irqfd(fd, gsi, flags, resample_fd or 0)

    def irqfd_remove(self, fd: int, gsi: int) -> None:
        """KVM_IRQFD with DEASSIGN."""
        self._irqfd(fd, gsi, IrqfdFlag.DEASSIGN, 0)

    def _ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None,
                   pio: bool, deassign: bool) -> None:
        if fd < 0:
            raise ValueError(f"bad eventfd {fd}")
        if length not in _IOEVENTFD_LENGTHS:
            raise ValueError(f"ioeventfd length {length} not one of {_IOEVENTFD_LENGTHS}")
        if pio and not 0 <= addr <= 0xFFFF:
            raise ValueError(f"port {addr:#x} out of range")
        _check_u64("addr", addr)
        flags = 0
        if pio:
            flags |= IoeventfdFlag.PIO
        if datamatch is not None:
            if length == 0:
                raise ValueError("datamatch needs a fixed length")
            if not 0 <= datamatch < (1 << (8 * length)):
                raise ValueError(f"datamatch {datamatch:#x} wider than {length} bytes")
            flags |= IoeventfdFlag.DATAMATCH
        if deassign:
            flags |= IoeventfdFlag.DEASSIGN
        arg = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd,
            "flags": int(flags)})
        ioctl(self.fileno(), Ioctl.KVM_IOEVENTFD, arg)

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = True) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes to port/MMIO ``addr``
        (matching ``datamatch`` if given) signals eventfd ``fd`` instead of exiting."""
        self._ioeventfd(fd, addr, length, datamatch, pio, deassign=False)

    def ioeventfd_remove(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                         pio: bool = True) -> None:
        """Undo ``ioeventfd`` (same arguments)."""
        self._ioeventfd(fd, addr, length, datamatch, pio, deassign=True)

    def set_gsi_routing(self, routes: Sequence[IrqchipRoute | MsiRoute]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole GSI routing table."""
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for entry, route in zip(table.entries, routes):
            _check_u32("gsi", route.gsi)
            entry.gsi = route.gsi
            if isinstance(route, IrqchipRoute):
                entry.type = IrqRoutingType.IRQCHIP
                entry.u.irqchip.irqchip = route.irqchip
                entry.u.irqchip.pin = route.pin
            elif isinstance(route, MsiRoute):
                entry.type = IrqRoutingType.MSI
                entry.u.msi.address_lo = route.address_lo
                entry.u.msi.address_hi = route.address_hi
                entry.u.msi.data = route.data
            else:
                raise TypeError(f"not a GSI route: {route!r}")
        ioctl(self.fileno(), Ioctl.KVM_SET_GSI_ROUTING, table)

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: inject one MSI. Returns >0 delivered, 0 blocked by the guest."""
        _check_u64("address", address)
        _check_u32("data", data)
        msi = ffi.new("struct kvm_msi *", {"address_lo": address & _U32_MAX,
                                           "address_hi": address >> 32, "data": data})
        return ioctl(self.fileno(), Ioctl.KVM_SIGNAL_MSI, msi)

    def create_vcpu(self, index: int) -> Vcpu:
        """KVM_CREATE_VCPU with vCPU id ``index`` (the APIC id)."""
        _check_u32("index", index)
        vcpu_fd = ioctl(self.fileno(), Ioctl.KVM_CREATE_VCPU, index)
        try:
            vcpu = Vcpu(vcpu_fd, index, self._vcpu_mmap_size)
        except BaseException:
            os.close(vcpu_fd)
            raise
        self._vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)
