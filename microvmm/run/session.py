"""The run's policy on one VM: what it watches, when it stops, what it says.

RunSession holds the run's state (the monitor of the guest's output, the
kernel's log, the serial console's host side, `--ktap`, the stop and its
reason, timeouts) and the callbacks the lifecycle (vmm.Vmm) hands to vCPUs,
devices and signals; its verdict is `_outcome()`. Vmm builds on it and adds
the machine: KVM, memory, devices, threads. It sets `runners`, `memory`,
`loop`, `start_time`, `_status_port` and `_console_transport` as they come
to exist (and `buses`); everything here reads them only after that.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from typing import TYPE_CHECKING

from microvmm.diag.live import LiveDiagnostics
from microvmm.run.command import COMMAND_STDOUT_PORT, parse_command_status
from microvmm.run.created_files import CreatedFiles
from microvmm.run.halt import HaltConfirmation
from microvmm.run.kernel_log import KMSG_PORT, SERIAL_CONSOLE_CMDLINE, KernelConsolePlan, KernelLog
from microvmm.run.serial_console import SerialConsole, SerialConsoleError
from microvmm.run.monitor import Failure, RunMonitor
from microvmm.vcpu_runner import KICK_SIGNAL, StopReason, VcpuRunner, VcpuStop
from microvmm.vmprep import VmmError

if TYPE_CHECKING:
    from microvmm.diag.symbols import KaslrSymbols, SymbolMap
    from microvmm.run.outcome import VmOutcome
    from microvmm.vmconfig import VmConfig


class RunSession:
    """One run's policy state and callbacks (see the module docstring)."""

    def __init__(self, config: "VmConfig"):
        self.config = config
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self._stop: VcpuStop | None = None
        self._signal: int | None = None
        self._previous_handlers: dict = {}
        # Set by the lifecycle as they come to exist.
        self.runners: list[VcpuRunner] = []
        self.memory = None
        self.loop = None
        self.start_time: float | None = None
        self._console_transport = None
        self._status_port = None
        #: The port-I/O and MMIO buses, once the devices are built (--stats).
        self.buses: tuple = ()
        self._log_file = None
        #: Files this run created (--log, --serial file:): removed again if
        #: setup fails before anything was written to them.
        self.created_files = CreatedFiles()
        if config.log:
            self.created_files.note(config.log)
            try:
                self._log_file = open(config.log, "a", encoding="utf-8")
            except OSError as err:
                raise VmmError(f"--log {config.log}: {err.strerror}") from err
        #: `--ktap`: the command's stdout read as KTAP/TAP as it comes (run.ktap).
        self.ktap = None
        if config.ktap:
            from microvmm.run.ktap import KtapCollector
            self.ktap = KtapCollector()
        self._halt = HaltConfirmation(lambda: self.runners, self._stopped, lambda: self._stop is not None,
                                      self._guest_ended)
        self.monitor = RunMonitor(
            log=self._log_file, fail_on=config.fail_on,
            expect=re.compile(config.expect.encode()) if config.expect else None,
            expect_port=config.expect_port, on_failure=self._guest_failed,
            on_expect=self._expected_output, on_kernel_stop=self._halt.kernel_stopping,
            taps={COMMAND_STDOUT_PORT: self.ktap.feed} if self.ktap else None)
        #: Seconds since the monitor started when the first stop was asked for.
        self.stopped_at: float | None = None
        self.kernel_console = KernelConsolePlan(False, (), self.monitor.kernel_log)
        self.kernel_log = KernelLog(config, self.monitor.feed, self._stopped)
        self.serial_console = SerialConsole(config.serial, config.command is not None, self._escape_commands)
        self._failure: Failure | None = None
        self._timeout_kind: str | None = None
        self._timeout_report = ""
        self._expect_seen = False
        self.diagnostics = LiveDiagnostics(config, lambda: self.memory, lambda: self.runners,
                                           lambda: self.serial_console.raw_terminal)


    def _install_signal_handlers(self) -> None:
        signal.signal(KICK_SIGNAL, lambda *_: None)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._previous_handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_dump_request)

    def _wait(self) -> None:
        from microvmm.run.timeouts import expired_timeout
        while not self._stopped.wait(0.2):
            expired = expired_timeout(self.config, self.start_time, self.monitor, time.monotonic())
            if expired:
                self._timeout_kind = expired
                self._timeout_report = self.diagnostics.where()
                self._request_stop(VcpuStop(StopReason.SHUTDOWN, "timeout", fatal=False))
                break

    def _port_output_tap(self, name: str, data: bytes) -> None:
        if name != KMSG_PORT:  # the log port feeds the monitor itself (KernelLog.port_output)
            self.monitor.feed(name, data)

    # -- what the lifecycle asks the policy ------------------------------------

    @staticmethod
    def _announce_payload_workaround(boot) -> None:
        from microvmm.host.announce import announce_payload_workaround
        announce_payload_workaround(boot)

    def _device_requests(self) -> list:
        """The PCI devices to plan: the first virtio-console (the --console
        ports, and the run's own ports: `-- CMD`, the kernel's log) when there
        is one, then every further --device in command-line order."""
        from microvmm.devmgr.plan import DeviceRequest
        first = [DeviceRequest("virtio-console", list(self.config.ports))] if self._wants_console() else []
        return first + list(self.config.devices)

    def _wants_console(self) -> bool:
        return (bool(self.config.ports) or self.config.command is not None or self.kernel_console.kmsg
                or self.config.control is not None)

    def _open_serial_sink(self) -> SerialConsole:
        """The serial console's backend when a user's path names it (a file,
        pty, socket): opened here, before the guest runs, so that it fails then."""
        if self.config.serial.kind == "file":
            self.created_files.note(self.config.serial.path)
        try:
            self.serial_console.open()
        except SerialConsoleError as err:
            raise VmmError(str(err)) from err
        return self.serial_console

    def _open_kernel_log_sink(self):
        """Where the kernel's own log is shown (SerialConsole.kernel_log_writer)."""
        return self.serial_console.kernel_log_writer() if self.kernel_console.kmsg else None

    def exit_statistics(self) -> str:
        """Exits by reason and port/MMIO accesses by device (--stats, --profile)."""
        from microvmm.run.stats import exit_statistics
        first_run = None if self.start_time is None else (self.start_time, self.start_time - self.monitor.started)
        return exit_statistics(self.runners, self.buses, first_run)

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
        final halt (run/halt.py). All of them end the run with status 0."""
        self._request_stop(VcpuStop(reason, detail, fatal=False))

    def _reset_requested(self) -> None:
        self._guest_ended(StopReason.RESET, "i8042 reset")

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

    def _escape_commands(self, commands: list[str]) -> None:
        """Ctrl-A commands typed at the VMM's terminal (serial console or a stdio port)."""
        for command in commands:
            if command == "quit":
                self._request_stop(VcpuStop(StopReason.SHUTDOWN, "user quit (Ctrl-A x)", fatal=False))
            elif command == "help":
                from microvmm.host.terminal import ESCAPE_HELP
                self.diagnostics.print(ESCAPE_HELP)

    def _stdio_input_filter(self):
        """What a stdio console port reads from the VMM's terminal passes here:
        Ctrl-A commands are taken out (as on the serial console)."""
        from microvmm.host.terminal import EscapeFilter  # deferred: termios, only with console ports
        escape = EscapeFilter()

        def stdio_filter(data: bytes) -> bytes:
            data, commands = escape.feed(data)
            if commands:
                self._escape_commands(commands)
            return data
        return stdio_filter

    def _on_signal(self, signum: int, _frame) -> None:
        self._signal = signum
        self._request_stop(VcpuStop(StopReason.SHUTDOWN, f"signal {signal.Signals(signum).name}",
                                    fatal=False))

    def _on_dump_request(self, _signum: int, _frame) -> None:
        self.diagnostics.print_where_soon()

    # -- outcome --------------------------------------------------------------

    def _outcome(self) -> VmOutcome:
        from microvmm.run.outcome import RunEnd, classify, no_driver_hint
        self.monitor.flush_log()
        elapsed = time.monotonic() - (self.start_time or time.monotonic())
        early_reset = None
        if self.kernel_console.kmsg and self.kernel_log.early_failure:
            early_reset = (f"before its log port ({KMSG_PORT}) came up: an early kernel failure (--cmdline "
                           f"'{SERIAL_CONSOLE_CMDLINE}' shows its log on the serial line)")
        status = parse_command_status(bytes(self._status_port.data)) if self._status_port else None
        return classify(RunEnd(
            stop=self._stop, elapsed=elapsed, last_lines=self.monitor.last_lines(15), signal=self._signal,
            failure=self._failure, timeout=self._timeout_kind, timeout_report=self._timeout_report,
            early_reset_hint=early_reset, expect=self.config.expect, expect_seen=self._expect_seen,
            expect_time=self.monitor.expect_time, expect_line=self.monitor.expect_line,
            command=self.config.command is not None, command_status=status,
            no_driver_hint=no_driver_hint(self._console_transport), describe_stop=self.diagnostics.describe_stop))

    @property
    def symbols(self) -> SymbolMap | KaslrSymbols | None:
        return self.diagnostics.symbols

    # -- callbacks the device wiring hands on -----------------------------------

    def _serial_output(self, data: bytes) -> None:
        self.monitor.feed("serial", data)
        self.serial_console.output(data)
