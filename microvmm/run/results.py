"""Machine-readable results of one `microvmm run`: JSON and JUnit XML for CI."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field


#: Bumped when a field changes meaning or goes away (added fields keep it).
#: 1: first versioned layout (command_s, per-case JUnit times, absolute log).
JSON_SCHEMA_VERSION = 1

# Exit statuses that say the run itself could not be done (setup, host, a
# signal to microvmm): JUnit <error>, not a <failure> of the guest.
_VMM_ERROR_STATUS = 125


@dataclass
class RunResult:
    kernel: str
    cmdline: str
    verdict: str  # "pass" or "fail"
    reason: str
    exit_code: int
    duration_s: float
    boot_s: float | None = None
    expect_s: float | None = None
    #: From init reached to the command's status (-- CMD runs).
    command_s: float | None = None
    command: list[str] | None = None
    command_status: int | None = None
    log: str | None = None
    failures: list[dict] = field(default_factory=list)
    last_lines: list[str] = field(default_factory=list)
    #: The VMM could not run the guest (setup error, host error, signal).
    infrastructure_error: bool = False
    microvmm_version: str = "unknown"
    schema_version: int = JSON_SCHEMA_VERSION
    #: `--ktap`: one entry per test the command's KTAP/TAP output reported
    #: (run.ktap.KtapCase.as_json: name, path, number, status, message, time_s, output).
    tests: list[dict] | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def is_infrastructure_error(exit_code: int) -> bool:
    """125 (VMM or setup error) and 128+N (microvmm killed by a signal)."""
    return exit_code == _VMM_ERROR_STATUS or exit_code > 128


def write_json(result: RunResult, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(asdict(result), handle, indent=2)
        handle.write("\n")


def junit_xml(result: RunResult) -> bytes:
    """One <testsuite> with a 'boot' case (and a 'command' case when one ran),
    then with --ktap one case per KTAP test (classname ...ktap; SKIP and TODO
    are <skipped>, failures carry the test's output).

    Each case has its own time: boot until init was reached, the command from
    then to its status. A guest's failure is a <failure> on the case it
    happened in; a run the VMM could not do (setup, host error, signal) is an
    <error>; a command case that never started (no boot) is <skipped>."""
    boot_time = result.boot_s if result.boot_s is not None else result.duration_s
    cases = [("boot", boot_time)]
    if result.command is not None:
        command_time = result.command_s if result.command_s is not None else 0.0
        cases.append(("command", command_time))
    suite = ET.Element("testsuite", name="microvmm", tests=str(len(cases)),
                       failures="0", errors="0", skipped="0", time=f"{result.duration_s:.3f}")
    failed = errors = skipped = 0
    # A failure belongs to the boot case unless the boot got through.
    blame = "command" if result.command is not None and result.boot_s is not None else "boot"
    for name, seconds in cases:
        case = ET.SubElement(suite, "testcase", classname=f"microvmm.{_kernel_name(result.kernel)}",
                             name=name, time=f"{seconds:.3f}")
        if not result.passed and name == blame:
            kind = "error" if result.infrastructure_error else "failure"
            if kind == "error":
                errors += 1
            else:
                failed += 1
            element = ET.SubElement(case, kind, message=result.reason, type=f"exit-{result.exit_code}")
            element.text = "\n".join(result.last_lines)
        elif name == "command" and result.boot_s is None:
            skipped += 1
            ET.SubElement(case, "skipped", message="the guest never reached init")
        props = ET.SubElement(case, "properties")
        for key, value in (("kernel", result.kernel), ("cmdline", result.cmdline),
                           ("exit_code", str(result.exit_code)), ("log", result.log or "")):
            ET.SubElement(props, "property", name=key, value=value)
        if name == "command" and result.command_status is not None:
            ET.SubElement(props, "property", name="command_status", value=str(result.command_status))
    for test in result.tests or ():
        case = ET.SubElement(suite, "testcase", classname=f"microvmm.{_kernel_name(result.kernel)}.ktap",
                             name=_xml_text(test["name"]), time=f"{test['time_s'] or 0.0:.3f}")
        output = _xml_text("\n".join(test.get("output") or ()))
        if test["status"] == "fail":
            failed += 1
            ET.SubElement(case, "failure", message=_xml_text(test["message"]), type="ktap").text = output
        elif test["status"] in ("skip", "todo"):
            skipped += 1
            ET.SubElement(case, "skipped", message=_xml_text(test["message"]))
        if output and test["status"] != "fail":
            ET.SubElement(case, "system-out").text = output
    suite.set("tests", str(len(cases) + len(result.tests or ())))
    suite.set("failures", str(failed))
    suite.set("errors", str(errors))
    suite.set("skipped", str(skipped))
    out = ET.SubElement(suite, "system-out")
    out.text = "\n".join(result.last_lines)
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)


def write_junit(result: RunResult, path: str) -> None:
    with open(path, "wb") as handle:
        handle.write(junit_xml(result))


#: Characters XML 1.0 cannot carry (a guest's output may hold any byte).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def _kernel_name(kernel: str) -> str:
    return kernel.rsplit("/", 1)[-1].replace(".", "_") or "kernel"
