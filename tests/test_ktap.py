"""`run --ktap`: the KTAP/TAP parser (nesting by indentation and by
kselftest's '# ' prefix, SKIP, TODO, plans, Bail out!, output cut short,
garbage lines), the collector fed in arbitrary chunks through the run
monitor, the verdict, and the JUnit file read back with junitparser."""

from __future__ import annotations

from dataclasses import dataclass

import junitparser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microvmm.run.results import RunResult, write_json, write_junit
from microvmm.run.ktap import CaseStatus, KtapCollector, judge_outcome, parse_ktap
from microvmm.run.monitor import RunMonitor


def summary(text: str, **kwargs) -> list[tuple[str, str]]:
    return [(case.name, case.status.value) for case in parse_ktap(text, **kwargs).cases]


# KUnit's form: KTAP version 1, suites as indented subtests named by '# Subtest:'.
KUNIT = """\
KTAP version 1
1..2
    KTAP version 1
    # Subtest: example
    # module: kunit_example_test
    1..4
    ok 1 example_simple_test
    # example_fail_test: EXPECTATION FAILED at lib/kunit/kunit-example-test.c:42
    # example_fail_test: Expected 1 == 2
    not ok 2 example_fail_test
    ok 3 example_skip_test # SKIP this test should be skipped
        KTAP version 1
        # Subtest: example_params_test
        ok 1 example value 3
        ok 2 example value 2 # SKIP unsupported
    ok 4 example_params_test
not ok 1 example
    KTAP version 1
    # Subtest: other
    1..1
    ok 1 other_test
ok 2 other
"""


def test_kunit_suites_and_parameterized_tests_nest():
    assert summary(KUNIT) == [
        ("example / example_simple_test", "pass"),
        ("example / example_fail_test", "fail"),
        ("example / example_skip_test", "skip"),
        ("example / example_params_test / example value 3", "pass"),
        ("example / example_params_test / example value 2", "skip"),
        ("example / example_params_test", "pass"),
        ("example", "fail"),
        ("other / other_test", "pass"),
        ("other", "pass"),
    ]
    cases = {case.name: case for case in parse_ktap(KUNIT).cases}
    failed = cases["example / example_fail_test"]
    assert failed.number == 2 and failed.output == [
        "    # example_fail_test: EXPECTATION FAILED at lib/kunit/kunit-example-test.c:42",
        "    # example_fail_test: Expected 1 == 2"]
    assert cases["example / example_skip_test"].message == "this test should be skipped"


# kselftest's runner: each program's own TAP prefixed with '# ', its result at the outer level.
KSELFTEST = """\
TAP version 13
1..3
# selftests: timers: posix_timers
# TAP version 13
# 1..2
# ok 1 Check itimer virtual
# not ok 2 Check timer_create() per process signal # TODO flaky on VMs
# # Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0
ok 1 selftests: timers: posix_timers
# selftests: timers: nanosleep
# TAP version 13
# 1..1
# ok 1 nanosleep CLOCK_REALTIME # SKIP not supported
ok 2 selftests: timers: nanosleep # SKIP
# selftests: timers: bad
# TAP version 13
# 1..3
# ok 1 open
# Bail out! cannot open /dev/rtc0
not ok 3 selftests: timers: bad # exit=1
"""


def test_kselftest_hash_prefixed_programs_nest_under_their_runner_results():
    assert summary(KSELFTEST) == [
        ("selftests: timers: posix_timers / Check itimer virtual", "pass"),
        ("selftests: timers: posix_timers / Check timer_create() per process signal", "todo"),
        ("selftests: timers: posix_timers", "pass"),
        ("selftests: timers: nanosleep / nanosleep CLOCK_REALTIME", "skip"),
        ("selftests: timers: nanosleep", "skip"),
        ("selftests: timers: bad / open", "pass"),
        ("selftests: timers: bad / Bail out!", "fail"),  # no failure for its 2 missing tests
        ("selftests: timers: bad", "fail"),
    ]
    cases = parse_ktap(KSELFTEST).cases
    assert cases[1].message == "TODO: flaky on VMs (failed, as expected)"
    assert cases[6].message == "Bail out! cannot open /dev/rtc0"
    # '# ' lines without a TAP version header before them are diagnostics, not a nested test.
    assert summary("1..1\n# ok 1 said in a comment\nok 1 real\n") == [("real", "pass")]


def test_a_bail_out_ends_the_plan_without_a_missing_tests_failure():
    assert summary("TAP version 13\n1..5\nok 1 a\nBail out! no network\n") == [
        ("a", "pass"), ("Bail out!", "fail")]


