"""Watches every byte the guest prints, on the serial line and on each console
port: keeps the last lines for reports, writes the tagged log, spots kernel
failures, the boot marker and a user's --expect pattern, and knows when the
guest last said anything (for --idle-timeout).

Kernel reports are matched only where the kernel's log is (KernelLogSources):
on the dedicated kernel-log port every line counts; on a console the kernel
shares with user space (a shell, a program's output) only lines in the
kernel's own form, its timestamp prefix `[    1.234567] `; everywhere else
(command output, data ports) never. So no program's output and no typed text
can pass for a kernel failure.

Pure bookkeeping over (port, bytes) events: the VMM feeds it and acts on what
it reports, so it is testable without a guest.
"""

from __future__ import annotations

import collections
import enum
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

SERIAL_PORT = "serial"
#: The monitor's name for the dedicated kernel-log port (microvmm.kmsg in the guest).
KERNEL_LOG_PORT = "kmsg"
#: The default guest's init prints this on its shell's terminal: any port may carry it.
INIT_MARKER = re.compile(rb"microvmm: init reached")
#: The kernel's own line on starting init: only from the kernel's log.
KERNEL_INIT_MARKER = re.compile(rb"Run \S+ as init process")
#: A printk line as a console shows it (CONFIG_PRINTK_TIME; optional PRINTK_CALLER).
KERNEL_LINE_FORM = re.compile(rb"^\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])? ")
_MAX_LINE = 4096


class FailureLevel(enum.IntEnum):
    """How bad a kernel report is; --fail-on picks the lowest that fails a run."""

    WARN = 1
    OOPS = 2
    PANIC = 3


# Lines Linux prints when something went wrong, by how bad it is. Sanitizer
# reports (KASAN, KCSAN, KFENCE, UBSAN) count as oopses: they are bugs found.
FAILURE_PATTERNS: tuple[tuple[FailureLevel, re.Pattern[bytes]], ...] = (
    (FailureLevel.PANIC, re.compile(rb"Kernel panic - not syncing")),
    (FailureLevel.OOPS, re.compile(rb"\bOops(?::| - )|\bBUG: |general protection fault|"
                                   rb"\bKASAN: |\bKCSAN: |\bKFENCE: |\bUBSAN: |Unable to handle kernel")),
    (FailureLevel.WARN, re.compile(rb"\bWARNING: ")),
)


# Literal words one of which every failure / boot-marker line contains: a
# substring test per chunk (memchr speed) decides whether the regexes run.
_FAILURE_WORDS = (b"panic", b"Oops", b"BUG: ", b"protection fault", b"KASAN: ", b"KCSAN: ",
                  b"KFENCE: ", b"UBSAN: ", b"Unable to handle", b"WARNING: ")
_BOOT_WORDS = (b"init reached", b" as init process")

# What Linux prints (kernel/reboot.c, pr_fmt "reboot: ") right before it halts
# the CPUs or calls the platform's power-off: the VMM then checks that the
# vCPUs really stopped (a user can type these words too).
KERNEL_STOP_LINE = re.compile(rb"reboot: (System halted|Power down)")
_KERNEL_STOP_WORD = b"reboot: "


def _has_any(chunk: bytes, words: tuple[bytes, ...]) -> bool:
    return any(word in chunk for word in words)


class KernelLogKind(enum.Enum):
    """What a port is to the kernel's log."""

    DEDICATED = "only the kernel writes there"
    SHARED = "the kernel and user space write there"


@dataclass(frozen=True)
class KernelLogSources:
    """Where the kernel's log reaches the host.

    `dedicated`: a port only the kernel writes to (every line is the kernel's).
    `shared`: consoles the kernel may print on next to user space (only lines
    in the kernel's timestamped form count there). Other ports never count.
    """

    dedicated: str | None = None
    shared: frozenset[str] = frozenset()

    def kind(self, port: str) -> KernelLogKind | None:
        """None: not a kernel-log source."""
        if port == self.dedicated:
            return KernelLogKind.DEDICATED
        return KernelLogKind.SHARED if port in self.shared else None


@dataclass(frozen=True)
class Failure:
    """A kernel report (panic, Oops, BUG, WARNING) seen on a console."""

    level: FailureLevel
    port: str
    line: str
    at: float  # seconds since the monitor started


