"""The guest kernel's log: where it goes (decided before the boot), and how
the VMM shows and watches it.

Its port (microvmm.kmsg) carries every printk once the guest's virtio-console
added it. Until then (and for a guest that stops before) the VMM reads the
records from the kernel's printk ring in guest RAM (diag/kernel_log.py), every
KERNEL_LOG_POLL seconds on the I/O thread, so that the early log is shown,
watched and timed (--idle-timeout, --profile phases) as it is printed.
Everything here runs on the I/O thread, or after the vCPUs stopped.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from microvmm.guest_contract import KMSG_PORT  # noqa: F401  (the kernel's log port: KernelConsolePlan)
from microvmm.run.monitor import KERNEL_LINE_FORM, KERNEL_LOG_PORT, SERIAL_PORT, KernelLogSources

if TYPE_CHECKING:
    from microvmm.eventloop import EventLoop
    from microvmm.vmconfig import VmConfig

logger = logging.getLogger(__name__)

#: Seconds between reads of the kernel's log from guest RAM until its port is up.
KERNEL_LOG_POLL = 0.5
#: Tells the default guest's init which terminal its shell and messages use.
SHELL_CONSOLE_PARAM = "microvmm.console"
SERIAL_CONSOLE_CMDLINE = "console=ttyS0 reboot=k panic=-1"
#: A symbol only a kernel with CONFIG_VIRTIO_CONSOLE=y has (System.map).
_VIRTIO_CONSOLE_SYMBOL = b" virtcons_probe\n"
#: Ports a `-- CMD` run adds (run/command.py).
_COMMAND_PORTS = 3


@dataclass(frozen=True)
class KernelConsolePlan:
    """Where the guest kernel's log goes, decided before the boot.

    `kmsg`: on the port microvmm.kmsg, a virtio console only the kernel writes
    to (its printk costs no userspace exit); what the kernel printed before
    the port came up the VMM reads from its printk ring in guest RAM
    (KernelLog). Otherwise on the serial line (and hvc0) as the command line
    says, and `why` says why.
    """

    kmsg: bool
    cmdline_additions: tuple[str, ...]
    sources: KernelLogSources
    why: str = ""


def plan_kernel_console(config: "VmConfig") -> KernelConsolePlan:
    """Where the kernel's log goes: a port of its own when microvmm chooses the
    console (no --cmdline, no console= in --append), the port fits and the
    kernel has a virtio console; else the serial line as before."""
    from microvmm.virtio_console.spec import MAX_PORTS
    user_consoles = [port.name for port in config.all_ports if port.console]
    shared = KernelLogSources(shared=frozenset({SERIAL_PORT, *user_consoles}))
    kernel_tokens = re.split(r"(?:^|\s)--(?:\s|$)", config.cmdline, maxsplit=1)[0].split()
    if not config.default_console or any(token.startswith("console=") for token in kernel_tokens):
        return KernelConsolePlan(False, (), shared, "the command line names the console")
    serial = ("console=ttyS0",) + (("console=hvc0",) if user_consoles else ())
    ports = len(config.ports) + (_COMMAND_PORTS if config.command is not None else 0)
    if ports + 1 > MAX_PORTS:
        return KernelConsolePlan(False, serial, shared, f"no room for a log port beside {ports} ports")
    if any(port.console for port in config.all_ports[len(config.ports):]):
        # Their hvc numbers follow the order the guest adds console ports on
        # the several devices, which varies: hvcN could not name the log port.
        return KernelConsolePlan(False, serial, shared,
                                 "console ports on a further virtio-console device")
    if not kernel_has_virtio_console(config):
        return KernelConsolePlan(False, serial, shared,
                                 "no System.map for this kernel shows CONFIG_VIRTIO_CONSOLE=y")
    return KernelConsolePlan(
        True, (f"console=hvc{len(user_consoles)}",
               f"{SHELL_CONSOLE_PARAM}={'hvc0' if user_consoles else 'ttyS0'}"),
        KernelLogSources(dedicated=KERNEL_LOG_PORT))


def kernel_has_virtio_console(config: "VmConfig") -> bool:
    from microvmm.diag.system_map import find_system_map  # a path check, no parsing
    path = config.system_map or find_system_map(config.kernel)
    if path is None:
        return False
    try:
        with open(path, "rb") as handle:
            return _VIRTIO_CONSOLE_SYMBOL in handle.read()
    except OSError:
        return False


class KernelLog:
    """Shows and watches the kernel's log of a run whose plan has `kmsg`: its
    port's bytes (`port_output`), before that its printk ring (`start` polls
    it), and at the end what the port did not carry (`recover`).

    `feed(port, data)` hands lines to the run monitor, `stopped()` says the
    run is stopping, `on_stopping_lines` is unused by design: the halt and
    power-off lines reach the monitor through `feed`.
    """

    def __init__(self, config: "VmConfig", feed: Callable[[str, bytes], None], stopped: threading.Event):
        self._config = config
        self._feed = feed
        self._stopped = stopped
        self._memory = None
        self._loop: EventLoop | None = None
        self._show: Callable[[bytes], None] | None = None
        self.port_up = False
        #: The kernel said `reboot: Restarting system` (a reboot it chose).
        self.restart_seen = False
        self._next_seq = 0
        self._repeat = b""
        self._partial = b""
        #: The last complete line the port carried (where teardown's read resumes).
        self._last_line = b""
        #: The I/O thread (port bytes, polls) and teardown's last read share the above.
        self._lock = threading.Lock()
        self._symbol_table: dict[str, int] | None = None
        self._read_failed = False
        self._cursor = None

    def start(self, memory, loop: "EventLoop", show: Callable[[bytes], None] | None) -> None:
        """Before the I/O thread runs: read System.map now (before any seccomp
        filter) and poll the ring from the loop until the port speaks."""
        self._memory, self._loop, self._show = memory, loop, show
        self._records(finalized_only=True)
        loop.call_soon_threadsafe(self._poll)

    def port(self) -> tuple:
        """The log port: a console only the kernel writes to (PortSpec, backend)."""
        from microvmm.virtio_console.backends import CallbackBackend
        from microvmm.virtio_console.spec import BackendKind, PortSpec
        return (PortSpec(console=True, backend=BackendKind.FILE, name=KMSG_PORT, path=None),
                CallbackBackend(KMSG_PORT, self.port_output))

    @property
    def early_failure(self) -> bool:
        """The log port never came up and the kernel chose no restart: a reset
        now is an early kernel failure."""
        return self._memory is not None and not self.port_up and not self.restart_seen

    def port_output(self, data: bytes) -> None:
        """Bytes of the kernel's log port; the first ones end the polling, after
        the records between the last one polled and the port's first. What
        the polling showed already and the port repeats is dropped."""
        with self._lock:
            self._port_output(data)

    def recover(self) -> None:
        """The vCPUs have stopped: what the port did not carry, from guest RAM.
        Before the port came up, that is all after the last poll (an early
        panic, then panic=-1's reset): a panic is shown and matched like any
        other. After, it is what the kernel printed once its devices were shut
        down for a reboot (`reboot: Restarting system` never reaches the port)."""
        with self._lock:
            if self._memory is None:
                return  # never started: no guest ran with this log
            if self.port_up:
                self._show_port_tail()
                return
            records = self._records(finalized_only=False)
            if records is not None:
                self._show_records(records)

    # -- the ring in guest RAM ---------------------------------------------------

    def _log_symbols(self) -> dict[str, int]:
        """The System.map addresses of the kernel's log (diag/kernel_log.py)."""
        from microvmm.diag.kernel_log import KernelLogError, log_symbols
        from microvmm.diag.system_map import find_system_map
        path = self._config.system_map or find_system_map(self._config.kernel)
        if path is None:
            raise KernelLogError("no System.map for this kernel")
        return log_symbols(path)

    def _records(self, finalized_only: bool):
        """The guest's console records, or None (said once) if unreadable."""
        from microvmm.diag.kernel_log import KernelLogError, console_records
        if self._symbol_table is None:
            try:
                self._symbol_table = self._log_symbols()
            except KernelLogError as err:
                self._symbol_table = {}
                logger.warning("the kernel's log before its port is up is not shown: %s", err)
        if not self._symbol_table:
            return None
        try:
            return console_records(self._memory, self._symbol_table, finalized_only=finalized_only)
        except KernelLogError as err:
            if not self._read_failed:
                self._read_failed = True
                logger.warning("cannot read the guest kernel's log from its RAM: %s", err)
            return None

    def _show_records(self, records) -> None:
        fresh = [record for record in records if record.seq >= self._next_seq]
        if not fresh:
            return
        self._next_seq = fresh[-1].seq + 1
        # kernel_restart() says this; panic=-1's emergency_restart() does not.
        if any(record.text.startswith(b"reboot: Restarting system") for record in fresh):
            self.restart_seen = True
        text = b"".join(record.console_text() for record in fresh).replace(b"\n", b"\r\n")
        self._feed(KERNEL_LOG_PORT, text)
        self._display(text)

    def _poll(self) -> None:
        """Until the port speaks: show the new records. After: watch only for
        Linux's `reboot: ...` lines, which it prints once it has shut its
        devices down (the port among them): the halt and power-off lines the
        VMM acts on come this way."""
        from microvmm.diag.kernel_log import KernelLogCursor, KernelLogError, console_filter
        with self._lock:
            if self._stopped.is_set() or not self._symbol_table:
                return
            if self._cursor is None:
                self._cursor = KernelLogCursor(self._memory, self._symbol_table)
            try:
                # only new, finalized records: the newest may still grow
                records = console_filter(self._memory, self._symbol_table, self._cursor.new_records())
            except KernelLogError as err:
                logger.warning("cannot read the guest kernel's log from its RAM: %s", err)
                return
            if not self.port_up:
                self._show_records(records)
            elif any(record.text.startswith(b"reboot: ") for record in records):
                self._show_port_tail()
        self._loop.call_later(KERNEL_LOG_POLL, self._poll)

    # -- the port -------------------------------------------------------------------

    def _port_output(self, data: bytes) -> None:
        if not self.port_up:
            self.port_up = True
            records = self._records(finalized_only=False) if self._memory is not None else None
            if records is not None:
                # hvc writes at most 16 bytes at a time: `data` may hold a line's start only.
                first_line = data.split(b"\n", 1)[0].rstrip(b"\r")
                for index in range(len(records) - 1, -1, -1):
                    if first_line and records[index].console_text().startswith(first_line):
                        self._show_records(records[:index])
                        self._repeat = b"".join(
                            record.console_text() for record in records[index:]
                            if record.seq < self._next_seq).replace(b"\n", b"\r\n")
                        break
                else:
                    logger.warning("the guest kernel's log port starts with a line its ring buffer lacks: "
                                   "lines before it may be missing")
        if self._repeat:
            repeat = self._repeat
            if repeat.startswith(data[:len(repeat)]):
                self._repeat = repeat[len(data):]
                data = data[len(repeat):]
            else:
                self._repeat = b""  # not the repeat after all: show everything
        if data:
            self._feed(KERNEL_LOG_PORT, data)
            self._display(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines[-1][-4096:]
            # (only the kernel's own lines: where its ring buffer is searched later)
            complete = [line.rstrip(b"\r") for line in lines[:-1] if KERNEL_LINE_FORM.match(line)]
            if complete:
                self._last_line = complete[-1]

    def _show_port_tail(self) -> None:
        """The records after the port's last line, from guest RAM (once each)."""
        records = self._records(finalized_only=False)
        last = self._last_line
        if records is None or not last:
            return
        for index in range(len(records) - 1, -1, -1):
            if last in records[index].console_text().split(b"\n"):
                break
        else:
            return  # the port's last line is not in the ring: nothing to add with confidence
        # (the records before the port's first all have lower sequence numbers:
        # _show_records shows each of these once)
        tail = [record for record in records[index + 1:] if record.seq >= self._next_seq]
        if tail and self._partial.strip():  # end the port's unfinished line first
            self._feed(KERNEL_LOG_PORT, b"\r\n")
            self._display(b"\r\n")
            self._partial = b""
        self._show_records(tail)

    def _display(self, data: bytes) -> None:
        if self._show is not None:
            self._show(data)
