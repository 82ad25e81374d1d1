import io
import re

from microvmm.run.monitor import KERNEL_LOG_PORT, Failure, FailureLevel, KernelLogSources, RunMonitor

# The default guest's arrangement: the kernel's log on a port of its own.
KMSG = KernelLogSources(dedicated=KERNEL_LOG_PORT)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_are_split_per_port_and_logged_with_time_and_port():
    clock, log = Clock(), io.StringIO()
    monitor = RunMonitor(log=log, clock=clock)
    monitor.feed("serial", b"hel")
    monitor.feed("con", b"port line\r\n")
    clock.now = 101.5
    monitor.feed("serial", b"lo\r\nworld")
    assert log.getvalue().splitlines() == ["[     0.000] con: port line", "[     1.500] serial: hello"]
    assert monitor.last_lines() == ["con: port line", "serial: hello", "serial: world"]
    monitor.flush_log()
    assert log.getvalue().splitlines()[-1] == "[     1.500] serial: world"


def test_unterminated_output_stays_bounded():
    monitor = RunMonitor()
    for _ in range(100):
        monitor.feed("serial", b"x" * 1000)
    assert all(len(line) < 6000 for line in monitor.last_lines(100))


def test_failure_levels_and_threshold():
    seen: list[Failure] = []
    monitor = RunMonitor(fail_on=FailureLevel.OOPS, on_failure=seen.append,
                         kernel_log=KernelLogSources(shared=frozenset({"serial", "hvc"})))
    monitor.feed("serial", b"[    1.000000] WARNING: CPU: 0 PID: 1 at foo.c:12 bar+0x1/0x2\n")
    assert seen == [] and monitor.failures[0].level is FailureLevel.WARN
    monitor.feed("serial", b"[    2.000000] BUG: kernel NULL pointer dereference, address: 0\n")
    monitor.feed("hvc", b"[    3.000000] Kernel panic - not syncing: sysrq triggered crash\n")
    assert [f.level for f in seen] == [FailureLevel.OOPS, FailureLevel.PANIC]
    assert seen[1].port == "hvc" and "sysrq triggered crash" in seen[1].line
    assert monitor.worst_failure().level is FailureLevel.PANIC


def test_warn_threshold_and_sanitizers():
    seen = []
    monitor = RunMonitor(fail_on=FailureLevel.WARN, on_failure=seen.append, kernel_log=KMSG)
    monitor.feed(KERNEL_LOG_PORT,
                 b"WARNING: suspicious RCU usage\nBUG: KASAN: use-after-free in x\nUBSAN: shift-out-of-bounds\n")
    assert [f.level for f in seen] == [FailureLevel.WARN, FailureLevel.OOPS, FailureLevel.OOPS]


def test_boot_marker_and_expect_on_unfinished_line():
    events = []
    clock = Clock()
    monitor = RunMonitor(expect=re.compile(rb"login: $"), expect_port="con", clock=clock,
                         on_boot=lambda: events.append("boot"), on_expect=lambda l: events.append(l))
    clock.now = 105.0
    monitor.feed("serial", b"[    3.100000] Run /init as init process\n")
    monitor.feed("serial", b"login: ")  # wrong port: no match
    clock.now = 107.0
    monitor.feed("con", b"login: ")
    assert events == ["boot", "login:"]
    assert (monitor.boot_time, monitor.expect_time) == (5.0, 7.0)


def test_last_output_tracks_activity():
    clock = Clock()
    monitor = RunMonitor(clock=clock)
    clock.now = 130.0
    monitor.feed("serial", b"x")
    assert monitor.last_output == 130.0


