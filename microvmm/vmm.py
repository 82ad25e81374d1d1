"""The VMM: wires KVM, guest memory, the boot loader, devices and threads
together for one VM, runs it, and reports how it ended.

Devices know nothing of KVM or the CLI; this module is the only place that
connects them (interrupt lines to irqfds, queue notifies to ioeventfds, UART
output to the terminal).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from microvmm.exitcodes import ExitCode, signal_exit_code
from microvmm.hostinfo import HostKind, emulated_smp_note
from microvmm.run_monitor import (KERNEL_LINE_FORM, KERNEL_LOG_PORT, SERIAL_PORT, Failure, KernelLogSources,
                                  RunMonitor)
from microvmm.vcpu_runner import KICK_SIGNAL, DeviceGate, StopReason, VcpuRunner, VcpuStop
from microvmm.vmconfig import COMMAND_PARAM, VmConfig, command_parameter, kernel_cmdline  # noqa: F401
from microvmm.vmprep import VmmError, VmPreparation

if TYPE_CHECKING:
    from microvmm.diag.symbols import KaslrSymbols, SymbolMap

logger = logging.getLogger(__name__)

COM1_BASE, COM1_IRQ = 0x3F8, 4
# Where the virtio-console function sits, and the INTx routing the PCI bus gives
# it (pci/bus.py DEFAULT_INTX_GSIS[0], the function's INTA#): the MP table is
# written before the bus exists, from these; _build_pci checks them.
CONSOLE_PCI_SLOT = 1
PCI_INTA = 1
FIRST_PCI_INTX_GSI = 16
# x86 MSRs Linux expects a loader to have set up (as on a real BSP after firmware).
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1
#: Set to "1" to stop right at the first KVM_RUN (startup benchmark; see _exit_at_first_run).
EXIT_AT_FIRST_RUN_ENV = "MICROVMM_EXIT_AT_FIRST_RUN"
#: After the kernel's "reboot: System halted"/"Power down" line, how long its
#: vCPUs get to reach their final HLT, and how often they are looked at.
#: Generous: the kernel halts right after printing the line, but a loaded host
#: may hold the vCPU thread back; a running guest only pays a kick per poll.
HALT_CONFIRM_SECONDS = 10.0
HALT_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class KernelConsolePlan:
    """Where the guest kernel's log goes, decided before the boot.

    `kmsg`: on the port microvmm.kmsg, a virtio console only the kernel writes
    to (its printk costs no userspace exit); what the kernel printed before
    the port came up the VMM reads from its printk ring in guest RAM
    (Vmm._poll_kernel_log). Otherwise on the serial line (and hvc0) as the
    command line says, and `why` says why.
    """

    kmsg: bool
    cmdline_additions: tuple[str, ...]
    sources: KernelLogSources
    why: str = ""


@dataclass
class VmOutcome:
    """How a run ended: exit status, one-line summary, optional report."""

    exit_code: int
    summary: str
    report: str = ""
    stats: dict = field(default_factory=dict)
    #: The VMM could not set the VM up (infrastructure, not the guest's doing).
    setup_error: bool = False


class _OutputSink:
    """Where guest console bytes go on the host (stdout or a file)."""

    def __init__(self, fd: int, owned: bool):
        self.fd = fd
        self.owned = owned
        self._lock = threading.Lock()
        #: False while the guest's last line is unfinished (a prompt).
        self.at_line_start = True

    def write(self, data: bytes) -> None:
        with self._lock:
            if data:
                self.at_line_start = data.endswith(b"\n")
            view = memoryview(data)
            while view:
                try:
                    written = os.write(self.fd, view)
                except BlockingIOError:
                    time.sleep(0.001)  # a full terminal: wait, never drop
                    continue
                except OSError:
                    return  # the reader went away (closed pipe): nothing to deliver to
                view = view[written:]

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)


class Vmm:
    """One VM, from configuration to exit status."""

    def __init__(self, config: VmConfig):
        self.config = config
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self._stop: VcpuStop | None = None
        self._signal: int | None = None
        self._closers: list = []
        self.runners: list[VcpuRunner] = []
        self._log_file = None
        #: Files this run created (--log, --serial file:): removed again if
        #: setup fails before anything was written to them.
        self._created_files: list[str] = []
        if config.log:
            self._note_creation(config.log)
            try:
                self._log_file = open(config.log, "a", encoding="utf-8")
            except OSError as err:
                raise VmmError(f"--log {config.log}: {err.strerror}") from err
        #: `--ktap`: the command's stdout read as KTAP/TAP as it comes (run.ktap).
        self.ktap = None
        if config.ktap:
            from microvmm.run.ktap import KtapCollector
            self.ktap = KtapCollector()
        self.monitor = RunMonitor(
            log=self._log_file, fail_on=config.fail_on,
            expect=re.compile(config.expect.encode()) if config.expect else None,
            expect_port=config.expect_port, on_failure=self._guest_failed,
            on_expect=self._expected_output, on_kernel_stop=self._kernel_stopping,
            taps={COMMAND_STDOUT_PORT: self.ktap.feed} if self.ktap else None)
        self._halt_check: threading.Thread | None = None
        #: Seconds since the monitor started when the first stop was asked for.
        self.stopped_at: float | None = None
        self.kernel_console = KernelConsolePlan(False, (), self.monitor.kernel_log)
        self._kernel_log_port_up = False
        self._kernel_log_restart = False
        self._kernel_log_next_seq = 0
        self._kernel_log_repeat = b""
        self._kernel_log_partial = b""
        #: The last complete line the port carried (where teardown's read resumes).
        self._kernel_log_last_line = b""
        #: The I/O thread (port bytes, polls) and teardown's last read share the above.
        self._kernel_log_lock = threading.Lock()
        self._log_symbol_table: dict[str, int] | None = None
        self._log_read_failed = False
        self._log_cursor = None
        self._kernel_log_sink: _OutputSink | None = None
        self._failure: Failure | None = None
        self._timeout_kind: str | None = None
        self._expect_seen = False
        self._status_port = None
        self._symbols: SymbolMap | KaslrSymbols | None = None
        self._symbols_loaded = False
        self._serial_pending = bytearray()
        self._serial_input_fd: int | None = None
        self._serial_readable = None

    # -- lifecycle ------------------------------------------------------------

    def _note_creation(self, path) -> None:
        if not os.path.lexists(path):
            self._created_files.append(os.fspath(path))

    def remove_created_files(self) -> None:
        """After a setup error: take away the (still empty) files this run created."""
        for path in self._created_files:
            try:
                if os.stat(path, follow_symlinks=False).st_size == 0:
                    os.unlink(path)
            except OSError:
                pass
        self._created_files.clear()

    def run(self, preparation: VmPreparation | None = None) -> VmOutcome:
        """Run the VM to its end. `preparation` (VmPreparation(config), started
        as early as the caller could) is the guest RAM, VM and kernel being
        made on helper threads; the run owns it from here and closes it."""
        self._preparation = preparation
        try:
            if preparation is None:
                self._preparation = preparation = VmPreparation(self.config)
            self.memory = preparation.memory
            kind, reason = preparation.host
            self.quirks = quirks = preparation.quirks
            self._announce_host(kind, reason)
            # Handlers first: a signal during setup must clean up like any other
            # stop (socket files, terminal), not kill the process half-built.
            self._install_signal_handlers()
            self._build_vm(quirks)
            if not self._stopped.is_set():
                self._start_vcpus()
                # vCPU 0 runs its early boot code (it touches no device for
                # seconds) while this thread builds the devices; an exit that
                # needs one waits at the gate meanwhile.
                try:
                    self._build_devices()
                except BaseException:
                    self._gate.fail()
                    raise
                self._gate.open(self.io_bus, self.mmio_bus)
                self._start_io()
                self._install_seccomp()
                self._wait()
        finally:
            self._teardown()
        return self._outcome()

    def _install_seccomp(self) -> None:
        """Opt-in syscall filter, once setup is done and the vCPUs run."""
        if self.config.seccomp == "off":
            return
        # Every vCPU thread has named itself (an open for writing, which the
        # filter refuses) once it is about to enter the guest.
        for runner in self.runners:
            runner.wait_entering_guest(5.0)
        from microvmm.seccomp import FilterAction, SeccompError, install_filter
        client = any(p.backend.value == "socket" and p.socket_mode is not None
                     and p.socket_mode.value == "client" for p in self.config.ports)
        try:
            # A socket client port reconnects; result and profile files are
            # created only when the VM has stopped.
            install_filter(extra_allowed=("socket", "connect") if client else (),
                           action=FilterAction(self.config.seccomp),
                           allow_write_open=bool(self.config.json or self.config.junit
                                                 or self.config.profile))
        except SeccompError as err:
            raise VmmError(f"--seccomp: {err}") from err
        logger.info("seccomp filter installed (%s)", self.config.seccomp)

    def _install_signal_handlers(self) -> None:
        signal.signal(KICK_SIGNAL, lambda *_: None)
        self._previous_handlers = {}
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._previous_handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_dump_request)

    def _announce_host(self, kind: HostKind, reason: str) -> None:
        if kind is HostKind.HARDWARE:
            return
        if self.quirks.active:
            applied = "; ".join(quirk.message for quirk in self.quirks.applied)
            print(f"microvmm: emulating KVM host ({reason}): guest kernel code is emulated, a Linux "
                  f"boot takes minutes, not milliseconds; applying host workarounds ({applied}). "
                  "--no-host-workarounds turns them off.",
                  file=sys.stderr)
        else:
            print(f"microvmm: emulating KVM host ({reason}): guest kernel code is emulated and slow; "
                  "host workarounds are off.", file=sys.stderr)
        note = emulated_smp_note(self.config.cpus, os.cpu_count())
        if note:
            print(f"microvmm: {note}.", file=sys.stderr)

    @staticmethod
    def _announce_payload_workaround(boot) -> None:
        """Say that (or why not) a bzImage was booted as its host-decompressed ELF."""
        if boot.payload_format is not None:
            logger.warning(
                "host workaround: bzImage: %s payload (%.1f MB ELF) decompressed on the host in "
                "%.2f s, booted at its ELF entry; the guest's decompressor would run emulated "
                "(--no-host-workarounds keeps it)", boot.payload_format,
                boot.payload_elf_size / 1e6, boot.payload_decompress_seconds)
        elif boot.payload_fallback_reason is not None:
            logger.warning(
                "host workaround: bzImage: not applied: %s; the guest's own decompressor runs "
                "emulated, which takes tens of seconds to minutes here", boot.payload_fallback_reason)

    def _build_vm(self, quirks) -> None:
        """What must exist before vCPU 0's first KVM_RUN: the VM with its in-kernel
        irqchip and PIT, guest memory with the kernel loaded (its MP table included),
        the vCPUs in their boot state, and every host resource a user's option
        names (serial file, console port backends) so that those fail before the
        guest runs. Devices come later (_build_devices)."""
        from microvmm.boot import RNG_SEED_SIZE, setup_linux_boot, vcpu_cpuid
        from microvmm.kvm import KVM_SYNC_X86_REGS, Cap

        config = self.config
        self.kernel_console = plan = plan_kernel_console(config)
        self.monitor.kernel_log = plan.sources
        if plan.why:
            logger.info("kernel log on the serial line: %s", plan.why)
        # The command also travels in the initramfs (below): on the command
        # line only when it fits, for a user's own init that reads microvmm.cmd=.
        cmdline = kernel_cmdline(config.cmdline, plan.cmdline_additions + quirks.cmdline_additions,
                                 config.command, kaslr=config.kaslr)
        self.cmdline = cmdline

        # Built by the preparation's helper threads meanwhile; their errors
        # surface here, where they always did.
        kvm, vm, supported = self._preparation.take_vm()  # supported: KVM's CPUID leaves
        self.kvm, self.vm = kvm, vm
        self._closers.extend((kvm.close, vm.close))
        memory = self.memory

        # An ELF vmlinux and its initrd are in guest RAM already; a bzImage comes as bytes.
        kernel, initrd = self._preparation.take_images()
        if config.command is not None and initrd is not None:
            from microvmm.boot.initrd import command_archive, prepend_archive
            initrd = prepend_archive(memory, initrd, command_archive(COMMAND_FILE, command_script(config.command)),
                                     getattr(kernel, "kernel_end", 0))
        # A fresh seed per boot, as QEMU and EFI stubs give: the guest's crng
        # is ready at once (a kernel that trusts its boot loader).
        boot = setup_linux_boot(memory, kernel, cmdline, initrd,
                                num_cpus=config.cpus, pci_irqs=self._planned_pci_irqs(),
                                rng_seed=os.urandom(RNG_SEED_SIZE),
                                bzimage_payload_as_elf=quirks.decompress_bzimage_on_host)
        del kernel, initrd  # in guest RAM now; a bzImage's bytes go back
        # Host resources named by the user (serial file, ptys, sockets) are
        # opened once the kernel and initrd proved valid, and fail here,
        # before the guest runs.
        self._serial_sink = self._open_serial_sink()
        self._kernel_log_sink = self._open_kernel_log_sink()
        self._port_backends = self._open_port_backends()
        self.boot = boot
        self._announce_payload_workaround(boot)
        if not config.kaslr:
            logger.info("kernel address randomization off ('nokaslr' added): System.map addresses "
                        "are the running kernel's (--kaslr keeps it)")
        self._gate = gate = DeviceGate()
        # Each exit's registers in kvm_run, for where a vCPU that KVM resets on a
        # triple fault (AMD) was last seen.
        sync_regs = bool(vm.check_extension(Cap.SYNC_REGS) & KVM_SYNC_X86_REGS)
        for index in range(config.cpus):
            vcpu = vm.create_vcpu(index)
            self._closers.append(vcpu.close)
            # KVM's own CpuidEntry objects in, the same type out (boot/cpuid.py).
            vcpu.set_cpuid2(vcpu_cpuid(supported, index, config.cpus,
                                       quirks.hidden_kvm_pv_features))
            vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING})
            if index == 0:
                self._set_boot_state(vcpu, boot)
            runner = VcpuRunner(index, vcpu, memory, None, None, quirks,
                                on_stop=self._vcpu_stopped, gate=gate,
                                sync_exit_regs=sync_regs)
            self.runners.append(runner)

    def _planned_pci_irqs(self) -> list:
        """The MP table's PCI interrupt routing, from the configuration alone (the
        devices are built after the guest starts): the console function, when
        there is one, at its slot's INTA# on the bus's first INTx GSI.
        _build_pci checks the bus assigned exactly this."""
        from microvmm.boot import PciIrq
        if not self._wants_console():
            return []
        return [PciIrq(device=CONSOLE_PCI_SLOT, pin=PCI_INTA, ioapic_pin=FIRST_PCI_INTX_GSI)]

    def _wants_console(self) -> bool:
        return bool(self.config.ports) or self.config.command is not None or self.kernel_console.kmsg

    def _open_port_backends(self) -> list:
        """The user's console ports' backends (a socket file, a pty...), opened
        while nothing runs yet so that a failure ends the VMM before the guest starts."""
        if not self.config.ports:
            return []
        from microvmm.virtio_console import BackendError, create_backend

        from microvmm.terminal import EscapeFilter  # deferred: termios, only with console ports
        escape = EscapeFilter()

        def stdio_filter(data: bytes) -> bytes:
            data, commands = escape.feed(data)
            self._escape_commands(commands)
            return data

        ports = []
        try:
            for spec in self.config.ports:
                backend = create_backend(spec, sys.stderr, stdio_filter)
                self._closers.append(backend.close)
                ports.append((spec, backend))
        except BackendError as err:
            raise VmmError(str(err)) from err
        return ports

    def _start_vcpus(self) -> None:
        self.start_time = time.monotonic()
        if os.environ.get(EXIT_AT_FIRST_RUN_ENV) == "1":
            self._exit_at_first_run(self.runners[0].vcpu)
        for runner in self.runners:
            runner.start()
        # Let vCPU 0 into the guest before this thread takes the GIL for the device build.
        self.runners[0].wait_entering_guest()

    def _build_devices(self) -> None:
        """Everything the guest needs only later, built while vCPU 0 runs: the
        legacy devices, the PCI bus, the virtio-console with its irqfds and
        ioeventfds, the event loop. Its exits wait at the gate until this is done."""
        from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
        from microvmm.devices.i8042 import I8042, I8042_BASE, I8042_PORT_COUNT
        from microvmm.devices.legacy import IO_DELAY_PORTS, NullDevice
        from microvmm.devices.rtc import RTC_BASE, RTC_PORT_COUNT, CmosRtc
        from microvmm.devices.serial import UART_PORT_COUNT, Serial16550A
        from microvmm.eventloop import EventLoop
        from microvmm.outputbatch import OutputBatcher

        vm = self.vm
        self.loop = loop = EventLoop()
        self._closers.append(loop.close)
        # The UART sends a byte per vCPU exit: pass them on in runs (lines).
        self._serial_batch = OutputBatcher(self._serial_output, loop)
        self.io_bus = Bus("pio", address_limit=PIO_ADDRESS_LIMIT)
        self.mmio_bus = Bus("mmio", unclaimed_granule=0x1000)

        # Legacy devices
        self.serial = Serial16550A(irq_level=lambda level: vm.irq_line(COM1_IRQ, level),
                                   output=self._serial_batch.write,
                                   rx_ready=lambda: self.loop.call_soon_threadsafe(self._feed_serial))
        self.io_bus.register(COM1_BASE, UART_PORT_COUNT, self.serial, "com1")
        self.io_bus.register(I8042_BASE, I8042_PORT_COUNT, I8042(reset_requested=self._reset_requested),
                             "i8042")
        self.io_bus.register(RTC_BASE, RTC_PORT_COUNT, CmosRtc(), "rtc")
        for delay_port in IO_DELAY_PORTS:
            self.io_bus.register(delay_port.base, delay_port.length, NullDevice(), delay_port.name)
        self._build_pci()

    def _build_pci(self) -> None:
        """The PCI bus and, when ports are configured, the virtio-console function."""
        from microvmm.boot import PciIrq
        from microvmm.pci.bus import (CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, IO_BAR_WINDOW,
                                      MMIO_BAR_WINDOW, PciBus)
        self.pci = pci = PciBus()
        self.io_bus.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, pci, "pci-config")
        self.io_bus.register(IO_BAR_WINDOW[0], IO_BAR_WINDOW[1] - IO_BAR_WINDOW[0],
                             _PciBarWindow(IO_BAR_WINDOW[0], pci.io_read, pci.io_write), "pci-io")
        self.mmio_bus.register(MMIO_BAR_WINDOW[0], MMIO_BAR_WINDOW[1] - MMIO_BAR_WINDOW[0],
                               _PciBarWindow(MMIO_BAR_WINDOW[0], pci.mmio_read, pci.mmio_write),
                               "pci-mmio")
        if self._wants_console():
            self._attach_console(pci)
        assigned = [PciIrq(device=a.slot, pin=int(a.pin), ioapic_pin=a.gsi)
                    for a in pci.pci_irq_assignments()]
        planned = self._planned_pci_irqs()  # what the guest's MP table already says
        if assigned != planned:
            raise VmmError(f"PCI interrupt routing {assigned} differs from the MP table's {planned}")

    def _attach_console(self, pci) -> None:
        """The virtio-console function: queue kicks via ioeventfd, interrupts via irqfd."""
        from microvmm.interrupts import GsiRouter, KvmIntxLine, KvmMsiController
        from microvmm.virtio.pci_legacy import VirtioPciLegacy
        from microvmm.virtio_console import VirtioConsole

        ports = list(self._port_backends)
        if self.config.command is not None:
            command_ports = self._command_ports()
            for _, backend in command_ports:
                self._closers.append(backend.close)
            ports += command_ports
        if self.kernel_console.kmsg:
            # Last, so that the user's ports keep their numbers and hvc0 stays
            # the first user console: this one is hvcN, N = user consoles.
            from microvmm.virtio_console.backends import CallbackBackend
            from microvmm.virtio_console.spec import BackendKind, PortSpec
            ports.append((PortSpec(console=True, backend=BackendKind.FILE, name=KMSG_PORT, path=None),
                          CallbackBackend(KMSG_PORT, self._kernel_log_output)))
        console = VirtioConsole(ports, self.loop, queue_size=self.config.queue_size)
        feed = self.monitor.feed

        def output_tap(name: str, data: bytes) -> None:
            if name != KMSG_PORT:  # the log port feeds the monitor itself (_kernel_log_output)
                feed(name, data)
        console.output_tap = output_tap
        self.console = console
        self._closers.append(console.close)
        self._closers.append(console.restore_terminals)
        transport = VirtioPciLegacy(console, self.memory)
        self._console_transport = transport  # did the guest ever drive it? (_no_driver_hint)
        assignment = pci.add_device(transport, slot=CONSOLE_PCI_SLOT)
        router = GsiRouter(self.vm)
        msi = KvmMsiController(self.vm, router, transport.num_queues + 1)
        self._closers.append(msi.close)
        intx = None
        if assignment is not None:
            intx = KvmIntxLine(self.vm, assignment.gsi, self.loop, transport.intx_resample)
            self._closers.append(intx.close)
        transport.connect_interrupts(intx=intx, msi=msi)
        self._ioeventfds: dict = {}
        self._closers.append(self._remove_ioeventfds)
        pci.bar_listener = lambda function, *_: self._sync_ioeventfds(function)
        self._sync_ioeventfds(transport)
        self._watch_winch = any(p.backend.value in ("stdio", "tty", "pty") for p in self.config.ports)

    def _command_ports(self) -> list:
        """The ports a `-- CMD` run talks through (see guest/README.md)."""
        from microvmm.virtio_console.backends import CaptureBackend, FdSinkBackend
        from microvmm.virtio_console.spec import BackendKind, PortSpec

        def spec(name: str) -> PortSpec:
            return PortSpec(console=False, backend=BackendKind.FILE, name=name, path=None)
        self._status_port = CaptureBackend(COMMAND_STATUS_PORT)
        return [(spec(COMMAND_STDOUT_PORT), FdSinkBackend(COMMAND_STDOUT_PORT, sys.stdout.fileno())),
                (spec(COMMAND_STDERR_PORT), FdSinkBackend(COMMAND_STDERR_PORT, sys.stderr.fileno())),
                (spec(COMMAND_STATUS_PORT), self._status_port)]

    def _sync_ioeventfds(self, transport) -> None:
        """Keep one ioeventfd per queue on the notify register's current address."""
        wanted = {(spec.port, spec.datamatch): spec for spec in transport.notify_ioeventfds()}
        for key in list(self._ioeventfds):
            if key not in wanted:
                fd = self._ioeventfds.pop(key)
                self.loop.remove_reader(fd)
                self.vm.ioeventfd_remove(fd, key[0], 2, datamatch=key[1], pio=True)
                os.close(fd)
        for key, spec in wanted.items():
            if key in self._ioeventfds:
                continue
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.vm.ioeventfd(fd, spec.port, spec.size, datamatch=spec.datamatch, pio=True)
            self._ioeventfds[key] = fd

            def kicked(fd=fd, index=spec.queue_index) -> None:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    return
                transport.queue_notify(index)
            self.loop.add_reader(fd, kicked)

    def _remove_ioeventfds(self) -> None:
        for (port, datamatch), fd in self._ioeventfds.items():
            self.loop.remove_reader(fd)
            try:
                self.vm.ioeventfd_remove(fd, port, 2, datamatch=datamatch, pio=True)
            except OSError:
                pass
            os.close(fd)
        self._ioeventfds.clear()

    def _escape_commands(self, commands: list[str]) -> None:
        for command in commands:
            if command == "quit":
                self._request_stop(VcpuStop(StopReason.SHUTDOWN, "user quit (Ctrl-A x)", fatal=False))
            elif command == "help":
                from microvmm.terminal import ESCAPE_HELP
                self._print_report(ESCAPE_HELP)

    def _set_boot_state(self, vcpu, boot) -> None:
        """Long mode at the kernel's 64-bit entry, as the boot loader computed it."""
        from microvmm.kvm import DTable, Fpu, Regs, Segment
        state = boot.cpu_state
        sregs = vcpu.get_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
            seg = getattr(state, name)
            setattr(sregs, name, Segment(base=seg.base, limit=seg.limit, selector=seg.selector,
                                         type=seg.type, present=seg.present, dpl=seg.dpl, db=seg.db,
                                         s=seg.s, l=seg.l, g=seg.g, avl=seg.avl))
        sregs.gdt = DTable(state.gdt.base, state.gdt.limit)
        sregs.idt = DTable(state.idt.base, state.idt.limit)
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
        vcpu.set_sregs(sregs)
        vcpu.set_regs(Regs(rip=state.rip, rsp=state.rsp, rsi=state.rsi, rflags=state.rflags))
        vcpu.set_fpu(Fpu())

    def _start_io(self) -> None:
        """Once the devices exist: host input, the event loop, the profiler."""
        if getattr(self, "_watch_winch", False):
            # the host terminal was resized: tell the guest (RESIZE control message)
            self._previous_handlers[signal.SIGWINCH] = signal.signal(
                signal.SIGWINCH, lambda *_: self.console.refresh_sizes())
        self._start_serial_input()
        self._start_kernel_log_poll()
        self.loop.start()
        if self.config.profile:
            from microvmm.profiler import GuestProfiler
            self.profiler = GuestProfiler(self.runners, lambda: self.monitor.last_line, self.symbols,
                                          rate_hz=self.config.profile_rate)
            self.profiler.start()

    def _exit_at_first_run(self, vcpu) -> None:
        """Benchmark hook (bench/, MICROVMM_EXIT_AT_FIRST_RUN=1): print the wall-clock
        time (time.time()) just before vCPU 0's first KVM_RUN, issue that KVM_RUN with
        immediate_exit set, and end the run there. Startup latency is measured by the
        parent against its own time.time() before it spawned us."""
        run = vcpu.run

        def first_run() -> int:
            now = time.time()
            vcpu.run = run
            print(f"microvmm: first KVM_RUN at {now:.6f}", file=sys.stderr, flush=True)
            self._request_stop(VcpuStop(StopReason.SHUTDOWN, f"{EXIT_AT_FIRST_RUN_ENV}=1", fatal=False))
            return run()
        vcpu.run = first_run

    def _wait(self) -> None:
        config = self.config
        while not self._stopped.wait(0.2):
            now = time.monotonic()
            expired = None
            if config.timeout is not None and now - self.start_time > config.timeout:
                expired = f"--timeout {config.timeout:g} s expired"
            elif (config.boot_timeout is not None and self.monitor.boot_time is None
                  and now - self.start_time > config.boot_timeout):
                expired = f"--boot-timeout {config.boot_timeout:g} s expired before the guest reached init"
            elif config.idle_timeout is not None and now - self.monitor.last_output > config.idle_timeout:
                expired = f"--idle-timeout: no console output for {config.idle_timeout:g} s"
            if expired:
                self._timeout_kind = expired
                self._timeout_report = self._where_report()
                self._request_stop(VcpuStop(StopReason.SHUTDOWN, "timeout", fatal=False))
                break

    def _teardown(self) -> None:
        if self.config.kaslr and getattr(self, "runners", None) and self.symbols is not None:
            # Said while guest RAM and the vCPUs are still there, and before
            # the profile report needs it.
            getattr(self.symbols, "offset", None)
        if getattr(self, "profiler", None) is not None:
            self.profiler.stop()  # before the vCPUs go: it samples them
            self._write_profile()
        for runner in self.runners:
            runner.stop()
        for runner in self.runners:
            if runner.thread.is_alive():
                runner.thread.join(timeout=5)
        self._flush_serial()  # what the vCPUs wrote last
        if getattr(self, "memory", None) is not None:
            self._recover_kernel_log()  # guest RAM is still mapped
        if getattr(self, "_raw_terminal", None):
            self._raw_terminal.restore()
        for signum, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(signum, handler)
        for close in reversed(self._closers):
            try:
                close()
            except Exception as err:  # keep closing the rest
                logger.debug("teardown: %s", err)
        self._closers.clear()
        preparation, self._preparation = getattr(self, "_preparation", None), None
        if preparation is not None:
            # Joins its helper threads, closes what _build_vm never took (a
            # failure before), then unmaps guest RAM: after every device and
            # vCPU that used it is gone.
            preparation.close()
        sink = getattr(self, "_serial_sink", None)
        if sink:
            sink.close()
        if self._log_file is not None:
            self.monitor.flush_log()
            self._log_file.close()

    def _write_profile(self) -> None:
        path = self.config.profile
        try:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(self.profiler.report() + "\n\n" + self.exit_statistics() + "\n")
            with open(f"{path}.folded", "w", encoding="utf-8") as handle:
                handle.write(self.profiler.folded())
        except OSError as err:
            logger.error("--profile %s: %s", path, err.strerror)
            return
        print(f"microvmm: profile written to {path} (flame-graph input: {path}.folded)", file=sys.stderr)

    def exit_statistics(self) -> str:
        """Exits by reason and port/MMIO accesses by device: where the VMM's work comes from."""
        exits: dict[str, int] = {}
        for runner in self.runners:
            for name, count in runner.exit_counts.items():
                exits[name] = exits.get(name, 0) + count
        lines = ["vCPU exits by reason: " + ", ".join(
            f"{name} {count}" for name, count in sorted(exits.items(), key=lambda kv: -kv[1]))]
        for bus in (self.io_bus, self.mmio_bus):
            stats = bus.stats()
            per_device = sorted(stats.devices.items(), key=lambda kv: -(kv[1].reads + kv[1].writes))
            lines.append(f"{bus.name} accesses by device: " + ", ".join(
                f"{name} {c.reads}r/{c.writes}w" for name, c in per_device if c.reads or c.writes))
            if stats.unclaimed:
                top = sorted(stats.unclaimed.items(), key=lambda kv: -(kv[1].reads + kv[1].writes))[:8]
                lines.append(f"{bus.name} unclaimed: " + ", ".join(
                    f"{addr:#x} {c.reads}r/{c.writes}w" for addr, c in top))
        return "\n".join(lines)

    # -- stop paths -----------------------------------------------------------

    def _request_stop(self, stop: VcpuStop) -> None:
        with self._stop_lock:
            if self._stop is None:
                self._stop = stop
                self.stopped_at = self.monitor.elapsed()
        self._stopped.set()
        for runner in self.runners:
            runner.stop()

    def _vcpu_stopped(self, stop: VcpuStop) -> None:
        self._request_stop(stop)

    def _guest_ended(self, reason: StopReason, detail: str) -> None:
        """The guest ended itself: a reset (i8042, reboot=k), a power-off or a
        final halt. All of them end the run with status 0."""
        self._request_stop(VcpuStop(reason, detail, fatal=False))

    def _reset_requested(self) -> None:
        self._guest_ended(StopReason.RESET, "i8042 reset")

    def _kernel_stopping(self, what: str) -> None:
        """The console showed Linux's "reboot: System halted" or "reboot:
        Power down". A kernel without a power-off method (no ACPI: the default
        guest) then halts every CPU with interrupts off and never exits to
        the VMM (the in-kernel irqchip handles HLT): look at the vCPUs, off
        this (console) thread, and end the run if they all stopped for good.
        The same words typed in a shell leave the vCPUs running: nothing happens."""
        with self._stop_lock:
            if self._stop is not None or (self._halt_check is not None and self._halt_check.is_alive()):
                return
            self._halt_check = threading.Thread(target=self._confirm_halt, args=(what,),
                                                name="microvmm-halt-check", daemon=True)
        self._halt_check.start()

    def _confirm_halt(self, what: str) -> None:
        deadline = time.monotonic() + HALT_CONFIRM_SECONDS
        halted_in_a_row = 0
        while not self._stopped.is_set() and time.monotonic() < deadline:
            if all(runner.request_stopped_for_good() for runner in self.runners):
                halted_in_a_row += 1
                if halted_in_a_row == 2:  # still so a moment later: stopped for good
                    reason = StopReason.POWER_OFF if what == "Power down" else StopReason.HALTED
                    self._guest_ended(reason, f"kernel: 'reboot: {what}', every vCPU halted with "
                                              "interrupts off")
                    return
            else:
                halted_in_a_row = 0
            time.sleep(HALT_POLL_SECONDS)
        if not self._stopped.is_set():
            logger.info("the console showed 'reboot: %s' but the vCPUs kept running "
                        "(typed text, or a kernel without a power-off method): the VM goes on", what)

    def _guest_failed(self, failure: Failure) -> None:
        if self._failure is None or failure.level > self._failure.level:
            self._failure = failure
        if self._stopped.is_set():
            return  # seen in a log recovered after the stop
        # Let the trace that follows the first line reach the log, then stop
        # (panic=-1 may reboot sooner, which ends the VM just the same).
        self.loop.call_later(1.0, lambda: self._request_stop(
            VcpuStop(StopReason.SHUTDOWN, f"kernel {failure.level.name.lower()}", fatal=False)))

    def _expected_output(self, line: str) -> None:
        self._expect_seen = True
        self._request_stop(VcpuStop(StopReason.SHUTDOWN, "--expect matched", fatal=False))

    def _on_signal(self, signum: int, _frame) -> None:
        self._signal = signum
        self._request_stop(VcpuStop(StopReason.SHUTDOWN, f"signal {signal.Signals(signum).name}",
                                    fatal=False))

    def _on_dump_request(self, _signum: int, _frame) -> None:
        threading.Thread(target=lambda: self._print_report(self._where_report()),
                         name="microvmm-dump", daemon=True).start()

    def _where_report(self) -> str:
        from microvmm.diag.report import format_snapshot  # deferred: diagnostics only
        parts = []
        for runner in self.runners:
            snapshot = runner.request_snapshot()
            parts.append(format_snapshot(snapshot, self.symbols) if snapshot
                         else f"vCPU {runner.index}: not responding")
        return "\n".join(parts)

    def _print_report(self, text: str) -> None:
        out = text.replace("\n", "\r\n") if getattr(self, "_raw_terminal", None) else text
        os.write(sys.stderr.fileno(), (out + ("\r\n" if "\r\n" in out else "\n")).encode())

    # -- outcome --------------------------------------------------------------

    def _outcome(self) -> VmOutcome:
        stop = self._stop or VcpuStop(StopReason.SHUTDOWN, "stopped", fatal=False)
        elapsed = time.monotonic() - getattr(self, "start_time", time.monotonic())
        self.monitor.flush_log()
        tail = "\n".join("  | " + line for line in self.monitor.last_lines(15))
        lines_report = f"last console lines:\n{tail}"
        if self._signal is not None:
            return VmOutcome(signal_exit_code(self._signal),
                             f"stopped by {signal.Signals(self._signal).name} after {elapsed:.1f} s")
        if self._failure is not None:
            failure = self._failure
            return VmOutcome(ExitCode.GUEST_PANIC,
                             f"guest kernel {failure.level.name.lower()} at {failure.at:.1f} s: {failure.line}",
                             report=lines_report)
        if self._timeout_kind:
            return VmOutcome(ExitCode.TIMEOUT, f"timeout: {self._timeout_kind}",
                             report=f"{lines_report}\nwhere the vCPUs were:\n{self._timeout_report}")
        if stop.fatal:
            from microvmm.diag.report import format_last_seen, format_snapshot  # deferred
            report = [f"vCPU stopped: {stop.reason.value}" + (f": {stop.detail}" if stop.detail else "")]
            if stop.snapshot:
                report.append(format_snapshot(stop.snapshot, self.symbols))
            elif stop.vcpu_reset and stop.last_seen:
                report.append(format_last_seen(stop.last_seen, self.symbols))
            report.append(lines_report)
            code = ExitCode.VMM_ERROR if stop.reason is StopReason.HOST_ERROR else ExitCode.GUEST_FAULT
            return VmOutcome(code, f"guest stopped abnormally: {stop.reason.value}", report="\n".join(report))
        if (stop.reason is StopReason.RESET and self.kernel_console.kmsg
                and not self._kernel_log_port_up and not self._kernel_log_restart and not self._expect_seen):
            # panic=-1 turns an early panic into this reset; a guest whose log
            # port never came up, and whose log in RAM showed no report
            # either (or could not be read), failed all the same.
            return VmOutcome(ExitCode.GUEST_PANIC,
                             f"guest kernel reset after {elapsed:.1f} s, before its log port ({KMSG_PORT}) came "
                             "up: an early kernel failure (--cmdline "
                             f"'{SERIAL_CONSOLE_CMDLINE}' shows its log on the serial line)",
                             report=lines_report)
        if self.config.expect is not None:
            if self._expect_seen:
                return VmOutcome(ExitCode.OK, f"expected output seen after {self.monitor.expect_time:.1f} s: "
                                              f"{self.monitor.expect_line}")
            return VmOutcome(ExitCode.NO_RESULT, f"guest stopped without printing {self.config.expect!r}"
                                                 f"{self._no_driver_hint()}", report=lines_report)
        if self.config.command is not None:
            status = parse_command_status(bytes(self._status_port.data)) if self._status_port else None
            if status is None:
                return VmOutcome(ExitCode.NO_RESULT,
                                 f"guest stopped after {elapsed:.1f} s without reporting the command's status"
                                 f"{self._no_driver_hint()}", report=lines_report)
            return VmOutcome(status, f"command exited with status {status} after {elapsed:.1f} s")
        how = f" ({stop.detail})" if stop.reason in (StopReason.POWER_OFF, StopReason.HALTED) else ""
        return VmOutcome(ExitCode.OK, f"guest stopped: {stop.reason.value}{how} after {elapsed:.1f} s")

    def _no_driver_hint(self) -> str:
        """Why a run with console ports may have had no result: the guest never
        started the virtio-console device (no driver: a kernel whose virtio is
        modular, booted without --modules)."""
        transport = getattr(self, "_console_transport", None)
        if transport is None or transport.driver_seen:
            return ""
        return ("; the guest kernel never started the virtio-console device (no virtio_pci/virtio_console "
                "driver: a distribution kernel has them as modules, give them with --modules DIR)")

    # -- serial console wiring ------------------------------------------------

    @property
    def symbols(self) -> SymbolMap | KaslrSymbols | None:
        """The kernel's System.map, parsed on first use: only diagnostics and
        the profiler need it, and parsing costs ~20 ms of start-up."""
        if not self._symbols_loaded:
            from microvmm.diag.symbols import SymbolMap, SymbolMapError, find_system_map
            self._symbols_loaded = True
            path = self.config.system_map or find_system_map(self.config.kernel)
            if path:
                try:
                    self._symbols = SymbolMap.from_file(path)
                except SymbolMapError as err:
                    logger.warning("%s; diagnostics will show raw addresses", err)
            if self._symbols is not None and self.config.kaslr:
                from microvmm.diag.symbols import KaslrSymbols
                self._symbols = KaslrSymbols(self._symbols, self._find_kaslr_offset)
        return self._symbols

    def _find_kaslr_offset(self) -> int | None:
        """`--kaslr`: how far the running kernel is from its System.map
        addresses, read from the page tables of a vCPU's CR3 (diag/kaslr.py);
        None while that is not known. Said once when found."""
        from microvmm.diag.kaslr import kaslr_offset
        from microvmm.diag.symbols import KaslrSymbols
        symbols = self._symbols.symbols if isinstance(self._symbols, KaslrSymbols) else self._symbols
        link_text = symbols.address_of("_text") if symbols is not None else None
        if link_text is None:
            return None
        for runner in getattr(self, "runners", ()):
            # A running vCPU answers between two KVM_RUNs; a stopped one is read here.
            snapshot = runner.request_snapshot(timeout=0.5) if runner.thread.is_alive() else None
            if snapshot is None and not runner.thread.is_alive():
                try:
                    snapshot = runner.snapshot()
                except Exception as err:  # an odd state: no offset, no crash
                    logger.debug("vCPU %d: no state for the KASLR offset: %s", runner.index, err)
            if snapshot is None:
                continue
            offset = kaslr_offset(self.memory, snapshot.cr3, link_text)
            if offset is not None:
                logger.info("--kaslr: the kernel runs %#x bytes from its System.map addresses "
                            "(_text at %#x; from the guest's page tables, CR3 %#x)",
                            offset, link_text + offset, snapshot.cr3)
                return offset
        return None

    def _open_serial_sink(self) -> _OutputSink | None:
        serial = self.config.serial
        if serial.kind == "stdio" and self.config.command is not None:
            return None  # stdout carries the command's output; the log keeps the kernel's
        if serial.kind == "stdio":
            return _OutputSink(sys.stdout.fileno(), owned=False)
        if serial.kind == "file":
            self._note_creation(serial.path)
            try:
                fd = os.open(serial.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600)
            except OSError as err:
                raise VmmError(f"--serial file:{serial.path}: {err.strerror}") from err
            return _OutputSink(fd, owned=True)
        return None

    def _open_kernel_log_sink(self) -> _OutputSink | None:
        """Where the kernel's own log (port microvmm.kmsg) is shown: where the
        serial line goes, but on stderr for `--serial stdio`, so that stdout
        carries only what guest user space prints (a shell's command output
        never has a kernel line inside); nowhere on a `-- CMD` run's terminal,
        whose stdout and stderr are the command's. --log always has it."""
        if not self.kernel_console.kmsg:
            return None
        serial = self.config.serial
        if serial.kind == "stdio":
            return None if self.config.command is not None else _OutputSink(sys.stderr.fileno(), owned=False)
        return self._serial_sink  # a file, or None for --serial off

    # -- the kernel's log ---------------------------------------------------------
    # Its port carries every printk once the guest's virtio-console added it.
    # Until then (and for a guest that stops before) the VMM reads the records
    # from the kernel's printk ring in guest RAM (diag/kernel_log.py), every
    # KERNEL_LOG_POLL seconds on the I/O thread, so that the early log is
    # shown, watched and timed (--idle-timeout, --profile phases) as it is
    # printed. Everything here runs on the I/O thread, or after the vCPUs stopped.

    def _start_kernel_log_poll(self) -> None:
        if self.kernel_console.kmsg:
            self._kernel_records(finalized_only=True)  # System.map read now, before any seccomp filter
            self.loop.call_soon_threadsafe(self._poll_kernel_log)

    def _kernel_records(self, finalized_only: bool):
        """The guest's console records, or None (said once) if unreadable."""
        from microvmm.diag.kernel_log import KernelLogError, console_records
        if self._log_symbol_table is None:
            try:
                self._log_symbol_table = self._log_symbols()
            except KernelLogError as err:
                self._log_symbol_table = {}
                logger.warning("the kernel's log before its port is up is not shown: %s", err)
        if not self._log_symbol_table:
            return None
        try:
            return console_records(self.memory, self._log_symbol_table, finalized_only=finalized_only)
        except KernelLogError as err:
            if not self._log_read_failed:
                self._log_read_failed = True
                logger.warning("cannot read the guest kernel's log from its RAM: %s", err)
            return None

    def _show_records(self, records) -> None:
        fresh = [record for record in records if record.seq >= self._kernel_log_next_seq]
        if not fresh:
            return
        self._kernel_log_next_seq = fresh[-1].seq + 1
        # kernel_restart() says this; panic=-1's emergency_restart() does not.
        if any(record.text.startswith(b"reboot: Restarting system") for record in fresh):
            self._kernel_log_restart = True
        text = b"".join(record.console_text() for record in fresh).replace(b"\n", b"\r\n")
        self.monitor.feed(KERNEL_LOG_PORT, text)
        self._show_kernel_log(text)

    def _poll_kernel_log(self) -> None:
        """Until the port speaks: show the new records. After: watch only for
        Linux's `reboot: ...` lines, which it prints once it has shut its
        devices down (the port among them): the halt and power-off lines the
        VMM acts on (_kernel_stopping) come this way."""
        from microvmm.diag.kernel_log import KernelLogCursor, KernelLogError, console_filter
        with self._kernel_log_lock:
            if self._stopped.is_set() or not self._log_symbol_table:
                return
            if self._log_cursor is None:
                self._log_cursor = KernelLogCursor(self.memory, self._log_symbol_table)
            try:
                # only new, finalized records: the newest may still grow
                records = console_filter(self.memory, self._log_symbol_table, self._log_cursor.new_records())
            except KernelLogError as err:
                logger.warning("cannot read the guest kernel's log from its RAM: %s", err)
                return
            if not self._kernel_log_port_up:
                self._show_records(records)
            elif any(record.text.startswith(b"reboot: ") for record in records):
                self._show_port_tail()
        self.loop.call_later(KERNEL_LOG_POLL, self._poll_kernel_log)

    def _kernel_log_output(self, data: bytes) -> None:
        """Bytes of the kernel's log port; the first ones end the polling, after
        the records between the last one polled and the port's first. What
        the polling showed already and the port repeats is dropped."""
        with self._kernel_log_lock:
            self._kernel_log_port_output(data)

    def _kernel_log_port_output(self, data: bytes) -> None:
        if not self._kernel_log_port_up:
            self._kernel_log_port_up = True
            records = self._kernel_records(finalized_only=False)
            if records is not None:
                # hvc writes at most 16 bytes at a time: `data` may hold a line's start only.
                first_line = data.split(b"\n", 1)[0].rstrip(b"\r")
                for index in range(len(records) - 1, -1, -1):
                    if first_line and records[index].console_text().startswith(first_line):
                        self._show_records(records[:index])
                        self._kernel_log_repeat = b"".join(
                            record.console_text() for record in records[index:]
                            if record.seq < self._kernel_log_next_seq).replace(b"\n", b"\r\n")
                        break
                else:
                    logger.warning("the guest kernel's log port starts with a line its ring buffer lacks: "
                                   "lines before it may be missing")
        if self._kernel_log_repeat:
            repeat = self._kernel_log_repeat
            if repeat.startswith(data[:len(repeat)]):
                self._kernel_log_repeat = repeat[len(data):]
                data = data[len(repeat):]
            else:
                self._kernel_log_repeat = b""  # not the repeat after all: show everything
        if data:
            self.monitor.feed(KERNEL_LOG_PORT, data)
            self._show_kernel_log(data)
            lines = (self._kernel_log_partial + data).split(b"\n")
            self._kernel_log_partial = lines[-1][-4096:]
            # (only the kernel's own lines: where its ring buffer is searched later)
            complete = [line.rstrip(b"\r") for line in lines[:-1] if KERNEL_LINE_FORM.match(line)]
            if complete:
                self._kernel_log_last_line = complete[-1]

    def _show_kernel_log(self, data: bytes) -> None:
        if self._kernel_log_sink is not None:
            self._kernel_log_sink.write(data)

    def _log_symbols(self) -> dict[str, int]:
        """The System.map addresses of the kernel's log (diag/kernel_log.py)."""
        from microvmm.diag.kernel_log import KernelLogError, log_symbols
        from microvmm.diag.system_map import find_system_map
        path = self.config.system_map or find_system_map(self.config.kernel)
        if path is None:
            raise KernelLogError("no System.map for this kernel")
        return log_symbols(path)

    def _recover_kernel_log(self) -> None:
        """The vCPUs have stopped: what the port did not carry, from guest RAM.
        Before the port came up, that is all after the last poll (an early
        panic, then panic=-1's reset): a panic is shown and matched like any
        other. After, it is what the kernel printed once its devices were shut
        down for a reboot (`reboot: Restarting system` never reaches the port)."""
        with self._kernel_log_lock:
            if not self.kernel_console.kmsg or not self.runners:
                return
            if self._kernel_log_port_up:
                self._show_port_tail()
                return
            records = self._kernel_records(finalized_only=False)
            if records is not None:
                self._show_records(records)

    def _show_port_tail(self) -> None:
        """The records after the port's last line, from guest RAM (once each)."""
        records = self._kernel_records(finalized_only=False)
        last = self._kernel_log_last_line
        if records is None or not last:
            return
        for index in range(len(records) - 1, -1, -1):
            if last in records[index].console_text().split(b"\n"):
                break
        else:
            return  # the port's last line is not in the ring: nothing to add with confidence
        # (the records before the port's first all have lower sequence numbers:
        # _show_records shows each of these once)
        tail = [record for record in records[index + 1:] if record.seq >= self._kernel_log_next_seq]
        if tail and self._kernel_log_partial.strip():  # end the port's unfinished line first
            self.monitor.feed(KERNEL_LOG_PORT, b"\r\n")
            self._show_kernel_log(b"\r\n")
            self._kernel_log_partial = b""
        self._show_records(tail)

    def _flush_serial(self) -> None:
        """Pass on serial bytes still waiting for the end of their line (before a
        report quotes the last console lines, and at the end)."""
        batch = getattr(self, "_serial_batch", None)
        if batch is not None:
            batch.flush()

    def _serial_output(self, data: bytes) -> None:
        self.monitor.feed(SERIAL_PORT, data)
        if self._serial_sink:
            self._serial_sink.write(data)

    def _start_serial_input(self) -> None:
        if self.config.serial.kind != "stdio" or self.config.command is not None:
            return
        fd = sys.stdin.fileno() if sys.stdin else -1
        try:
            os.fstat(fd)
        except OSError:
            return  # no stdin at all (CI): the guest simply gets no input
        # The VMM's own messages share this terminal: keep \n -> \r\n on output.
        from microvmm.terminal import ESCAPE_HELP, EscapeFilter, RawTerminal  # deferred: after the first KVM_RUN
        self._raw_terminal = RawTerminal(fd, cooked_output=True)
        interactive = self._raw_terminal.enter()
        escape = EscapeFilter() if interactive else None
        if interactive:
            print(f"microvmm: {ESCAPE_HELP}\r", file=sys.stderr)
        pending = self._serial_pending

        def deliver(data: bytes) -> None:
            if escape:
                data, commands = escape.feed(data)
                self._escape_commands(commands)
            pending.extend(data)
            self._feed_serial()

        def readable() -> None:
            if pending:
                self.loop.remove_reader(fd)  # resumed by _feed_serial once the UART drains
                return
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove_reader(fd)  # EOF: the guest keeps running without input
                self._serial_input_fd = None
                return
            deliver(data)

        if stat.S_ISREG(os.fstat(fd).st_mode) or os.path.samefile(f"/proc/self/fd/{fd}", os.devnull):
            # epoll cannot watch files: read them on a helper thread instead.
            def read_all() -> None:
                while data := os.read(fd, 4096):
                    self.loop.call_soon_threadsafe(lambda data=data: deliver(data))
            threading.Thread(target=read_all, name="microvmm-stdin", daemon=True).start()
            return
        self._serial_input_fd = fd
        self._serial_readable = readable
        self.loop.add_reader(fd, readable)

    def _feed_serial(self) -> None:
        """Move pending host input into the UART FIFO, only as much as it takes:
        the rest waits for its rx_ready callback (no loss, no busy loop)."""
        pending = self._serial_pending
        if pending:
            taken = self.serial.enqueue_input(bytes(pending))
            del pending[:taken]
        if not pending and self._serial_input_fd is not None and self._serial_readable:
            self.loop.add_reader(self._serial_input_fd, self._serial_readable)