def test_output_cut_mid_subtest_fails_the_running_test_and_the_rest_of_the_plan():
    text = "KTAP version 1\n1..3\nok 1 first\n    # Subtest: second\n    1..3\n    ok 1 s1\n    ok 2 s2\n"
    tail = ["kmsg: Kernel panic - not syncing: Fatal exception", "kmsg: ---[ end Kernel panic ]---"]
    report = parse_ktap(text, tail=tail, why="guest kernel panic at 3.0 s")
    assert [(c.name, c.status.value) for c in report.cases] == [
        ("first", "pass"),
        ("second / s1", "pass"), ("second / s2", "pass"),
        ("second / test 3 (no result)", "fail"),
        ("second", "fail"),
        ("test 3 (no result)", "fail"),
    ]
    second = report.cases[4]
    assert second.message == "no result: guest kernel panic at 3.0 s while it ran"
    assert second.output[-2:] == tail  # the console's last lines: why it never finished
    assert report.cases[5].message == "planned 1..3, 2 reported: guest kernel panic at 3.0 s"


def test_a_flat_plan_cut_short_names_the_missing_tests():
    assert summary("1..4\nok 1\nok 2 b\n") == [("test 1", "pass"), ("b", "pass"), ("tests 3-4 (no result)", "fail")]


def test_more_results_than_planned_is_a_failure():
    assert summary("1..1\nok 1 a\nok 2 b\n")[-1] == ("plan", "fail")


def test_no_tap_at_all_is_one_failure():
    report = parse_ktap("hello\nworld\n", tail=["stdout: hello"], why="command exited with status 0")
    assert [(c.name, c.status, c.message) for c in report.cases] == [
        ("ktap", CaseStatus.FAIL, "no KTAP/TAP output from the command (command exited with status 0)")]
    assert not report.found


def test_garbage_and_kernel_lines_never_close_a_subtest_or_count():
    text = "\n".join([
        "KTAP version 1", "1..1",
        "    # Subtest: suite",
        "    1..2",
        "[    5.123456] random: crng init done",          # the kernel's, at column 0
        "\x1b[0mgarbage not ok here",                    # not a TAP line
        "okay this is prose",
        "    ok 1 first",
        "[    5.200000]     ok 2 second",                 # KUnit read from dmesg: timestamp dropped
        "ok 1 suite",
    ])
    assert summary(text) == [("suite / first", "pass"), ("suite / second", "pass"), ("suite", "pass")]
    cases = parse_ktap(text).cases
    assert cases[0].output == ["random: crng init done", "\x1b[0mgarbage not ok here", "okay this is prose"]


def test_subtest_name_comes_from_the_header_when_the_result_has_none():
    assert summary("1..1\n    # Subtest: named\n    1..1\n    ok 1 x\nok 1\n") == [
        ("named / x", "pass"), ("named", "pass")]


def test_directives_and_escapes():
    report = parse_ktap("1..4\nnot ok 1 a\\#b # skip not here\nok 2 - dash\nok 3 c # XFAIL known\n"
                        "not ok 4 d # TODO later\n")
    assert [(c.name, c.status, c.message) for c in report.cases] == [
        ("a#b", CaseStatus.SKIP, "not here"),
        ("dash", CaseStatus.PASS, ""),
        ("c", CaseStatus.PASS, "XFAIL: known"),
        ("d", CaseStatus.TODO, "TODO: later (failed, as expected)"),
    ]


@pytest.mark.parametrize("chunk", [1, 3, 17, 4096])
def test_the_collector_gives_the_same_cases_for_any_chunking(chunk):
    data = KUNIT.encode()
    collector = KtapCollector()
    for start in range(0, len(data), chunk):
        collector.feed(data[start:start + chunk], at=start / 1000)
    assert [(c.name, c.status) for c in collector.finish().cases] == \
        [(c.name, c.status) for c in parse_ktap(KUNIT).cases]


def test_an_unfinished_last_line_is_read_at_the_end():
    collector = KtapCollector()
    collector.feed(b"1..1\nok 1 last")
    assert [(c.name, c.status.value) for c in collector.finish().cases] == [("last", "pass")]


def test_the_monitor_feeds_only_the_tapped_port_with_times():
    times = iter([10.0, 11.0, 12.5, 13.0])
    collector = KtapCollector()
    monitor = RunMonitor(clock=lambda: next(times), taps={"microvmm.stdout": collector.feed})
    monitor.feed("microvmm.stderr", b"1..9\nnot ok 1 from stderr\n")
    monitor.feed("microvmm.stdout", b"1..2\nok 1 a\n")
    monitor.feed("microvmm.stdout", b"ok 2 b\n")
    cases = collector.finish().cases
    # seconds since the monitor started (10.0): 'a' at 12.5, 'b' at 13.0
    assert [(c.name, c.status.value, c.time_s) for c in cases] == [("a", "pass", 2.5), ("b", "pass", 0.5)]