class RunMonitor:
    """Line-level view of all console output of one VM run.

    Callbacks run on whichever thread fed the bytes (a vCPU thread for the
    UART, the I/O thread for console ports); they must be quick.
    """

    def __init__(self, history_lines: int = 40, log: TextIO | None = None,
                 fail_on: FailureLevel = FailureLevel.OOPS,
                 expect: re.Pattern[bytes] | None = None, expect_port: str | None = None,
                 on_failure: Callable[[Failure], None] | None = None,
                 on_expect: Callable[[str], None] | None = None,
                 on_boot: Callable[[], None] | None = None,
                 on_kernel_stop: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 kernel_log: KernelLogSources = KernelLogSources(shared=frozenset({SERIAL_PORT})),
                 taps: dict[str, Callable[[bytes, float], None]] | None = None):
        self._clock = clock
        self.started = clock()
        self.last_output = self.started
        self._lock = threading.Lock()
        self._partial: dict[str, bytes] = {}
        self._lines: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=history_lines)
        self._log = log
        self.fail_on = fail_on
        self._expect = expect
        self._expect_port = expect_port
        self._on_failure = on_failure
        self._on_expect = on_expect
        self._on_boot = on_boot
        #: Called with "System halted" or "Power down" (see KERNEL_STOP_LINE).
        self._on_kernel_stop = on_kernel_stop
        self.kernel_log = kernel_log
        self.failures: list[Failure] = []
        self.boot_time: float | None = None
        self.expect_time: float | None = None
        self.expect_line: str | None = None
        #: The latest complete console line (the profiler's notion of a boot phase).
        self.last_line = ""
        #: Port name -> called with each chunk of that port's bytes, as fed, and
        #: the seconds since the start (e.g. --ktap reading the command's stdout).
        self._taps = dict(taps or {})

    def elapsed(self) -> float:
        return self._clock() - self.started

    def feed(self, port: str, data: bytes) -> None:
        if not data:
            return
        events: list[Callable[[], None]] = []
        with self._lock:
            now = self._clock()
            self.last_output = now
            tap = self._taps.get(port)
            if tap is not None:
                tap(data, now - self.started)
            text = self._partial.get(port, b"") + bytes(data)
            *complete, rest = text.split(b"\n")
            if len(rest) > _MAX_LINE:  # a line without end must not grow forever
                complete.append(rest)
                rest = b""
            self._partial[port] = rest
            if complete:
                self._lines_done(port, [line.rstrip(b"\r") for line in complete], now - self.started, events)
            # The boot marker and --expect may sit on an unfinished line (a prompt).
            if rest:
                self._match_marks(port, rest, now - self.started, events)
        for event in events:
            event()

    def _lines_done(self, port: str, lines: list[bytes], at: float, events: list) -> None:
        """Bookkeeping for complete lines; per-line regex work only where a
        whole-chunk search says it can matter (console output is hot)."""
        self._lines.extend((port, line) for line in lines[-self._lines.maxlen:])
        for line in reversed(lines):
            if line.strip():
                self.last_line = line.decode(errors="replace").strip()
                break
        if self._log is not None and not self._log.closed:
            self._log.write("".join(f"[{at:10.3f}] {port}: {line.decode(errors='replace')}\n"
                                    for line in lines))
        chunk = b"\n".join(lines)
        source = self.kernel_log.kind(port)
        if source is not None and _has_any(chunk, _FAILURE_WORDS):
            for line in lines:
                if source is KernelLogKind.DEDICATED or KERNEL_LINE_FORM.match(line):
                    self._failure_line(port, line, at, events)
        if source is not None and self._on_kernel_stop is not None and _KERNEL_STOP_WORD in chunk:
            for line in lines:
                if source is KernelLogKind.DEDICATED or KERNEL_LINE_FORM.match(line):
                    if match := KERNEL_STOP_LINE.search(line):
                        events.append(lambda what=match.group(1).decode(): self._on_kernel_stop(what))
        if (self.boot_time is None and _has_any(chunk, _BOOT_WORDS)) or \
                (self._expect is not None and self.expect_time is None):
            for line in lines:
                self._match_marks(port, line, at, events)

    def _failure_line(self, port: str, line: bytes, at: float, events: list) -> None:
        for level, pattern in FAILURE_PATTERNS:
            if pattern.search(line):
                failure = Failure(level, port, line.decode(errors="replace").strip(), at)
                self.failures.append(failure)
                if self._on_failure and level >= self.fail_on:
                    events.append(lambda failure=failure: self._on_failure(failure))
                break

    def _is_boot_marker(self, port: str, line: bytes) -> bool:
        if INIT_MARKER.search(line):
            return True
        source = self.kernel_log.kind(port)
        return bool(KERNEL_INIT_MARKER.search(line)) and (
            source is KernelLogKind.DEDICATED
            or (source is KernelLogKind.SHARED and KERNEL_LINE_FORM.match(line) is not None))

    def _match_marks(self, port: str, line: bytes, at: float, events: list) -> None:
        if (self.boot_time is None and _has_any(line, _BOOT_WORDS)
                and self._is_boot_marker(port, line)):
            self.boot_time = at
            if self._on_boot:
                events.append(self._on_boot)
        if (self._expect is not None and self.expect_time is None
                and (self._expect_port is None or self._expect_port == port)
                and self._expect.search(line)):
            self.expect_time = at
            self.expect_line = line.decode(errors="replace").strip()
            if self._on_expect:
                events.append(lambda: self._on_expect(self.expect_line))

    def worst_failure(self) -> Failure | None:
        """The most severe failure at or above the --fail-on level, first seen first."""
        relevant = [f for f in self.failures if f.level >= self.fail_on]
        return max(relevant, key=lambda f: (f.level, -f.at)) if relevant else None

    def last_lines(self, count: int = 20) -> list[str]:
        with self._lock:
            lines = [f"{port}: {line.decode(errors='replace')}" for port, line in self._lines]
            lines += [f"{port}: {rest.decode(errors='replace')}"
                      for port, rest in self._partial.items() if rest]
        return lines[-count:]

    def flush_log(self) -> None:
        with self._lock:
            if self._log is not None and not self._log.closed:
                at = self._clock() - self.started
                for port, rest in self._partial.items():
                    if rest:
                        self._log.write(f"[{at:10.3f}] {port}: {rest.decode(errors='replace')}\n")
                self._partial = {port: b"" for port in self._partial}
                self._log.flush()