class _PciBarWindow:
    """Forwards a PCI address window to the bus, which knows the current BARs."""

    def __init__(self, base: int, read, write):
        self._base = base
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        value = self._read(self._base + offset, size)
        return (1 << (8 * size)) - 1 if value is None else value

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(self._base + offset, size, value)


# `-- CMD` runs: the command travels as the file /microvmm.cmd of a small cpio
# archive put before the initramfs (and, when it fits, base64 on the kernel
# command line: vmconfig.kernel_cmdline); its output and status come back on
# three named console ports (guest/README.md).
COMMAND_FILE = "microvmm.cmd"
#: The kernel's log port (see KernelConsolePlan).
KMSG_PORT = "microvmm.kmsg"
#: Seconds between reads of the kernel's log from guest RAM until its port is up.
KERNEL_LOG_POLL = 0.5
#: Tells the default guest's init which terminal its shell and messages use.
SHELL_CONSOLE_PARAM = "microvmm.console"
SERIAL_CONSOLE_CMDLINE = "console=ttyS0 reboot=k panic=-1"
#: A symbol only a kernel with CONFIG_VIRTIO_CONSOLE=y has (System.map).
_VIRTIO_CONSOLE_SYMBOL = b" virtcons_probe\n"


def plan_kernel_console(config: VmConfig) -> KernelConsolePlan:
    """Where the kernel's log goes: a port of its own when microvmm chooses the
    console (no --cmdline, no console= in --append), the port fits and the
    kernel has a virtio console; else the serial line as before."""
    from microvmm.virtio_console.spec import MAX_PORTS
    user_consoles = [port.name for port in config.ports if port.console]
    shared = KernelLogSources(shared=frozenset({SERIAL_PORT, *user_consoles}))
    kernel_tokens = re.split(r"(?:^|\s)--(?:\s|$)", config.cmdline, maxsplit=1)[0].split()
    if not config.default_console or any(token.startswith("console=") for token in kernel_tokens):
        return KernelConsolePlan(False, (), shared, "the command line names the console")
    serial = ("console=ttyS0",) + (("console=hvc0",) if user_consoles else ())
    ports = len(config.ports) + (3 if config.command is not None else 0)
    if ports + 1 > MAX_PORTS:
        return KernelConsolePlan(False, serial, shared, f"no room for a log port beside {ports} ports")
    if not kernel_has_virtio_console(config):
        return KernelConsolePlan(False, serial, shared,
                                 "no System.map for this kernel shows CONFIG_VIRTIO_CONSOLE=y")
    return KernelConsolePlan(
        True, (f"console=hvc{len(user_consoles)}",
               f"{SHELL_CONSOLE_PARAM}={'hvc0' if user_consoles else 'ttyS0'}"),
        KernelLogSources(dedicated=KERNEL_LOG_PORT))


