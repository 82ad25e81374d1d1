"""Machine-readable results of one `microvmm run`: JSON and JUnit XML for CI."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field


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
    command: list[str] | None = None
    command_status: int | None = None
    log: str | None = None
    failures: list[dict] = field(default_factory=list)
    last_lines: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def write_json(result: RunResult, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(asdict(result), handle, indent=2)
        handle.write("\n")


def junit_xml(result: RunResult) -> bytes:
    """One <testsuite> with a 'boot' case (and a 'command' case when one ran)."""
    cases = [("boot", result.boot_s if result.boot_s is not None else result.duration_s)]
    if result.command is not None:
        cases.append(("command", result.duration_s))
    suite = ET.Element("testsuite", name="microvmm", tests=str(len(cases)),
                       failures="0", errors="0", time=f"{result.duration_s:.3f}")
    failed = 0
    for name, seconds in cases:
        case = ET.SubElement(suite, "testcase", classname=f"microvmm.{_kernel_name(result.kernel)}",
                             name=name, time=f"{seconds:.3f}")
        # A failure belongs to the boot case unless the boot got through.
        blame = "command" if result.command is not None and result.boot_s is not None else "boot"
        if not result.passed and name == blame:
            failed += 1
            failure = ET.SubElement(case, "failure", message=result.reason,
                                    type=f"exit-{result.exit_code}")
            failure.text = "\n".join(result.last_lines)
        props = ET.SubElement(case, "properties")
        for key, value in (("kernel", result.kernel), ("cmdline", result.cmdline),
                           ("exit_code", str(result.exit_code)), ("log", result.log or "")):
            ET.SubElement(props, "property", name=key, value=value)
        if name == "command" and result.command_status is not None:
            ET.SubElement(props, "property", name="command_status", value=str(result.command_status))
    suite.set("failures", str(failed))
    out = ET.SubElement(suite, "system-out")
    out.text = "\n".join(result.last_lines)
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)


def write_junit(result: RunResult, path: str) -> None:
    with open(path, "wb") as handle:
        handle.write(junit_xml(result))


def _kernel_name(kernel: str) -> str:
    return kernel.rsplit("/", 1)[-1].replace(".", "_") or "kernel"
