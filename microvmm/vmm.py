"""The VMM: one VM's lifecycle. It wires KVM, guest memory, the boot loader,
devices and threads together, runs the VM, stops it and tears it down.

Devices know nothing of KVM or the CLI; this module is the only place that
connects them (interrupt lines to irqfds, queue notifies to ioeventfds, UART
output to the serial console). The run's policy lives in microvmm/run/ (the
`-- CMD` protocol, the kernel's log, the serial console's host side, the
verdict, results and statistics); run/session.py's RunSession holds the
run's state and the callbacks this lifecycle hands to vCPUs, devices and
signals, and Vmm builds on it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from microvmm.run.exitcodes import ExitCode
from microvmm.host.hostinfo import HostKind
from microvmm.run.command import COMMAND_FILE, command_script
from microvmm.run.kernel_log import plan_kernel_console  # noqa: F401  (re-exported: the kernel console plan)
from microvmm.run.serial_console import SerialConsole
from microvmm.run.session import RunSession
from microvmm.vcpu_runner import DeviceGate, StopReason, VcpuStop
from microvmm.vmconfig import VmConfig, kernel_cmdline
from microvmm.vmprep import VmmError, VmPreparation

if TYPE_CHECKING:
    from microvmm.run.outcome import VmOutcome

logger = logging.getLogger(__name__)

#: Set to "1" to stop right at the first KVM_RUN (the start-up benchmark: run/first_run_hook.py).
EXIT_AT_FIRST_RUN_ENV = "MICROVMM_EXIT_AT_FIRST_RUN"


class Vmm(RunSession):
    """One VM, from configuration to exit status: its lifecycle (the run's
    policy, stop paths and verdict come from RunSession)."""

    def __init__(self, config: VmConfig):
        super().__init__(config)
        self._closers: list = []
        self._preparation: VmPreparation | None = None
        self.cmdline: str | None = None
        self.profiler = None
        self._serial_batch = None
        # Made by _build_vm.
        self._serial_sink: SerialConsole | None = None
        self._kernel_log_sink = None
        #: The PCI devices: their plan (before the boot), their manager (devmgr).
        self._device_plan: list = []
        self.devices = None
        self._watch_winch = False

    # -- lifecycle ------------------------------------------------------------

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
            quirks = preparation.quirks
            if kind is not HostKind.HARDWARE:
                from microvmm.host.announce import announce_host
                announce_host(kind, reason, quirks, self.config.cpus)
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
                self.buses = (self.io_bus, self.mmio_bus)
                self._gate.open(*self.buses)
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
        from microvmm.host.syscall_filter import SyscallFilterError, install_run_filter
        try:
            install_run_filter(self.config)
        except SyscallFilterError as err:
            raise VmmError(str(err)) from err

    def _build_vm(self, quirks) -> None:
        """What must exist before vCPU 0's first KVM_RUN: the VM with its in-kernel
        irqchip and PIT, guest memory with the kernel loaded (its MP table included),
        the vCPUs in their boot state, and every host resource a user's option
        names (serial file, console port backends) so that those fail before the
        guest runs. Devices come later (_build_devices)."""
        from microvmm.boot import RNG_SEED_SIZE, setup_linux_boot

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
        from microvmm.devmgr.plan import DevicePlanError, mp_table_irqs, plan_functions
        try:
            self._device_plan = plan_functions(self._device_requests())
        except DevicePlanError as err:
            raise VmmError(str(err)) from err
        self.devices = None  # the DeviceManager: made once devices have host resources to open
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
                                num_cpus=config.cpus, pci_irqs=mp_table_irqs(self._device_plan),
                                rng_seed=os.urandom(RNG_SEED_SIZE),
                                bzimage_payload_as_elf=quirks.decompress_bzimage_on_host)
        del kernel, initrd  # in guest RAM now; a bzImage's bytes go back
        # Host resources named by the user (serial file, ptys, sockets) are
        # opened once the kernel and initrd proved valid, and fail here,
        # before the guest runs.
        self._serial_sink = self._open_serial_sink()
        self._kernel_log_sink = self._open_kernel_log_sink()
        self._open_device_backends()
        self.boot = boot
        self._announce_payload_workaround(boot)
        if not config.kaslr:
            logger.info("kernel address randomization off ('nokaslr' added): System.map addresses "
                        "are the running kernel's (--kaslr keeps it)")
        self._gate = DeviceGate()
        from microvmm.vcpus import create_vcpu_runners
        self.runners = create_vcpu_runners(vm, memory, boot, config.cpus, supported, quirks, self._gate,
                                           self._vcpu_stopped, self._closers)

    def _open_device_backends(self) -> None:
        """The devices' host backends (a socket file, a pty...), opened while
        nothing runs yet so that a failure ends the VMM before the guest starts."""
        if not self.config.all_ports and not self.config.devices:
            return  # nothing to open (the default run): the manager comes after the first KVM_RUN
        from microvmm.devmgr.manager import DeviceManager
        from microvmm.devmgr.registry import DeviceSetupError, HostContext
        self.devices = DeviceManager(self._device_plan)
        stdio_filter = self._stdio_input_filter() if self.config.all_ports else None
        try:
            self.devices.open_host(HostContext(sys.stderr, self._closers, stdio_filter))
        except DeviceSetupError as err:
            raise VmmError(str(err)) from err

    def _build_devices(self) -> None:
        """Everything the guest needs only later, built while vCPU 0 runs: the
        legacy devices, the PCI bus, the virtio-console with its irqfds and
        ioeventfds, the event loop. Its exits wait at the gate until this is done."""
        from microvmm.devices.pc import legacy_pc_devices
        from microvmm.eventloop import EventLoop
        from microvmm.run.outputbatch import OutputBatcher

        self.loop = loop = EventLoop()
        self._closers.append(loop.close)
        # The UART sends a byte per vCPU exit: pass them on in runs (lines).
        self._serial_batch = OutputBatcher(self._serial_output, loop)
        pc = legacy_pc_devices(self.vm.irq_line, self._serial_batch.write,
                               lambda: loop.call_soon_threadsafe(self.serial_console.feed),
                               self._reset_requested)
        self.io_bus, self.mmio_bus, self.serial = pc.io_bus, pc.mmio_bus, pc.serial
        self._build_pci()

    def _build_pci(self) -> None:
        """The PCI bus and its devices (devmgr), the run's ports on the first console."""
        from microvmm.devmgr.registry import DeviceSetupError
        if self.devices is None:
            from microvmm.devmgr.manager import DeviceManager
            self.devices = DeviceManager(self._device_plan)
        devices = self.devices
        try:
            devices.build(self.vm, self.memory, self.loop, self.io_bus, self.mmio_bus, self._closers,
                          self.config.queue_size, output_tap=self._port_output_tap,
                          run_ports=self._run_ports, hotplug=self.config.control is not None)
        except DeviceSetupError as err:
            raise VmmError(str(err)) from err
        self.pci = devices.pci
        consoles = devices.of_kind("virtio-console")
        if consoles:
            self.console = consoles[0].device
            self._console_transport = consoles[0].transport  # did the guest ever drive it? (_no_driver_hint)
        self._watch_winch = any(p.backend.value in ("stdio", "tty", "pty") for p in self.config.all_ports)

    def _run_ports(self) -> list:
        """The ports the run needs on the first console, after the user's: the
        `-- CMD` ports, then the kernel's log port (last, so that the user's
        ports keep their numbers and hvc0 stays the first user console)."""
        ports = []
        if self.config.command is not None:
            from microvmm.run.command import command_ports
            command, self._status_port = command_ports(sys.stdout.fileno(), sys.stderr.fileno())
            self._closers.extend(backend.close for _, backend in command)
            ports += command
        if self.kernel_console.kmsg:
            ports.append(self.kernel_log.port())
        return ports

    def _start_vcpus(self) -> None:
        self.start_time = time.monotonic()
        if os.environ.get(EXIT_AT_FIRST_RUN_ENV) == "1":  # the start-up benchmark
            from microvmm.run.first_run_hook import exit_at_first_run
            exit_at_first_run(self.runners[0].vcpu, lambda why: self._request_stop(
                VcpuStop(StopReason.SHUTDOWN, why, fatal=False)))
        for runner in self.runners:
            runner.start()
        # Let vCPU 0 into the guest before this thread takes the GIL for the device build.
        self.runners[0].wait_entering_guest()

    def _refresh_console_sizes(self) -> None:
        for console in self.devices.of_kind("virtio-console"):
            console.device.refresh_sizes()

    def _start_io(self) -> None:
        """Once the devices exist: host input, the event loop, the profiler."""
        if self._watch_winch:  # a console port has a terminal
            # the host terminal was resized: tell the guest (RESIZE control message)
            self._previous_handlers[signal.SIGWINCH] = signal.signal(
                signal.SIGWINCH, lambda *_: self._refresh_console_sizes())
        self.serial_console.start(self.loop, self.serial.enqueue_input)
        if self.kernel_console.kmsg:
            self.kernel_log.start(self.memory, self.loop, self._kernel_log_sink)
        self.loop.start()
        if self.config.control is not None:  # commands for the running VM (microvmm/control/)
            from microvmm.control.vmmlink import start_control
            start_control(self, self.config.control)
        if self.config.profile:
            from microvmm.diag.profiler import GuestProfiler
            self.profiler = GuestProfiler(self.runners, lambda: self.monitor.last_line, self.symbols,
                                          rate_hz=self.config.profile_rate)
            self.profiler.start()

    def _teardown(self) -> None:
        if self.config.kaslr and self.runners and self.symbols is not None:
            # Said while guest RAM and the vCPUs are still there, and before
            # the profile report needs it.
            self.symbols.offset  # noqa: B018  (KaslrSymbols: looked up now)
        if self.profiler is not None:
            from microvmm.run.stats import write_profile
            self.profiler.stop()  # before the vCPUs go: it samples them
            write_profile(self.config.profile, self.profiler, self.exit_statistics())
        for runner in self.runners:
            runner.stop()
        for runner in self.runners:
            if runner.thread.is_alive():
                runner.thread.join(timeout=5)
        if self._serial_batch is not None:
            self._serial_batch.flush()  # what the vCPUs wrote last
        self.kernel_log.recover()  # guest RAM is still mapped
        self.serial_console.close()  # its last output, then the terminal as it was
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        for close in reversed(self._closers):
            try:
                close()
            except Exception as err:  # keep closing the rest
                logger.debug("teardown: %s", err)
        self._closers.clear()
        preparation, self._preparation = self._preparation, None
        if preparation is not None:
            # Joins its helper threads, closes what _build_vm never took (a
            # failure before), then unmaps guest RAM: after every device and
            # vCPU that used it is gone.
            preparation.close()
        if self._log_file is not None:
            self.monitor.flush_log()
            self._log_file.close()



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
        from microvmm.version import package_version
        version = package_version()
    try:
        try:
            vmm = Vmm(config)
        finally:
            if vmm is None and preparation is not None:
                preparation.close()  # no run took it over
        outcome = vmm.run(preparation)
    except (KvmUnavailableError, VmmError, BootError, KvmError) as err:
        from microvmm.run.outcome import VmOutcome
        outcome = VmOutcome(ExitCode.VMM_ERROR, f"error: {err}", setup_error=True)
        if vmm is not None:
            vmm.created_files.remove_empty()  # a setup error: no empty files left behind
    ktap = None
    if vmm is not None and vmm.ktap is not None and not outcome.setup_error:
        from microvmm.run.ktap import judge_outcome
        ktap, outcome = judge_outcome(vmm.ktap, outcome, vmm.monitor.last_lines(40))
    from microvmm.run.report import report_run
    statistics = vmm.exit_statistics if vmm is not None and vmm.buses else None
    report_run(config, vmm, outcome, time.monotonic() - started, version,
               unfinished_line=vmm is not None and vmm.serial_console.unfinished_stdout_line,
               statistics=statistics, ktap=ktap)
    return outcome.exit_code