def kernel_has_virtio_console(config: VmConfig) -> bool:
    from microvmm.diag.system_map import find_system_map  # a path check, no parsing
    path = config.system_map or find_system_map(config.kernel)
    if path is None:
        return False
    try:
        with open(path, "rb") as handle:
            return _VIRTIO_CONSOLE_SYMBOL in handle.read()
    except OSError:
        return False


def command_script(argv: list[str]) -> bytes:
    """The command as the guest's shell runs it: shell-quoted, one line."""
    import shlex  # deferred: only `-- CMD` runs need it (issue 6)
    return (shlex.join(argv) + "\n").encode()
COMMAND_STDOUT_PORT = "microvmm.stdout"
COMMAND_STDERR_PORT = "microvmm.stderr"
COMMAND_STATUS_PORT = "microvmm.status"


def parse_command_status(data: bytes) -> int | None:
    text = data.decode(errors="replace").strip()
    return int(text) & 0xFF if text.isdigit() else None


def run_vm(config: VmConfig, preparation: VmPreparation | None = None) -> int:
    """Run a VM to its end; print the summary (and report) on stderr, write results files.

    `preparation`: VmPreparation(config) started by the caller before it imported
    this module (start-up time); run_vm owns and closes it."""
    from microvmm.boot.errors import BootError
    from microvmm.kvm import KvmError, KvmUnavailableError
    started = time.monotonic()
    vmm = None
    # Looked up now: once --seccomp is in force, reading package metadata
    # (directory scans) may not be allowed any more.
    version = None
    if config.json or config.junit:
        from microvmm.cli import package_version
        version = package_version()
    try:
        try:
            vmm = Vmm(config)
        finally:
            if vmm is None and preparation is not None:
                preparation.close()  # no run took it over
        outcome = vmm.run(preparation)
    except (KvmUnavailableError, VmmError, BootError, KvmError) as err:
        outcome = VmOutcome(ExitCode.VMM_ERROR, f"error: {err}", setup_error=True)
        if vmm is not None:
            vmm.remove_created_files()
    ktap = None
    if vmm is not None and vmm.ktap is not None and not outcome.setup_error:
        from microvmm.run.ktap import judge_outcome
        ktap, outcome = judge_outcome(vmm.ktap, outcome, vmm.monitor.last_lines(40))
    sink = getattr(vmm, "_serial_sink", None)
    if sink is not None and not sink.at_line_start and not sink.owned:
        print(file=sys.stderr)  # don't glue the summary to an unfinished guest line
    if outcome.report:
        print(outcome.report, file=sys.stderr)
    if config.stats and vmm is not None and hasattr(vmm, "mmio_bus"):
        print(vmm.exit_statistics(), file=sys.stderr)
    print(f"microvmm: {outcome.summary}", file=sys.stderr)
    if config.json or config.junit:
        _write_results(config, vmm, outcome, time.monotonic() - started, version, ktap)
    return outcome.exit_code


