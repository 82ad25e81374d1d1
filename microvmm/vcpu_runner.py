"""One thread per vCPU: run it, dispatch its exits to the buses, and turn
anything abnormal into a precise report instead of a hang.

Other threads never issue ioctls on a running vCPU (KVM would block them until
KVM_RUN returns). They post a request and kick the thread out of KVM_RUN with
a signal; the vCPU thread then answers with a snapshot of its own state.
"""

from __future__ import annotations

import enum
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from microvmm.kvm import (ExitReason, InternalErrorSuberror, IoDirection, KvmExitDataError, MpState,
                          SystemEvent)
from microvmm.host.osthread import set_os_thread_name

if TYPE_CHECKING:
    from microvmm.diag.report import CpuSnapshot, LastSeen

logger = logging.getLogger(__name__)

# Delivered to a vCPU thread only to make KVM_RUN return EINTR; its Python
# handler does nothing. SIGUSR2 is free: SIGUSR1 is the user's "where are you".
KICK_SIGNAL = signal.SIGUSR2

_BP_VECTOR = 3
_INT3 = 0xCC
_FWAIT = 0x9B
_PAGE = 4096
_RFLAGS_IF = 1 << 9
_SHUTDOWN = int(ExitReason.SHUTDOWN)
_GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _exit_name(reason: int) -> str:
    try:
        return ExitReason(reason).name.lower()
    except ValueError:
        return f"exit_{reason}"


class StopReason(enum.Enum):
    RESET = "the guest requested a reset (reboot)"
    POWER_OFF = "the guest powered off"
    HALTED = "the guest halted"
    SHUTDOWN = "the guest shut down"
    TRIPLE_FAULT = "triple fault (KVM_EXIT_SHUTDOWN)"
    EMULATION_FAILURE = "instruction emulation failed"
    INTERNAL_ERROR = "KVM internal error"
    FAIL_ENTRY = "KVM could not enter the guest"
    UNEXPECTED_EXIT = "unexpected vCPU exit"
    HOST_ERROR = "VMM error while handling an exit"


class DeviceGate:
    """Holds vCPU exits that need devices until the VMM has registered them all.

    The VMM starts the vCPUs before it builds the devices (the guest touches
    none for its first seconds): a vCPU whose first I/O or MMIO exit comes
    earlier waits here, then gets the buses, or nothing if the build failed.
    """

    def __init__(self) -> None:
        self._decided = threading.Event()
        self._buses: tuple | None = None

    def open(self, io_bus, mmio_bus) -> None:
        """All devices are registered: release the waiting exits to these buses."""
        self._buses = (io_bus, mmio_bus)
        self._decided.set()

    def fail(self) -> None:
        """The device build failed: waiting exits are never dispatched."""
        self._decided.set()

    def wait(self, stopping: threading.Event, poll: float = 0.05) -> tuple | None:
        """(io_bus, mmio_bus) once open; None if the build failed or `stopping` got set first."""
        while not self._decided.wait(poll):
            if stopping.is_set():
                return None
        return self._buses


@dataclass
class VcpuStop:
    """Why a vCPU thread ended the VM, with its state when that mattered."""

    reason: StopReason
    detail: str = ""
    snapshot: CpuSnapshot | None = None
    fatal: bool = True
    #: Registers at the vCPU's last exit before a triple fault (when KVM
    #: synced them), the position to report when KVM reset the vCPU.
    last_seen: LastSeen | None = None
    #: KVM reset the vCPU on the triple fault (AMD SVM): `snapshot` is None,
    #: the registers it read were the reset state.
    vcpu_reset: bool = False


