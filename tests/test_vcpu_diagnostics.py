"""VcpuRunner on real KVM with tiny hand-assembled guests: port I/O reaches
the bus, a triple fault ends the VM with a snapshot at the faulting
instruction, and another thread can ask a spinning vCPU where it is.

Skipped when /dev/kvm cannot be used. The guests are only a few instructions,
so they run in microseconds even where guest kernel code is emulated. The
REP I/O path (count > 1, which this host's emulator may split into single
exits) is also driven directly with a scripted vCPU.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time

import pytest

from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
from microvmm.diag.report import LastSeen, format_last_seen, format_snapshot
from microvmm.host.hostinfo import HostKind, host_quirks
from microvmm.kvm import KVM_SYNC_X86_REGS, Cap, ExitReason, IoDirection, IoExit, Kvm, Regs
from microvmm.memory import GuestMemory
from microvmm.vcpu_runner import StopReason, VcpuRunner, VcpuStop

pytestmark = pytest.mark.usefixtures("kick_handler")  # conftest.py: vCPUs get kicked

RAM_SIZE = 0x4000
CODE = 0x1000
DATA = 0x1100
STOP_TIMEOUT = 10.0

NO_QUIRKS = host_quirks(HostKind.HARDWARE, "test: no workarounds")


class RecordingDevice:
    """A port device that logs every access and answers reads from a script."""

    def __init__(self, answers: dict[int, list[int]] | None = None):
        self.accesses: list[tuple[str, int, int, int]] = []
        self._answers = answers or {}
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            values = self._answers.get(offset, [])
            value = values.pop(0) if values else 0xEE
            self.accesses.append(("r", offset, size, value))
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self.accesses.append(("w", offset, size, value))


class Guest:
    """One VM with 16 KiB of RAM at 0 and one vCPU at CODE, real mode by default."""

    def __init__(self, kvm: Kvm, code: bytes, protected: bool = False, idt_limit: int | None = None):
        self.vm = kvm.create_vm()
        self.mem = GuestMemory([(0, RAM_SIZE)])
        self.vm.set_user_memory_region(0, 0, RAM_SIZE, self.mem.regions[0].host_addr)
        self.mem.write(CODE, code)
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
            seg.base, seg.selector = 0, 0
        if protected:
            # Flat 32-bit segments straight into the descriptor caches: no GDT needed.
            sregs.cr0 |= 1
            for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
                seg.limit, seg.g, seg.db, seg.present, seg.s = 0xFFFFFFFF, 1, 1, 1, 1
            sregs.cs.type, sregs.cs.selector = 0xB, 0x08
            for seg in (sregs.ds, sregs.es, sregs.ss):
                seg.type, seg.selector = 0x3, 0x10
        if idt_limit is not None:
            sregs.idt.base, sregs.idt.limit = 0, idt_limit
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(Regs(rip=CODE, rsp=0x3000, rflags=0x2))
        self.io_bus = Bus("pio", PIO_ADDRESS_LIMIT)
        self.mmio_bus = Bus("mmio")
        self.stops: queue.SimpleQueue[VcpuStop] = queue.SimpleQueue()
        # As the VMM does: each exit's registers kept, for a vCPU KVM resets on a triple fault.
        self.sync_regs = bool(self.vm.check_extension(Cap.SYNC_REGS) & KVM_SYNC_X86_REGS)
        self.runner = VcpuRunner(0, self.vcpu, self.mem, self.io_bus, self.mmio_bus, NO_QUIRKS,
                                 on_stop=self.stops.put,
                                 sync_exit_regs=self.sync_regs)

    def wait_stop(self) -> VcpuStop:
        try:
            stop = self.stops.get(timeout=STOP_TIMEOUT)
        except queue.Empty:
            self.runner.stop()
            pytest.fail("the vCPU did not stop")
        self.runner.thread.join(STOP_TIMEOUT)
        assert not self.runner.thread.is_alive()
        return stop

    def close(self) -> None:
        if self.runner.thread.is_alive():
            self.runner.stop()
            self.runner.thread.join(STOP_TIMEOUT)
        self.vm.close()
        self.mem.close()


@pytest.fixture
def make_guest(kvm):
    guests: list[Guest] = []

    def make(code: bytes, **kwargs) -> Guest:
        guest = Guest(kvm, code, **kwargs)
        guests.append(guest)
        return guest

    yield make
    for guest in guests:
        guest.close()


# -- (a) a triple fault ends the VM with the faulting instruction ----------------

UD2 = bytes([0x0F, 0x0B])


def kvm_resets_vcpu_on_shutdown() -> bool:
    """AMD SVM clears the VMCB and INITs the vCPU on a shutdown (svm.c
    shutdown_interception); VMX and kvm_pvm keep the faulting state."""
    return os.path.exists("/sys/module/kvm_amd")


def assert_triple_fault_reported_truthfully(guest, stop: VcpuStop, fault_rip: int, fault_code: bytes,
                                            seen_rips: tuple[int, ...], seen_exit: str | None) -> None:
    """The stop either shows the faulting instruction (VMX, kvm_pvm) or, where
    KVM reset the vCPU (AMD), says so and shows where it was last seen instead."""
    assert stop.reason is StopReason.TRIPLE_FAULT
    assert stop.fatal
    if guest.sync_regs:  # every KVM here offers it; the last position is always kept
        seen = stop.last_seen
        assert seen is not None
        assert seen.rip in seen_rips and seen.exit_name == seen_exit, (hex(seen.rip), seen.exit_name)
        assert 0 <= seen.seconds_before < STOP_TIMEOUT
    if kvm_resets_vcpu_on_shutdown():
        assert stop.vcpu_reset
        assert stop.snapshot is None                      # no decoding of the reset vector
        assert "reset" in stop.detail and "f000:fff0" in stop.detail
        text = format_last_seen(stop.last_seen)
        assert text.startswith(f"vCPU 0: last seen at RIP {stop.last_seen.rip:#x} ")
        return
    assert not stop.vcpu_reset and stop.detail == ""
    snap = stop.snapshot
    assert snap is not None
    assert snap.rip == fault_rip                          # at the faulting instruction, not past it
    assert snap.code.startswith(fault_code)


def test_triple_fault_stops_with_a_snapshot_at_the_faulting_instruction(make_guest):
    # Protected mode with an empty IDT: #UD cannot be delivered (#GP), nor can
    # #GP (#DF), nor #DF: the CPU shuts down, KVM_EXIT_SHUTDOWN.
    code = bytes([0x90, 0x90]) + UD2
    guest = make_guest(code, protected=True, idt_limit=0)
    guest.runner.start()
    stop = guest.wait_stop()
    # It faulted in its first KVM_RUN: last seen where the VMM had put it.
    assert_triple_fault_reported_truthfully(guest, stop, CODE + 2, UD2, (CODE,), None)
    assert guest.runner.exit_counts.get("shutdown") == 1
    if stop.snapshot is not None:
        snap = stop.snapshot
        assert snap.mode_bits == 32 and snap.cpl == 0
        assert snap.cr0 & 1
        report = format_snapshot(snap)
        assert report.splitlines()[0] == f"vCPU 0: RIP {CODE + 2:#x}  CPL 0  32-bit"
        assert "instruction: ud2  (0f 0b)" in report


def test_divide_error_with_empty_idt_is_a_triple_fault_too(make_guest):
    # out 0x10, al (an exit first: the last position seen); xor ecx, ecx; div ecx
    code = bytes([0xE6, 0x10, 0x31, 0xC9, 0xF7, 0xF1])
    guest = make_guest(code, protected=True, idt_limit=0)
    guest.io_bus.register(0x10, 1, RecordingDevice(), "recorder")
    guest.runner.start()
    stop = guest.wait_stop()
    # At the I/O exit RIP is on the OUT (kvm_amd/kvm_intel: x86.c kvm_fast_pio_out
    # completes it at the next KVM_RUN) or past it (kvm_pvm).
    assert_triple_fault_reported_truthfully(guest, stop, CODE + 4, bytes([0xF7, 0xF1]),
                                            (CODE, CODE + 2), "io")


def test_a_vcpu_reset_by_kvm_is_reported_where_it_was_last_seen():
    """The AMD case on any host: after an I/O exit the next exit is a
    SHUTDOWN whose registers are the reset state (scripted vCPU)."""
    vcpu = ResettingVcpu()
    runner, stop = run_scripted(vcpu, NO_QUIRKS, sync_exit_regs=True)
    assert stop.reason is StopReason.TRIPLE_FAULT and stop.vcpu_reset
    assert stop.snapshot is None
    seen = stop.last_seen
    assert (seen.rip, seen.exit_name, seen.gprs["rax"]) == (LONG_MODE_RIP + 2, "io", 0x42)
    assert seen.seconds_before >= 0.05                   # the scripted pause before the fault
    text = format_last_seen(seen)
    assert text.splitlines()[0].startswith(
        f"vCPU 0: last seen at RIP {LONG_MODE_RIP + 2:#x} at its last exit to the VMM (io), ")
    assert "RAX=0000000000000042" in text
    assert "fff0" not in text


def test_last_seen_before_the_first_run_is_labelled_so():
    seen = LastSeen(index=1, rip=0x1000, rflags=2, gprs={}, exit_name=None, seconds_before=0.0012)
    assert format_last_seen(seen).splitlines()[0] == (
        "vCPU 1: last seen at RIP 0x1000 before its first KVM_RUN, 1.2 ms before it stopped "
        "(the state the VMM set)")


# -- (b) port I/O through the bus --------------------------------------------------

def test_port_io_reaches_the_bus_device(make_guest):
    code = bytes([
        0xB0, 0x42,                    # mov al, 0x42
        0xE6, 0x10,                    # out 0x10, al
        0xE4, 0x11,                    # in al, 0x11        (device answers 0x99)
        0xE6, 0x12,                    # out 0x12, al       (the IN value arrived)
        0xB8, 0x34, 0x12,              # mov ax, 0x1234
        0xBA, 0x10, 0x00,              # mov dx, 0x10
        0xEF,                          # out dx, ax         (16-bit)
        0xE5, 0x11,                    # in ax, 0x11        (device answers 0xBEEF)
        0xA3, 0x00, 0x20,              # mov [0x2000], ax
        0xBE, DATA & 0xFF, DATA >> 8,  # mov si, DATA
        0xB9, 0x05, 0x00,              # mov cx, 5
        0xFC,                          # cld
        0xF3, 0x6E,                    # rep outsb          (5 bytes to port dx)
        0xBF, 0x10, 0x20,              # mov di, 0x2010
        0xB9, 0x03, 0x00,              # mov cx, 3
        0xBA, 0x11, 0x00,              # mov dx, 0x11
        0xF3, 0x6C,                    # rep insb           (3 bytes from port 0x11)
        0xF4,                          # hlt
    ])
    guest = make_guest(code)
    guest.mem.write(DATA, b"hello")
    device = RecordingDevice({1: [0x99, 0xBEEF, 0xA1, 0xA2, 0xA3]})
    guest.io_bus.register(0x10, 3, device, "recorder")
    guest.runner.start()
    stop = guest.wait_stop()
    # No in-kernel irqchip here, so HLT comes to the VMM: a clean stop.
    assert stop.reason is StopReason.SHUTDOWN and not stop.fatal
    assert device.accesses == [
        ("w", 0, 1, 0x42),
        ("r", 1, 1, 0x99),
        ("w", 2, 1, 0x99),
        ("w", 0, 2, 0x1234),
        ("r", 1, 2, 0xBEEF),
        *[("w", 0, 1, byte) for byte in b"hello"],
        ("r", 1, 1, 0xA1), ("r", 1, 1, 0xA2), ("r", 1, 1, 0xA3),
    ]
    assert guest.mem.read_u16(0x2000) == 0xBEEF
    assert guest.mem.read(0x2010, 3) == bytes([0xA1, 0xA2, 0xA3])
    assert guest.runner.exit_counts["io"] >= 7
    assert guest.io_bus.stats().devices["recorder"].writes == 8


def test_unclaimed_ports_read_all_ones(make_guest):
    code = bytes([0xE4, 0x80, 0xE6, 0x10, 0xF4])      # in al, 0x80; out 0x10, al; hlt
    guest = make_guest(code)
    device = RecordingDevice()
    guest.io_bus.register(0x10, 1, device, "recorder")
    guest.runner.start()
    assert guest.wait_stop().reason is StopReason.SHUTDOWN
    assert device.accesses == [("w", 0, 1, 0xFF)]


class ScriptedVcpu:
    """Stands in for a Vcpu: replays I/O exits as KVM reports REP string I/O
    (count > 1, one data buffer), then a HLT."""

    def __init__(self, exits: list[IoExit]):
        self._exits = list(exits)
        self.immediate_exit = 0
        self.io: IoExit | None = None

    def run(self) -> int:
        if self._exits:
            self.io = self._exits.pop(0)
            return ExitReason.IO
        return ExitReason.HLT

    def get_regs(self):
        raise OSError("no registers in a scripted vCPU")


def test_rep_string_io_with_count_above_one_is_split_per_element():
    out_data = memoryview(bytearray(b"\x01\x00\x02\x00\x03\x00"))
    in_data = memoryview(bytearray(4))
    vcpu = ScriptedVcpu([
        IoExit(IoDirection.OUT, 2, 0x10, 3, out_data),    # rep outsw, 3 words
        IoExit(IoDirection.IN, 1, 0x11, 4, in_data),      # rep insb, 4 bytes
    ])
    io_bus = Bus("pio", PIO_ADDRESS_LIMIT)
    device = RecordingDevice({1: [0x61, 0x62, 0x63, 0x64]})
    io_bus.register(0x10, 2, device, "recorder")
    stops: queue.SimpleQueue[VcpuStop] = queue.SimpleQueue()
    runner = VcpuRunner(0, vcpu, GuestMemory([(0, 0x1000)]), io_bus, Bus("mmio"), NO_QUIRKS, stops.put)
    runner.start()
    stop = stops.get(timeout=STOP_TIMEOUT)
    runner.thread.join(STOP_TIMEOUT)
    assert stop.reason is StopReason.SHUTDOWN
    assert device.accesses == [("w", 0, 2, 1), ("w", 0, 2, 2), ("w", 0, 2, 3),
                               ("r", 1, 1, 0x61), ("r", 1, 1, 0x62), ("r", 1, 1, 0x63), ("r", 1, 1, 0x64)]
    assert bytes(in_data) == b"abcd"


# -- (c) where is a running vCPU? ------------------------------------------------------

JMP_SELF = bytes([0xEB, 0xFE])


def test_snapshot_of_a_spinning_vcpu_and_stop(make_guest):
    loop_start = CODE + 3
    code = bytes([0xB8, 0x07, 0x00]) + JMP_SELF       # mov ax, 7; jmp $
    guest = make_guest(code)
    guest.runner.start()
    # A request that arrives before the first KVM_RUN is answered with the
    # start state; after that the vCPU is always found on the jmp.
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        snap = guest.runner.request_snapshot(timeout=STOP_TIMEOUT)
        assert snap is not None, "the vCPU thread did not answer"
        assert snap.rip in (CODE, loop_start)
        if snap.rip == loop_start:
            break
        assert time.monotonic() < deadline, "the vCPU never reached the loop"
        time.sleep(0.01)
    for _ in range(3):                                 # it keeps answering, and keeps running
        snap = guest.runner.request_snapshot(timeout=STOP_TIMEOUT)
        assert snap is not None, "the vCPU thread did not answer"
        assert snap.rip == loop_start
        assert snap.gprs["rax"] & 0xFFFF == 7
        assert snap.code.startswith(JMP_SELF)
        assert snap.mode_bits == 16
        assert "instruction: jmp" in format_snapshot(snap)
    assert guest.runner.request_rip(timeout=STOP_TIMEOUT) == (loop_start, True)
    assert guest.runner.thread.is_alive()
    assert guest.runner.exit_counts.get("intr", 0) == 0  # INTR exits are not errors

    guest.runner.stop()
    guest.runner.thread.join(STOP_TIMEOUT)
    assert not guest.runner.thread.is_alive()
    assert guest.stops.empty()                         # stop() is not a guest failure
    assert guest.runner.request_snapshot(timeout=0.1) is None  # nobody left to answer


def test_snapshot_requests_from_many_threads(make_guest):
    guest = make_guest(JMP_SELF)
    guest.runner.start()
    answers: list = []

    def ask() -> None:
        answers.append(guest.runner.request_snapshot(timeout=STOP_TIMEOUT))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 4 and all(a is not None and a.rip == CODE for a in answers)  # jmp $ at CODE
    guest.runner.stop()
    guest.runner.thread.join(STOP_TIMEOUT)
    assert not guest.runner.thread.is_alive()


# -- emulation failures: host workarounds and the report ----------------------------

LONG_MODE_RIP = 0xFFFFFFFF81000000


class EmulationFailingVcpu:
    """Stands in for a Vcpu whose KVM fails to emulate each instruction in
    `failures` in turn (64-bit kernel mode), then halts."""

    def __init__(self, failures: list[bytes | None], code_at_rip: bytes = b""):
        from microvmm.kvm import EmulationFailure, InternalError, InternalErrorSuberror, Sregs
        self._failures = list(failures)
        self._sregs = Sregs()
        self._sregs.cr0, self._sregs.efer = 0x80050033, 0xD01
        self._sregs.cs.l, self._sregs.cs.selector = 1, 0x10
        self._make_failure = lambda insn: EmulationFailure(InternalErrorSuberror.EMULATION, 0, insn)
        self.internal_error = InternalError(InternalErrorSuberror.EMULATION, ())
        self.emulation_failure = None
        self.regs = Regs(rip=LONG_MODE_RIP)
        self.injected: list[int] = []
        self.immediate_exit = 0
        self._code_at_rip = code_at_rip

    def run(self) -> int:
        if self._failures:
            self.emulation_failure = self._make_failure(self._failures.pop(0))
            return ExitReason.INTERNAL_ERROR
        return ExitReason.HLT

    def get_regs(self) -> Regs:
        return dataclasses.replace(self.regs)  # a copy, as KVM_GET_REGS gives

    def set_regs(self, regs: Regs) -> None:
        self.regs = regs

    def get_sregs(self):
        return self._sregs

    def inject_exception_as_is(self, vector: int) -> None:
        self.injected.append(vector)

    def translate(self, gva: int) -> tuple[int, bool]:
        return (0x1000 + gva - LONG_MODE_RIP, True) if gva >= LONG_MODE_RIP else (0, False)


class ResettingVcpu:
    """Stands in for a Vcpu on AMD KVM: one I/O exit in 64-bit kernel mode,
    then (50 ms later) a SHUTDOWN after which its registers are the reset
    state; KVM syncs each exit's registers into `exit_regs`."""

    def __init__(self):
        from microvmm.kvm import Sregs
        self._buffer = bytearray(Regs().to_bytes())
        self.exit_regs = memoryview(self._buffer)
        self.regs = Regs(rip=LONG_MODE_RIP)
        self._sregs = Sregs()
        self._sregs.cr0, self._sregs.efer = 0x80050033, 0xD01
        self._sregs.cs.l, self._sregs.cs.selector = 1, 0x10
        self._steps = ["io", "shutdown"]
        self.immediate_exit = 0
        self.io = IoExit(IoDirection.OUT, 1, 0x10, 1, memoryview(bytearray(b"\x42")))

    def run(self) -> int:
        step = self._steps.pop(0) if self._steps else "hlt"
        if step == "io":
            self.regs = Regs(rip=LONG_MODE_RIP + 2, rax=0x42)
            reason = ExitReason.IO
        elif step == "shutdown":
            time.sleep(0.05)
            from microvmm.kvm import Sregs
            self.regs = Regs(rip=0xFFF0, rdx=0x600)          # what an INIT leaves
            self._sregs = Sregs()
            self._sregs.cs.selector, self._sregs.cs.base, self._sregs.cr0 = 0xF000, 0xFFFF0000, 0x60000010
            reason = ExitReason.SHUTDOWN
        else:
            return ExitReason.HLT
        self._buffer[:] = self.regs.to_bytes()               # as KVM_SYNC_X86_REGS does
        return reason

    def get_regs(self) -> Regs:
        return dataclasses.replace(self.regs)

    def get_sregs(self):
        return self._sregs

    def sync_registers_at_exit(self) -> memoryview:
        return self.exit_regs

    def translate(self, gva: int) -> tuple[int, bool]:
        return (0, False)


