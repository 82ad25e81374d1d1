"""``Vcpu``: one vCPU fd, its shared kvm_run page, and register access."""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from microvmm.kvm._ffi import ffi, libc
from microvmm.kvm._ioctl import ioctl
from microvmm.kvm.constants import (
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_SYNC_X86_REGS,
    ExitReason,
    Ioctl,
    MpState,
)
from microvmm.kvm.errors import KvmError, KvmExitDataError, SoftExceptionError
from microvmm.kvm.state import CpuidEntry, Fpu, Regs, Sregs

if TYPE_CHECKING:
    from microvmm.kvm.events import VcpuEvents

logger = logging.getLogger(__name__)

_KVM_RUN = int(Ioctl.KVM_RUN)
_EXIT_INTR = int(ExitReason.INTR)
_RUN_INTERRUPTED = (errno.EINTR, errno.EAGAIN)
_MMIO_DATA_OFFSET = ffi.offsetof("struct kvm_run", "mmio", "data")
_KVM_RUN_SIZE = ffi.sizeof("struct kvm_run")
_SYNC_REGS_OFFSET = ffi.offsetof("struct kvm_run", "s", "regs", "regs")
_SYNC_REGS_SIZE = ffi.sizeof("struct kvm_regs")
_IO_SIZES = (1, 2, 4)
_MAX_EXCEPTION_VECTOR = 31
_NMI_VECTOR = 2
#: The vectors KVM injects as software exceptions (x86.c kvm_exception_is_soft):
#: #BP, raised by INT3, and #OF, raised by INTO.
SOFT_EXCEPTION_VECTORS = frozenset({3, 4})
_MAX_DEBUGREGS = 8


class IoExit(NamedTuple):
    """KVM_EXIT_IO. ``data`` is a writable view of the shared page: for IN,
    fill it before the next run(); it holds ``size * count`` bytes."""

    direction: int  # IoDirection
    size: int
    port: int
    count: int
    data: memoryview


class MmioExit(NamedTuple):
    """KVM_EXIT_MMIO. ``data`` (``len`` bytes) is a writable view of
    kvm_run.mmio.data: for a read, fill it before the next run()."""

    phys_addr: int
    data: memoryview
    len: int
    is_write: bool


class InternalError(NamedTuple):
    """KVM_EXIT_INTERNAL_ERROR (kvm_run.internal)."""

    suberror: int  # InternalErrorSuberror
    data: tuple[int, ...]  # the first min(ndata, 16) words


class EmulationFailure(NamedTuple):
    """KVM_EXIT_INTERNAL_ERROR with suberror EMULATION (kvm_run.emulation_failure).
    ``insn_bytes`` is None unless KVM reported the instruction bytes."""

    suberror: int
    flags: int
    insn_bytes: bytes | None


class SystemEventExit(NamedTuple):
    """KVM_EXIT_SYSTEM_EVENT."""

    type: int  # SystemEvent
    data: tuple[int, ...]


class FailEntry(NamedTuple):
    """KVM_EXIT_FAIL_ENTRY."""

    hardware_entry_failure_reason: int
    cpu: int


class DebugExit(NamedTuple):
    """KVM_EXIT_DEBUG (kvm_run.debug.arch)."""

    exception: int
    pc: int
    dr6: int
    dr7: int