def _write_results(config: VmConfig, vmm: "Vmm | None", outcome: VmOutcome, duration: float,
                   version: str | None = None, ktap=None) -> None:
    from dataclasses import asdict

    from microvmm.results import RunResult, is_infrastructure_error, write_json, write_junit

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds, 3)

    monitor = vmm.monitor if vmm else None
    command_ok = config.command is None or outcome.exit_code == 0
    boot_s = monitor.boot_time if monitor else None
    command_s = None
    if config.command is not None and boot_s is not None:
        end = vmm.stopped_at if vmm.stopped_at is not None else monitor.elapsed()
        command_s = max(0.0, end - boot_s)
    result = RunResult(
        kernel=str(config.kernel), cmdline=getattr(vmm, "cmdline", config.cmdline),
        verdict="pass" if outcome.exit_code == 0 and command_ok else "fail",
        reason=outcome.summary, exit_code=int(outcome.exit_code), duration_s=ms(duration),
        boot_s=ms(boot_s),
        expect_s=ms(monitor.expect_time) if monitor else None,
        command_s=ms(command_s),
        command=config.command,
        command_status=int(outcome.exit_code if ktap is None else ktap.command_exit)
        if config.command is not None and outcome.exit_code < 123 else None,
        # Absolute: CI collects it from elsewhere. None when a failed setup took it away again.
        log=os.path.abspath(config.log) if config.log and os.path.exists(config.log) else None,
        failures=[{**asdict(f), "level": f.level.name.lower(), "at": ms(f.at)} for f in monitor.failures]
        if monitor else [],
        last_lines=monitor.last_lines(40) if monitor else [],
        infrastructure_error=outcome.setup_error or is_infrastructure_error(int(outcome.exit_code)),
        microvmm_version=version or "unknown",
        tests=[case.as_json() for case in ktap.cases] if ktap is not None else None,
    )
    try:
        if config.json:
            write_json(result, str(config.json))
        if config.junit:
            write_junit(result, str(config.junit))
    except OSError as err:
        print(f"microvmm: error: cannot write results: {err}", file=sys.stderr)