def test_every_failure_pattern_passes_the_keyword_prefilter():
    # feed() skips the regexes unless a chunk holds one of these words: a
    # pattern branch without a word would never fire.
    from microvmm.run.monitor import _FAILURE_WORDS, FAILURE_PATTERNS
    samples = [b"Kernel panic - not syncing: x", b"Oops: 0000 [#1]", b"Oops - bad mode",
               b"BUG: kernel NULL pointer dereference", b"general protection fault, probably",
               b"BUG: KASAN: use-after-free", b"BUG: KCSAN: data-race", b"BUG: KFENCE: out-of-bounds",
               b"UBSAN: shift-out-of-bounds", b"Unable to handle kernel paging request",
               b"WARNING: CPU: 0 PID: 1"]
    branches = sum(len(p.pattern.split(b"|")) for _, p in FAILURE_PATTERNS)
    assert len(samples) >= branches
    for line in samples:
        assert any(p.search(line) for _, p in FAILURE_PATTERNS), line
        assert any(word in line for word in _FAILURE_WORDS), line
    seen = []
    monitor = RunMonitor(fail_on=FailureLevel.WARN, on_failure=seen.append, kernel_log=KMSG)
    monitor.feed(KERNEL_LOG_PORT, b"\n".join(samples) + b"\n")
    assert len(seen) == len(samples)


REPORTS = (b"BUG: only text\n", b"Kernel panic - not syncing: fake\n", b"WARNING: fake\n",
           b"Oops: 0000 [#1]\n")


def test_reports_count_only_on_the_kernel_log_port():
    seen = []
    monitor = RunMonitor(fail_on=FailureLevel.WARN, on_failure=seen.append, kernel_log=KMSG)
    # a program's output, a typed line echoed by the shell, a data port, the
    # shell's serial line: never the kernel's, whatever they say (and in
    # whatever form: even with the kernel's timestamp)
    for port in ("microvmm.stdout", "microvmm.stderr", "con", "serial", "data"):
        for report in REPORTS:
            monitor.feed(port, report)
            monitor.feed(port, b"[   12.345678] " + report)
    assert seen == [] and monitor.failures == []
    monitor.feed(KERNEL_LOG_PORT, b"[   57.460000] Kernel panic - not syncing: sysrq triggered crash\r\n")
    assert [(f.level, f.port) for f in seen] == [(FailureLevel.PANIC, KERNEL_LOG_PORT)]


def test_on_a_shared_console_only_kernel_form_lines_count():
    # a console the kernel prints on next to a shell (a user's own console=)
    seen = []
    monitor = RunMonitor(fail_on=FailureLevel.WARN, on_failure=seen.append,
                         kernel_log=KernelLogSources(shared=frozenset({"serial"})))
    monitor.feed("serial", b"microvmm# echo 'BUG: only text'\r\nBUG: only text\r\n")
    monitor.feed("serial", b"  [ 1.0] BUG: indented is not the kernel's form\n")
    monitor.feed("con", b"[    1.000000] BUG: not a kernel-log source\n")
    assert seen == []
    monitor.feed("serial", b"[    4.567890] BUG: kernel NULL pointer dereference, address: 0\n")
    monitor.feed("serial", b"[   88.000001][    T1] WARNING: CPU: 0 PID: 1 at x.c:1\n")  # PRINTK_CALLER
    assert [f.level for f in seen] == [FailureLevel.OOPS, FailureLevel.WARN]


def test_kernel_init_line_is_a_boot_marker_only_from_the_kernel():
    booted = []
    monitor = RunMonitor(kernel_log=KMSG, on_boot=lambda: booted.append(1))
    monitor.feed("microvmm.stdout", b"Run /init as init process\n")
    monitor.feed("serial", b"[    3.100000] Run /init as init process\n")
    assert monitor.boot_time is None
    monitor.feed(KERNEL_LOG_PORT, b"[    3.100000] Run /init as init process\n")
    assert booted == [1] and monitor.boot_time is not None
    # init's own marker may come on any terminal (the shell's)
    other = RunMonitor(kernel_log=KMSG)
    other.feed("con", b"microvmm: init reached\r\n")
    assert other.boot_time is not None