class VcpuRunner:
    """Runs one vCPU on its own thread until the VM stops."""

    def __init__(self, index: int, vcpu, memory, io_bus, mmio_bus, quirks,
                 on_stop: Callable[[VcpuStop], None], gate: DeviceGate | None = None,
                 sync_exit_regs: bool = False):
        """Either both buses, or None for both and a `gate` that delivers them later.

        `sync_exit_regs` (when KVM offers KVM_CAP_SYNC_REGS): KVM copies the
        registers into kvm_run at each exit and the thread keeps them until
        the next exit, so a triple fault after which KVM reset the vCPU (AMD)
        can still say where the guest was last seen."""
        if (io_bus is None) != (mmio_bus is None) or (io_bus is None) != (gate is not None):
            raise ValueError("pass both buses, or neither and a DeviceGate")
        self.index = index
        self.vcpu = vcpu
        self._memory = memory
        self._io_bus = io_bus
        self._mmio_bus = mmio_bus
        self._quirks = quirks
        self._on_stop = on_stop
        self._gate = gate
        self._stopping = threading.Event()
        #: Set just before the thread's first KVM_RUN (see wait_entering_guest).
        self._entering_guest = threading.Event()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"microvmm-vcpu{index}", daemon=True)
        self.workarounds_applied: dict[str, int] = {}
        #: Exits by reason, for statistics; only this vCPU's thread writes it.
        self.exit_counts: dict[str, int] = {}
        #: Seconds this vCPU's first device exit waited at the gate, and that
        #: exit (statistics).
        self.gate_wait_s = 0.0
        self.gate_exit = ""
        self._sync_exit_regs = sync_exit_regs
        self._exit_regs: memoryview | None = None  # into kvm_run: only while the thread runs
        # Copy of the registers at the last exit (or at entry), its time and reason.
        self._seen_regs: bytearray | None = None
        self._seen_at = 0.0
        self._seen_reason: int | None = None

    # -- control from other threads --------------------------------------

    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return soon (now, or right at its next entry)."""
        self.vcpu.immediate_exit = 1
        if self.thread.is_alive() and self.thread.ident is not None:
            try:
                signal.pthread_kill(self.thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def wait_entering_guest(self, timeout: float = 1.0) -> bool:
        """Block (GIL released) until this thread is about to issue its first KVM_RUN.

        A thread that has just started competes for the GIL with the one that
        started it; without this wait, the starter's next work (imports) can
        hold the vCPU out of the guest for a switch interval or more."""
        return self._entering_guest.wait(timeout)

    def stop(self) -> None:
        self._stopping.set()
        self.kick()

    def request_snapshot(self, timeout: float = 2.0) -> CpuSnapshot | None:
        """The vCPU's state, taken by its own thread between two KVM_RUNs."""
        return self._ask("snapshot", timeout)

    def request_rip(self, timeout: float = 0.5) -> tuple[int, bool] | None:
        """(RIP, in user mode) between two KVM_RUNs: one KVM_GET_REGS, for sampling."""
        return self._ask("rip", timeout)

    def request_stopped_for_good(self, timeout: float = 1.0) -> bool | None:
        """Whether the vCPU will not run again by itself: in HLT with interrupts
        off (KVM_GET_MP_STATE HALTED, RFLAGS.IF clear), where Linux leaves a CPU
        it has halted or powered off (stop_this_cpu), or an AP that was never
        started (waiting for INIT/SIPI). Only an NMI, INIT or SIPI would wake
        it. None: the vCPU thread did not answer."""
        return self._ask("stopped", timeout)

    def _ask(self, what: str, timeout: float):
        if not self.thread.is_alive():
            return None
        answer: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put((what, answer))
        self.kick()
        try:
            return answer.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- the vCPU thread ---------------------------------------------------

    def _run(self) -> None:
        set_os_thread_name(f"vcpu{self.index}")
        try:
            self._loop()
        except Exception as err:  # a VMM bug must end the VM loudly, not hang it
            logger.exception("vCPU %d: error handling an exit", self.index)
            self._finish(VcpuStop(StopReason.HOST_ERROR, f"{type(err).__name__}: {err}",
                                  self._safe_snapshot()))
        finally:
            if self._exit_regs is not None:
                self._exit_regs.release()  # a view into kvm_run: Vcpu.close() unmaps it
                self._exit_regs = None

    def _start_seen(self) -> None:
        """The state before the first KVM_RUN: where a vCPU that faults in its
        very first run was last seen."""
        if not self._sync_exit_regs:
            return
        try:
            regs = self.vcpu.get_regs()
        except OSError:
            return
        self._exit_regs = self.vcpu.sync_registers_at_exit()
        self._seen_regs = bytearray(regs.to_bytes())
        self._seen_at = time.monotonic()

    def _loop(self) -> None:
        vcpu = self.vcpu
        counts = self.exit_counts
        counts.setdefault("io", 0)
        counts.setdefault("mmio", 0)
        self._start_seen()
        exit_regs, seen = self._exit_regs, self._seen_regs
        monotonic = time.monotonic
        self._entering_guest.set()
        while not self._stopping.is_set():
            reason = vcpu.run()
            if seen is not None and reason != _SHUTDOWN:
                # Keep this exit's registers: after a SHUTDOWN, KVM may have
                # reset the vCPU, and these are all that says where it was
                # (~0.2 us per exit: no ioctl, KVM wrote them into kvm_run).
                seen[:] = exit_regs
                self._seen_at = monotonic()
                self._seen_reason = reason
            if reason == ExitReason.IO:
                counts["io"] += 1
                port, size, count, data, out = self._io_exit(vcpu)
                if data is None:
                    return
                bus = self._io_bus
                if bus is None:  # devices still being built: once per run
                    self.gate_exit = f"{'out' if out else 'in'} {port:#x}"
                    if not self._await_devices():
                        return
                    bus = self._io_bus
                if count == 1:  # the common case: one in/out instruction
                    if out:
                        bus.write(port, size, int.from_bytes(data, "little"))
                    else:
                        data[:] = bus.read(port, size).to_bytes(size, "little")
                    continue
                for i in range(count):  # rep ins/outs
                    item = data[i * size:(i + 1) * size]
                    if out:
                        bus.write(port, size, int.from_bytes(item, "little"))
                    else:
                        item[:] = bus.read(port, size).to_bytes(size, "little")
                continue
            if reason == ExitReason.MMIO:
                counts["mmio"] += 1
                mmio = vcpu.mmio
                if self._mmio_bus is None:
                    self.gate_exit = f"mmio {'write' if mmio.is_write else 'read'} {mmio.phys_addr:#x}"
                    if not self._await_devices():
                        return
                if mmio.is_write:
                    self._mmio_bus.write(mmio.phys_addr, mmio.len, int.from_bytes(mmio.data, "little"))
                else:
                    mmio.data[:] = self._mmio_bus.read(mmio.phys_addr, mmio.len).to_bytes(mmio.len, "little")
                continue
            if reason == ExitReason.INTR:
                vcpu.immediate_exit = 0
                self._serve_requests()
                continue
            name = _exit_name(reason)
            counts[name] = counts.get(name, 0) + 1
            if not self._handle_rare_exit(reason):
                return
        self._serve_requests()

    def _await_devices(self) -> bool:
        """Wait at the gate for the buses; False: the VM is stopping (the build failed)."""
        waited_from = time.monotonic()
        buses = self._gate.wait(self._stopping)
        self.gate_wait_s = time.monotonic() - waited_from
        if buses is None:
            self._stopping.set()
            return False
        self._io_bus, self._mmio_bus = buses
        return True

    def _io_exit(self, vcpu):
        try:
            io = vcpu.io
        except KvmExitDataError as err:
            self._finish(VcpuStop(StopReason.HOST_ERROR, str(err), self._safe_snapshot()))
            return 0, 0, 0, None, False
        return io.port, io.size, io.count, io.data, io.direction == IoDirection.OUT

    def _serve_requests(self) -> None:
        while True:
            try:
                what, answer = self._requests.get_nowait()
            except queue.Empty:
                return
            if what == "rip":
                regs = self.vcpu.get_regs()
                # Linux keeps the kernel in the upper canonical half: a lower-half
                # RIP is user mode (saves a KVM_GET_SREGS per sample).
                answer.put((regs.rip, regs.rip < 0x8000_0000_0000_0000))
            elif what == "stopped":
                answer.put(self._stopped_for_good())
            else:
                answer.put(self._safe_snapshot())

    def _stopped_for_good(self) -> bool:
        try:
            state = self.vcpu.get_mp_state()
            if state in (MpState.UNINITIALIZED, MpState.INIT_RECEIVED):
                return True
            return state == MpState.HALTED and not self.vcpu.get_regs().rflags & _RFLAGS_IF
        except OSError as err:
            logger.debug("vCPU %d: halt state: %s", self.index, err)
            return False

    def _handle_rare_exit(self, reason: int) -> bool:
        """Handle an exit that is not I/O; False ends this vCPU (and the VM)."""
        if reason == ExitReason.SHUTDOWN:
            self._finish(self._triple_fault_stop())
            return False
        if reason == ExitReason.SYSTEM_EVENT:
            kind = self.vcpu.system_event.type
            if kind == SystemEvent.RESET:
                self._finish(VcpuStop(StopReason.RESET, "system event", fatal=False))
            elif kind == SystemEvent.SHUTDOWN:
                self._finish(VcpuStop(StopReason.SHUTDOWN, "system event", fatal=False))
            else:
                self._finish(VcpuStop(StopReason.UNEXPECTED_EXIT, f"system event type {kind}",
                                      self._safe_snapshot()))
            return False
        if reason == ExitReason.INTERNAL_ERROR:
            return self._handle_internal_error()
        if reason == ExitReason.FAIL_ENTRY:
            code = self.vcpu.fail_entry.hardware_entry_failure_reason
            self._finish(VcpuStop(StopReason.FAIL_ENTRY, f"hardware entry failure reason {code:#x}",
                                  self._safe_snapshot()))
            return False
        if reason == ExitReason.HLT:
            # Only without an in-kernel irqchip; this VMM always has one.
            self._finish(VcpuStop(StopReason.SHUTDOWN, "the vCPU halted", self._safe_snapshot(), fatal=False))
            return False
        self._finish(VcpuStop(StopReason.UNEXPECTED_EXIT, f"exit reason {_exit_name(reason)}",
                              self._safe_snapshot()))
        return False

    def _triple_fault_stop(self) -> VcpuStop:
        from microvmm.diag.report import is_reset_state  # deferred: diagnostics only
        fault_time = time.monotonic()
        snapshot = self._safe_snapshot()
        last_seen = self._last_seen(fault_time)
        if snapshot is not None and is_reset_state(snapshot):
            # AMD SVM clears the VMCB and INITs the vCPU on a shutdown
            # (svm.c shutdown_interception): decoding f000:fff0 would be a lie.
            return VcpuStop(
                StopReason.TRIPLE_FAULT,
                "KVM reset the vCPU when it shut down: its registers now hold the x86 reset "
                "state (CS:IP f000:fff0, as AMD SVM leaves them), not the faulting instruction",
                None, last_seen=last_seen, vcpu_reset=True)
        return VcpuStop(StopReason.TRIPLE_FAULT, "", snapshot, last_seen=last_seen)

    def _last_seen(self, now: float) -> LastSeen | None:
        if self._seen_regs is None:
            return None
        from microvmm.diag.report import LastSeen
        from microvmm.kvm import Regs
        regs = Regs.from_bytes(self._seen_regs)
        reason = self._seen_reason
        return LastSeen(index=self.index, rip=regs.rip, rflags=regs.rflags,
                        gprs={name: getattr(regs, name) for name in _GPR_NAMES},
                        exit_name=None if reason is None else _exit_name(reason),
                        seconds_before=max(0.0, now - self._seen_at))

    def _handle_internal_error(self) -> bool:
        internal = self.vcpu.internal_error
        if internal.suberror != InternalErrorSuberror.EMULATION:
            self._finish(VcpuStop(StopReason.INTERNAL_ERROR,
                                  f"suberror {internal.suberror}, data {[hex(d) for d in internal.data]}",
                                  self._safe_snapshot()))
            return False
        insn = self.vcpu.emulation_failure.insn_bytes or b""
        regs = self.vcpu.get_regs()
        if not insn:
            insn = self._code_at(regs.rip)
        if insn and self._quirks.inject_bp_on_int3 and insn[0] == _INT3:
            # int3 is a trap: the #BP frame must hold the address after it.
            # kvm_pvm delivers an injected exception, #BP too, at the current
            # RIP with no instruction length (do_pvm_event), so RIP moves past
            # the int3 first. Only right for kvm_pvm: SVM would decode the
            # instruction after the int3 and drop the #BP, VMX would add a
            # stale length (Vcpu.inject_exception); hardware KVM runs int3
            # itself and never gets here.
            regs.rip += 1
            self.vcpu.set_regs(regs)
            self.vcpu.inject_exception_as_is(_BP_VECTOR)
            self._note_workaround("int3: injected #BP")
            return True
        if insn and self._quirks.skip_fwait and insn[0] == _FWAIT:
            regs.rip += 1  # fwait only checks for pending x87 exceptions
            self.vcpu.set_regs(regs)
            self._note_workaround("fwait: skipped")
            return True
        snapshot = self._safe_snapshot(code=insn)
        self._finish(VcpuStop(StopReason.EMULATION_FAILURE,
                              f"KVM could not emulate the instruction at RIP {regs.rip:#x}", snapshot))
        return False

    def _note_workaround(self, what: str) -> None:
        count = self.workarounds_applied.get(what, 0) + 1
        self.workarounds_applied[what] = count
        if count == 1:
            logger.warning("host workaround: %s (vCPU %d); further ones are counted", what, self.index)

    def _finish(self, stop: VcpuStop) -> None:
        self._stopping.set()
        self._on_stop(stop)

    # -- state capture (vCPU thread only) ----------------------------------

    def _code_at(self, rip: int, length: int = 15) -> bytes:
        """Up to `length` bytes at guest virtual `rip`, translated page by page."""
        out = b""
        address = rip
        while len(out) < length:
            try:
                gpa, valid = self.vcpu.translate(address)
            except OSError:
                break
            if not valid:
                break
            take = min(length - len(out), _PAGE - (address % _PAGE))
            if not self._memory.contains(gpa, take):
                break
            out += self._memory.read(gpa, take)
            address += take
        return out

    def _safe_snapshot(self, code: bytes | None = None) -> CpuSnapshot | None:
        try:
            return self.snapshot(code)
        except Exception as err:  # the report must not fail because the state is odd
            logger.debug("vCPU %d: snapshot failed: %s", self.index, err)
            return None

    def snapshot(self, code: bytes | None = None) -> CpuSnapshot:
        from microvmm.diag.report import CpuSnapshot  # deferred: diagnostics only
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        gprs = {name: getattr(regs, name) for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")}
        return CpuSnapshot(
            index=self.index, rip=regs.rip, rflags=regs.rflags, gprs=gprs,
            cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer,
            cs_selector=sregs.cs.selector, cs_long=bool(sregs.cs.l), cs_db=bool(sregs.cs.db),
            code=code if code else self._code_at(regs.rip),
        )