def run_scripted(vcpu, quirks, memory=None, sync_exit_regs=False) -> tuple[VcpuRunner, VcpuStop]:
    stops: queue.SimpleQueue[VcpuStop] = queue.SimpleQueue()
    memory = memory or GuestMemory([(0, 0x4000)])
    runner = VcpuRunner(0, vcpu, memory, Bus("pio", PIO_ADDRESS_LIMIT), Bus("mmio"), quirks, stops.put,
                        sync_exit_regs=sync_exit_regs)
    runner.start()
    stop = stops.get(timeout=STOP_TIMEOUT)
    runner.thread.join(STOP_TIMEOUT)
    assert not runner.thread.is_alive()
    return runner, stop


EMULATING_QUIRKS = host_quirks(HostKind.EMULATING, "test")


def test_int3_and_fwait_workarounds_on_an_emulating_host():
    vcpu = EmulationFailingVcpu([b"\xcc", b"\x9b", b"\xcc"])
    runner, stop = run_scripted(vcpu, EMULATING_QUIRKS)
    assert stop.reason is StopReason.SHUTDOWN           # the scripted HLT after the failures
    assert vcpu.injected == [3, 3]                      # #BP for each int3
    assert vcpu.regs.rip == LONG_MODE_RIP + 3           # each instruction stepped over once
    assert runner.workarounds_applied == {"int3: injected #BP": 2, "fwait: skipped": 1}