class Vcpu:
    """A vCPU fd from ``Vm.create_vcpu()``.

    Not thread-safe: drive it from one thread. Register ioctls issued while
    the vCPU is inside KVM_RUN block until it exits (kick it first, e.g. with
    ``immediate_exit`` plus a signal).
    """

    def __init__(self, fd: int, index: int, mmap_size: int):
        self._fd = fd
        self.index = index
        self._mmap_size = mmap_size
        self._mmap = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._mmap)
        # Points into the shared page: reads see what KVM wrote, no copy.
        self._run = ffi.from_buffer("struct kvm_run *", self._mmap)
        self._ioctl = libc.ioctl

    # -- the kvm_run page --------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("Vcpu is closed")
        return self._fd

    @property
    def run_struct(self):
        """The shared ``struct kvm_run *`` (cffi pointer into the mmap)."""
        return self._run

    @property
    def exit_reason(self) -> int:
        return self._run.exit_reason

    @property
    def immediate_exit(self) -> bool:
        return bool(self._run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        # Set from another thread or a signal handler to make the next (or
        # the interrupted) KVM_RUN return at once with EINTR; KVM never clears
        # it, so the caller clears it after run() returned INTR.
        self._run.immediate_exit = 1 if value else 0

    @property
    def request_interrupt_window(self) -> bool:
        return bool(self._run.request_interrupt_window)

    @request_interrupt_window.setter
    def request_interrupt_window(self, value: bool) -> None:
        self._run.request_interrupt_window = 1 if value else 0

    def sync_registers_at_exit(self) -> memoryview:
        """Have KVM copy the general registers into kvm_run at every exit
        (kvm_valid_regs = KVM_SYNC_X86_REGS; check Cap.SYNC_REGS first) and
        return a read-only view of them: the registers of the last exit, valid
        until the next run(). ``Regs.from_bytes`` decodes a copy. Costs no
        ioctl: KVM writes them while it returns from KVM_RUN."""
        self._run.kvm_valid_regs = KVM_SYNC_X86_REGS
        return self._view[_SYNC_REGS_OFFSET:_SYNC_REGS_OFFSET + _SYNC_REGS_SIZE].toreadonly()

    def run(self) -> int:
        """KVM_RUN. Returns the exit reason (an ExitReason value), or
        ExitReason.INTR when a signal or ``immediate_exit`` interrupted it."""
        if self._ioctl(self._fd, _KVM_RUN, ffi.NULL) < 0:
            err = ffi.errno
            if err in _RUN_INTERRUPTED:
                return _EXIT_INTR
            raise KvmError("KVM_RUN", err)
        return self._run.exit_reason

    @property
    def io(self) -> IoExit:
        """The KVM_EXIT_IO details; ``data`` bounds-checked against the mapping."""
        io = self._run.io
        size = io.size
        count = io.count
        offset = io.data_offset
        if size not in _IO_SIZES:
            raise KvmExitDataError(f"KVM_EXIT_IO with access size {size}")
        end = offset + size * count
        if count == 0 or offset < _KVM_RUN_SIZE or end > self._mmap_size:
            raise KvmExitDataError(
                f"KVM_EXIT_IO data {offset:#x}+{size}x{count} outside the "
                f"{self._mmap_size:#x}-byte kvm_run mapping")
        return IoExit(io.direction, size, io.port, count, self._view[offset:end])

    @property
    def mmio(self) -> MmioExit:
        """The KVM_EXIT_MMIO details."""
        mmio = self._run.mmio
        length = mmio.len
        if not 1 <= length <= 8:
            raise KvmExitDataError(f"KVM_EXIT_MMIO with length {length}")
        return MmioExit(mmio.phys_addr,
                        self._view[_MMIO_DATA_OFFSET:_MMIO_DATA_OFFSET + length],
                        length, bool(mmio.is_write))

    @property
    def internal_error(self) -> InternalError:
        internal = self._run.internal
        ndata = min(internal.ndata, 16)
        return InternalError(internal.suberror, tuple(internal.data[0:ndata]))

    @property
    def emulation_failure(self) -> EmulationFailure:
        failure = self._run.emulation_failure
        insn: bytes | None = None
        if failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            size = min(failure.insn_size, 15)
            insn = bytes(ffi.buffer(failure.insn_bytes, size))
        return EmulationFailure(failure.suberror, failure.flags, insn)

    @property
    def system_event(self) -> SystemEventExit:
        event = self._run.system_event
        ndata = min(event.ndata, 16)
        return SystemEventExit(event.type, tuple(event.data[0:ndata]))

    @property
    def fail_entry(self) -> FailEntry:
        fail = self._run.fail_entry
        return FailEntry(fail.hardware_entry_failure_reason, fail.cpu)

    @property
    def debug_exit(self) -> DebugExit:
        arch = self._run.debug.arch
        return DebugExit(arch.exception, arch.pc, arch.dr6, arch.dr7)

    # -- registers ---------------------------------------------------------

    def get_regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        ioctl(self.fileno(), Ioctl.KVM_GET_REGS, c)
        return Regs.from_c(c)

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *")
        regs.to_c(c)
        ioctl(self.fileno(), Ioctl.KVM_SET_REGS, c)

    def get_sregs(self) -> Sregs:
        c = ffi.new("struct kvm_sregs *")
        ioctl(self.fileno(), Ioctl.KVM_GET_SREGS, c)
        return Sregs.from_c(c)

    def set_sregs(self, sregs: Sregs) -> None:
        c = ffi.new("struct kvm_sregs *")
        sregs.to_c(c)
        ioctl(self.fileno(), Ioctl.KVM_SET_SREGS, c)

    def get_fpu(self) -> Fpu:
        c = ffi.new("struct kvm_fpu *")
        ioctl(self.fileno(), Ioctl.KVM_GET_FPU, c)
        return Fpu.from_c(c)

    def set_fpu(self, fpu: Fpu) -> None:
        c = ffi.new("struct kvm_fpu *")
        fpu.to_c(c)
        ioctl(self.fileno(), Ioctl.KVM_SET_FPU, c)

    def set_cpuid2(self, entries: Sequence[CpuidEntry]) -> None:
        """KVM_SET_CPUID2: the CPUID the guest sees."""
        c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, entry in enumerate(entries):
            entry.to_c(c.entries[i])
        ioctl(self.fileno(), Ioctl.KVM_SET_CPUID2, c)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS. Raises KvmError if KVM cannot read one of them."""
        indices = list(indices)
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            c.entries[i].index = index
        done = ioctl(self.fileno(), Ioctl.KVM_GET_MSRS, c)
        if done != len(indices):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL,
                           f"read {done} of {len(indices)} MSRs; MSR {indices[done]:#x} failed")
        return {c.entries[i].index: c.entries[i].data for i in range(done)}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """KVM_SET_MSRS. Raises KvmError if KVM rejects one of them."""
        items = list(values.items())
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (index, value) in enumerate(items):
            c.entries[i].index = index
            c.entries[i].data = value
        done = ioctl(self.fileno(), Ioctl.KVM_SET_MSRS, c)
        if done != len(items):
            raise KvmError("KVM_SET_MSRS", errno.EINVAL,
                           f"wrote {done} of {len(items)} MSRs; MSR {items[done][0]:#x} "
                           f"= {items[done][1]:#x} rejected")

    def get_vcpu_events(self) -> VcpuEvents:
        from microvmm.kvm.events import VcpuEvents  # deferred: start-up time (issue 6)
        c = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.fileno(), Ioctl.KVM_GET_VCPU_EVENTS, c)
        return VcpuEvents.from_c(c)

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        c = ffi.new("struct kvm_vcpu_events *")
        events.to_c(c)
        ioctl(self.fileno(), Ioctl.KVM_SET_VCPU_EVENTS, c)

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Make the guest take exception ``vector`` at its current RIP on the
        next KVM_RUN, as if the instruction at RIP had faulted: the exception
        frame holds RIP itself (KVM_SET_VCPU_EVENTS, exception.injected = 1).
        That is what VMX, SVM and kvm_pvm all do for a hardware exception.

        #BP (3) and #OF (4) raise SoftExceptionError. KVM injects those as
        *software* exceptions, the completion of an INT3/INTO instruction at
        RIP, whose frame must hold the address after it, and each KVM gets
        that address its own way (read in the Linux and PVM sources):

        - SVM (svm_inject_exception -> svm_update_soft_interrupt_rip) skips the
          instruction at RIP first: with the VMCB's NextRIP when the last
          #VMEXIT left one there (stale after an unrelated exit), else by
          decoding it; since the fix for replaced INT3s (x86.c
          is_soft_int_instruction; the Debian 6.1 kernel of the nested-SVM
          lane has it) it drops the event unless that instruction is
          INT3/INTO: the guest never sees it and re-runs the instruction (on
          a `jmp $`, for ever).
        - VMX (vmx_inject_exception) enters with VM_ENTRY_INSTRUCTION_LEN =
          the length of the last exit's instruction (event_exit_inst_len),
          right only after a #BP intercept (guest debugging), else stale or 0.
        - kvm_pvm (pvm_inject_exception -> do_pvm_event) delivers it at the
          current RIP like a fault, with no instruction length.

        So no (RIP, event) pair means the same on all of them, and
        KVM_GET_VCPU_EVENTS never reports a soft exception ("The API doesn't
        provide the instruction length for software exceptions"). Code that
        knows its KVM uses ``inject_exception_as_is`` (the kvm_pvm int3
        workaround in vcpu_runner.py does).
        """
        if vector in SOFT_EXCEPTION_VECTORS:
            raise SoftExceptionError(
                f"exception vector {vector} (#{'BP' if vector == 3 else 'OF'}) is a software "
                "exception: KVM completes the INT3/INTO at RIP differently on SVM, VMX and "
                "kvm_pvm; see Vcpu.inject_exception")
        self.inject_exception_as_is(vector, error_code)

    def inject_exception_as_is(self, vector: int, error_code: int | None = None) -> None:
        """KVM_SET_VCPU_EVENTS with exception ``vector`` injected, #BP and #OF
        included, leaving RIP and the delivery to this KVM's own rules (see
        inject_exception). The vector and error code are checked."""
        if not 0 <= vector <= _MAX_EXCEPTION_VECTOR:
            raise ValueError(f"exception vector {vector} is not 0..31")
        if vector == _NMI_VECTOR:
            # An interrupt, not an exception: KVM_SET_VCPU_EVENTS refuses it (EINVAL).
            raise ValueError("vector 2 is the NMI, an interrupt: KVM_SET_VCPU_EVENTS takes no exception 2")
        if error_code is not None and not 0 <= error_code <= 0xFFFF_FFFF:
            raise ValueError(f"error code {error_code:#x} does not fit in 32 bits")
        from microvmm.kvm.events import ExceptionEvent
        events = self.get_vcpu_events()
        events.exception = ExceptionEvent(
            injected=1, nr=vector, has_error_code=int(error_code is not None),
            pending=0, error_code=error_code or 0)
        events.exception_has_payload = 0
        events.exception_payload = 0
        self.set_vcpu_events(events)

    def translate(self, gva: int) -> tuple[int, bool]:
        """KVM_TRANSLATE: guest virtual (linear) address -> (guest physical, valid)."""
        c = ffi.new("struct kvm_translation *", {"linear_address": gva})
        ioctl(self.fileno(), Ioctl.KVM_TRANSLATE, c)
        return c.physical_address, bool(c.valid)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (an MpState value)."""
        c = ffi.new("struct kvm_mp_state *")
        ioctl(self.fileno(), Ioctl.KVM_GET_MP_STATE, c)
        try:
            return MpState(c.mp_state)
        except ValueError:
            return c.mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fileno(), Ioctl.KVM_SET_MP_STATE,
              ffi.new("struct kvm_mp_state *", {"mp_state": int(state)}))

    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the 1 KiB local APIC register page."""
        c = ffi.new("struct kvm_lapic_state *")
        ioctl(self.fileno(), Ioctl.KVM_GET_LAPIC, c)
        return bytes(ffi.buffer(c))

    def set_lapic(self, regs: bytes) -> None:
        c = ffi.new("struct kvm_lapic_state *")
        if len(regs) != ffi.sizeof(c[0]):
            raise ValueError(f"LAPIC state must be {ffi.sizeof(c[0])} bytes")
        ffi.buffer(c)[:] = regs
        ioctl(self.fileno(), Ioctl.KVM_SET_LAPIC, c)

    def set_guest_debug(self, control: int, debugregs: Sequence[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG (control: GuestDebugFlag; debugregs: DR0..DR7)."""
        if len(debugregs) > _MAX_DEBUGREGS:
            raise ValueError(f"at most {_MAX_DEBUGREGS} debug registers")
        c = ffi.new("struct kvm_guest_debug *", {"control": int(control)})
        for i, value in enumerate(debugregs):
            c.arch.debugreg[i] = value
        ioctl(self.fileno(), Ioctl.KVM_SET_GUEST_DEBUG, c)

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        if self._fd < 0:
            return
        ffi.release(self._run)
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            # Someone still holds an io/mmio data view: the mapping stays until
            # those views are dropped; never unmap under a live view.
            logger.warning("vCPU %d: kvm_run views still referenced; mapping kept", self.index)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "Vcpu":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)
