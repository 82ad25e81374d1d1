"""``Kvm``: the /dev/kvm handle (API version, capabilities, supported CPUID)."""

from __future__ import annotations

import errno
import logging
import os

from microvmm.kvm._ffi import ffi
from microvmm.kvm._ioctl import ioctl
from microvmm.kvm.constants import KVM_API_VERSION, Cap, Ioctl
from microvmm.kvm.errors import KvmError, KvmUnavailableError
from microvmm.kvm.state import CpuidEntry
from microvmm.kvm.vm import Vm

logger = logging.getLogger(__name__)

# KVM_GET_SUPPORTED_CPUID fails with E2BIG when the buffer is too small; start
# here and double. Real hosts report well under 100 entries.
_CPUID_START_ENTRIES = 128
_CPUID_MAX_ENTRIES = 4096


class Kvm:
    """An open /dev/kvm.

    Raises KvmUnavailableError (with a one-line fix) when the device is
    missing, inaccessible, or not API version 12.
    """

    def __init__(self, path: str = "/dev/kvm"):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailableError.from_open_error(path, exc) from exc
        try:
            version = ioctl(self._fd, Ioctl.KVM_GET_API_VERSION)
        except KvmError as exc:
            # Not a KVM device at all (e.g. a wrong path).
            self.close()
            raise KvmUnavailableError(path, exc.errno, KvmUnavailableError.MISSING_FIX,
                                      f"not a KVM device ({exc})") from exc
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(
                path, errno.EPROTO, "use a kernel with the stable KVM API (version 12)",
                f"KVM API version {version}, need {KVM_API_VERSION}")
        self._api_version = version
        self._vcpu_mmap_size: int | None = None

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("Kvm is closed")
        return self._fd

    @property
    def api_version(self) -> int:
        return self._api_version

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if absent, else >0 (some caps return a count)."""
        return ioctl(self.fileno(), Ioctl.KVM_CHECK_EXTENSION, int(cap))

    @property
    def vcpu_mmap_size(self) -> int:
        """Size of each vCPU's kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE)."""
        if self._vcpu_mmap_size is None:
            size = ioctl(self.fileno(), Ioctl.KVM_GET_VCPU_MMAP_SIZE)
            if size < ffi.sizeof("struct kvm_run"):
                raise KvmError("KVM_GET_VCPU_MMAP_SIZE", errno.EINVAL,
                               f"{size} bytes is smaller than struct kvm_run")
            self._vcpu_mmap_size = size
        return self._vcpu_mmap_size

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can expose to a guest."""
        nent = _CPUID_START_ENTRIES
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            try:
                ioctl(self.fileno(), Ioctl.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and nent < _CPUID_MAX_ENTRIES:
                    nent *= 2
                    continue
                raise
            count = min(buf.nent, nent)  # the kernel writes back how many it filled
            return [CpuidEntry.from_c(buf.entries[i]) for i in range(count)]

    def create_vm(self, machine_type: int = 0) -> Vm:
        """KVM_CREATE_VM."""
        vm_fd = ioctl(self.fileno(), Ioctl.KVM_CREATE_VM, machine_type)
        return Vm(vm_fd, self.vcpu_mmap_size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # Only the fd: no logging or other work in a finalizer.
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)