_PIECES = ["ok", "not ok", " 1", " 7 name", "1..", "3", "#", " ", "    ", "# ", "Bail out!", "KTAP version 1",
           "TAP version 13", "# Subtest: s", "# Subtest:", "\\#", " # SKIP", " # TODO", "\n", "\x00", "9" * 30, "\t",
           "[    1.000000] ", "\r", "\xff"]


@settings(max_examples=500, derandomize=True, deadline=None, database=None)
@given(pieces=st.lists(st.sampled_from(_PIECES), max_size=120), chunk=st.integers(1, 64))
def test_hostile_input_never_raises(pieces, chunk):
    """Any mix of TAP fragments and garbage, in any chunking: cases come out,
    never an exception (the collector runs on the VMM's I/O thread)."""
    data = "".join(pieces).encode("utf-8", "surrogateescape")
    collector = KtapCollector()
    for start in range(0, len(data), chunk):
        collector.feed(data[start:start + chunk], at=float(start))
    report = collector.finish(["tail"], "why")
    assert all(case.path and all(isinstance(p, str) and p for p in case.path) for case in report.cases)
    assert all(isinstance(case.status, CaseStatus) for case in report.cases)


@dataclass
class _Outcome:  # the fields of vmm.VmOutcome that judge_outcome reads and replaces
    exit_code: int
    summary: str
    report: str = ""


def _judged(text: str, exit_code: int):
    collector = KtapCollector()
    collector.feed(text.encode())
    return judge_outcome(collector, _Outcome(exit_code, f"command exited with status {exit_code}"), ["tail"])


def test_a_command_exiting_0_with_a_failed_test_fails_the_run_with_1():
    report, outcome = _judged("1..2\nok 1 a\nnot ok 2 b\n", 0)
    assert outcome.exit_code == 1 and outcome.summary.endswith("but 1 KTAP test(s) failed")
    assert "KTAP: 2 tests: 1 passed, 1 failed, 0 skipped, 0 todo (failed: b)" in outcome.report
    assert report.command_exit == 0


def test_passing_skipped_and_todo_tests_leave_the_status_alone():
    _, outcome = _judged("1..3\nok 1 a\nok 2 b # SKIP\nnot ok 3 c # TODO\n", 0)
    assert outcome.exit_code == 0
    _, outcome = _judged("1..1\nnot ok 1 a\n", 5)  # the command's own failure status stays
    assert outcome.exit_code == 5


def test_junit_has_one_case_per_test_read_by_junitparser(tmp_path):
    report = parse_ktap(KSELFTEST)
    result = RunResult(kernel="/k/vmlinux", cmdline="x", verdict="fail", reason="r", exit_code=1,
                       duration_s=3.0, boot_s=1.0, command_s=2.0, command=["run_kselftest.sh"],
                       command_status=0, tests=[case.as_json() for case in report.cases])
    write_junit(result, str(tmp_path / "r.xml"))
    write_json(result, str(tmp_path / "r.json"))
    (suite,) = junitparser.JUnitXml.fromfile(str(tmp_path / "r.xml"))  # our root <testsuite>, wrapped
    cases = {case.name: case for case in suite}
    assert set(cases) == {"boot", "command"} | {c.name for c in report.cases}
    assert suite.tests == len(cases)
    ktap = {name: case for name, case in cases.items() if case.classname == "microvmm.vmlinux.ktap"}
    assert len(ktap) == len(report.cases)
    assert ktap["selftests: timers: posix_timers"].is_passed
    assert ktap["selftests: timers: nanosleep"].is_skipped
    bad = ktap["selftests: timers: bad"]
    assert not bad.is_passed and isinstance(bad.result[0], junitparser.Failure)
    import json
    listed = json.loads((tmp_path / "r.json").read_text())["tests"]
    assert [(t["name"], t["status"]) for t in listed] == [(c.name, c.status.value) for c in report.cases]


def test_junit_survives_control_characters_in_names_and_output(tmp_path):
    report = parse_ktap("1..1\n# \x1b[31mred\x07\nnot ok 1 bad\x01name\n")
    result = RunResult(kernel="k", cmdline="", verdict="fail", reason="r", exit_code=1, duration_s=1.0,
                       command=["x"], tests=[c.as_json() for c in report.cases])
    write_junit(result, str(tmp_path / "r.xml"))
    (suite,) = junitparser.JUnitXml.fromfile(str(tmp_path / "r.xml"))
    (case,) = [c for c in suite if c.name.startswith("bad")]
    assert case.name == "bad\ufffdname" and "red" in case.result[0].text


def test_ktap_without_a_command_is_refused(tmp_path, monkeypatch, capsys):
    from microvmm import cli
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"\x7fELF")
    initrd.write_bytes(b"070701")
    monkeypatch.setenv("MICROVMM_IMAGES", str(tmp_path))
    assert cli.main(["run", "--kernel", str(kernel), "--initrd", str(initrd), "--ktap"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "microvmm: error: --ktap reads the output of a guest command: add '-- CMD [ARGS...]'\n"
