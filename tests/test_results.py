import json
import xml.etree.ElementTree as ET

from microvmm.run.results import RunResult, write_json, write_junit


def _result(**kw):
    base = dict(kernel="/k/vmlinux", cmdline="console=ttyS0", verdict="fail", reason="guest kernel panic",
                exit_code=126, duration_s=12.5, boot_s=10.0, last_lines=["serial: Kernel panic - not syncing"])
    base.update(kw)
    return RunResult(**base)


def test_json_round_trips(tmp_path):
    path = tmp_path / "r.json"
    write_json(_result(command=["uname", "-a"], command_status=None), str(path))
    data = json.loads(path.read_text())
    assert data["verdict"] == "fail" and data["exit_code"] == 126
    assert data["command"] == ["uname", "-a"] and data["boot_s"] == 10.0


def test_junit_failure_is_on_the_command_case_after_boot(tmp_path):
    path = tmp_path / "r.xml"
    write_junit(_result(command=["false"], command_status=1, exit_code=1, reason="command exited 1"), str(path))
    suite = ET.parse(path).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["boot"].find("failure") is None
    failure = cases["command"].find("failure")
    assert failure.get("message") == "command exited 1" and "Kernel panic" in failure.text


def test_junit_boot_failure_and_pass(tmp_path):
    path = tmp_path / "r.xml"
    write_junit(_result(boot_s=None), str(path))
    suite = ET.parse(path).getroot()
    assert [c.get("name") for c in suite.iter("testcase")] == ["boot"]
    assert suite.find("testcase/failure").get("type") == "exit-126"
    write_junit(_result(verdict="pass", exit_code=0, reason="ok"), str(path))
    suite = ET.parse(path).getroot()
    assert suite.get("failures") == "0" and suite.find("testcase/failure") is None


def test_json_has_schema_and_microvmm_version(tmp_path):
    from microvmm.run.results import JSON_SCHEMA_VERSION
    path = tmp_path / "r.json"
    write_json(_result(microvmm_version="0.1.0"), str(path))
    data = json.loads(path.read_text())
    assert data["schema_version"] == JSON_SCHEMA_VERSION == 1
    assert data["microvmm_version"] == "0.1.0"


def test_junit_setup_error_is_an_error_not_a_failure(tmp_path):
    path = tmp_path / "r.xml"
    write_junit(_result(boot_s=None, exit_code=125, reason="error: cannot use /dev/kvm",
                        infrastructure_error=True, command=["true"]), str(path))
    suite = ET.parse(path).getroot()
    assert (suite.get("errors"), suite.get("failures"), suite.get("skipped")) == ("1", "0", "1")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["boot"].find("failure") is None
    assert cases["boot"].find("error").get("message") == "error: cannot use /dev/kvm"
    assert cases["command"].find("skipped") is not None  # it never started


def test_infrastructure_statuses():
    from microvmm.run.results import is_infrastructure_error
    assert is_infrastructure_error(125) and is_infrastructure_error(143)
    for guest_status in (0, 1, 122, 123, 124, 126, 127):
        assert not is_infrastructure_error(guest_status)


def test_junit_cases_have_their_own_times(tmp_path):
    """boot: until init; command: from init to its status; the suite: the whole run."""
    path = tmp_path / "r.xml"
    write_junit(_result(verdict="pass", exit_code=0, duration_s=31.25, boot_s=24.5, command_s=6.125,
                        command=["true"], command_status=0), str(path))
    suite = ET.parse(path).getroot()
    times = {case.get("name"): case.get("time") for case in suite.iter("testcase")}
    assert times == {"boot": "24.500", "command": "6.125"}
    assert suite.get("time") == "31.250"