def test_emulation_failure_without_workarounds_is_reported_with_the_instruction():
    memory = GuestMemory([(0, 0x4000)])
    memory.write(0x1000, bytes.fromhex("480fae2f") + b"\x90" * 11)
    vcpu = EmulationFailingVcpu([None])                 # KVM gave no bytes: read them at RIP
    runner, stop = run_scripted(vcpu, NO_QUIRKS, memory)
    assert stop.reason is StopReason.EMULATION_FAILURE and stop.fatal
    assert f"{LONG_MODE_RIP:#x}" in stop.detail
    snap = stop.snapshot
    assert snap.rip == LONG_MODE_RIP and snap.mode_bits == 64
    assert snap.code[:4] == bytes.fromhex("480fae2f")
    assert "instruction: xrstor64 ptr [rdi]  (48 0f ae 2f)" in format_snapshot(snap)
    assert vcpu.injected == []


def test_int3_is_not_touched_when_workarounds_are_off():
    vcpu = EmulationFailingVcpu([b"\xcc"])
    _, stop = run_scripted(vcpu, host_quirks(HostKind.EMULATING, "test", enabled=False))
    assert stop.reason is StopReason.EMULATION_FAILURE
    assert stop.snapshot.code == b"\xcc"
    assert vcpu.injected == [] and vcpu.regs.rip == LONG_MODE_RIP
