"""Every command in the README's "For kernel developers" and "For CI" sections,
run as written (`microvmm` -> `python -m microvmm`), must end with the exit
status its `# exit: N` comment promises and do what the text says.

The examples boot real guests (about a minute each on an emulating host), so
they all run once, two at a time, in a module fixture; the tests then check
each result.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e_support import GUEST_TEST_TIMEOUT, GUESTS_AT_ONCE, IMAGES, REPO, require_images, require_kvm

# A guest boot and its commands; nothing may hang the run.
pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

EXAMPLE = re.compile(r"^(microvmm .*?)\s+# exit: (\d+)(.*)$")
SECTIONS = ("## For kernel developers", "## For CI")


@dataclass
class Example:
    command: str
    exit_code: int
    note: str


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    seconds: float


def readme_examples() -> list[Example]:
    text = (REPO / "README.md").read_text()
    examples = []
    for heading in SECTIONS:
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for line in section.splitlines():
            match = EXAMPLE.match(line.strip())
            if match:
                examples.append(Example(match.group(1), int(match.group(2)), match.group(3).strip()))
    return examples


def test_readme_has_the_examples():
    commands = [e.command for e in readme_examples()]
    assert len(commands) >= 8
    assert any("-- " in c for c in commands) and any("--junit" in c for c in commands)


def _run(example: Example, workdir: Path) -> Outcome:
    workdir.mkdir()
    (workdir / "images").symlink_to(IMAGES)
    argv = shlex.split(example.command)
    argv = [sys.executable, "-m", "microvmm", *argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if "poweroff` on the pty" in example.note:
        stderr = _drive_pty(proc)
        stdout, rest = proc.communicate(timeout=120)
        stderr += rest
    else:
        stdout, stderr = proc.communicate(timeout=900)
    return Outcome(proc.returncode, stdout, stderr, workdir, time.monotonic() - started)


def _drive_pty(proc: subprocess.Popen) -> str:
    """Do what the example tells a user: open the announced pty, power off."""
    seen = []
    line = ""
    while "redirected to" not in line:
        line = proc.stderr.readline()
        assert line, "microvmm ended before announcing its pty:\n" + "".join(seen)
        seen.append(line)
    assert re.fullmatch(r"virt-console backend redirected to /dev/pts/\d+\n", line), line
    fd = os.open(line.split()[-1], os.O_RDWR | os.O_NOCTTY)
    try:
        output = b""
        deadline = time.monotonic() + 600
        while b"microvmm# " not in output:
            assert time.monotonic() < deadline, output[-2000:]
            chunk = os.read(fd, 4096)
            assert chunk, output[-2000:]
            output += chunk
        os.write(fd, b"poweroff\n")
    finally:
        # Keep draining on a thread would be nicer; closing is fine: the
        # guest's writes wait for a reader (PORT_OPEN), poweroff needs none.
        os.close(fd)
    return "".join(seen)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    require_kvm()
    require_images()
    base = tmp_path_factory.mktemp("readme")
    examples = readme_examples()
    lock = threading.Lock()
    results: dict[str, Outcome] = {}

    def one(index_example):
        index, example = index_example
        outcome = _run(example, base / f"ex{index}")
        with lock:
            results[example.command] = outcome

    # Two guests at a time (where allowed): each is one vCPU thread emulated by the host.
    with ThreadPoolExecutor(max_workers=min(GUESTS_AT_ONCE, 2)) as pool:
        list(pool.map(one, enumerate(examples)))
    return results


def _find(outcomes: dict[str, Outcome], fragment: str) -> Outcome:
    matches = [o for cmd, o in outcomes.items() if fragment in cmd]
    assert len(matches) == 1, (fragment, list(outcomes))
    return matches[0]


@pytest.mark.parametrize("example", readme_examples(), ids=lambda e: e.command[:60])
def test_example_exit_status(outcomes, example):
    outcome = outcomes[example.command]
    assert outcome.returncode == example.exit_code, (
        f"{example.command}\nexit {outcome.returncode}\nstdout:\n{outcome.stdout[-2000:]}\n"
        f"stderr:\n{outcome.stderr[-3000:]}")


def test_command_output_and_status(outcomes):
    outcome = _find(outcomes, "exit 3")
    # the ports of a command run, named in the guest, on the host's stdout
    assert outcome.stdout.split() == ["microvmm.stdout", "microvmm.stderr", "microvmm.status"] or \
        set(outcome.stdout.split()) >= {"microvmm.stdout", "microvmm.stderr", "microvmm.status"}
    assert "command exited with status 3" in outcome.stderr


def test_ci_smoke_results_files(outcomes):
    outcome = _find(outcomes, "--junit boot.xml")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*\n", outcome.stdout), outcome.stdout
    suite = ET.parse(outcome.cwd / "boot.xml").getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "0"
    assert [c.get("name") for c in suite.iter("testcase")] == ["boot", "command"]
    result = json.loads((outcome.cwd / "boot.json").read_text())
    assert result["verdict"] == "pass" and result["command"] == ["uname", "-r"]
    assert result["command_status"] == 0 and result["boot_s"] > 0
    assert result["schema_version"] == 1 and result["microvmm_version"]
    assert result["log"] == str(outcome.cwd / "boot.log")  # absolute, for CI to collect
    assert not result["infrastructure_error"]
    # each case its own time: boot until init, the command from init to its status
    times = {c.get("name"): float(c.get("time")) for c in suite.iter("testcase")}
    assert times["boot"] == round(result["boot_s"], 3) and times["command"] == round(result["command_s"], 3)
    assert 0 < times["command"] < result["duration_s"] - times["boot"] + 0.01
    log = (outcome.cwd / "boot.log").read_text()
    # the kernel's log, tagged as such (its own port, the early part read from guest RAM)
    assert re.search(r"^\[\s*\d+\.\d{3}\] kmsg: \[\s*\d+\.\d{6}\] Linux version", log, re.M)
    assert re.search(r"^\[\s*\d+\.\d{3}\] kmsg: .*Run /init as init process", log, re.M)


def test_panic_is_named(outcomes):
    outcome = _find(outcomes, "sysrq-trigger")
    assert "guest kernel panic" in outcome.stderr
    assert "Kernel panic - not syncing: sysrq triggered crash" in outcome.stderr


def test_timeout_shows_where_the_guest_was(outcomes):
    outcome = _find(outcomes, "--timeout 120")
    assert "timeout: --timeout 120 s expired" in outcome.stderr
    assert re.search(r"vCPU 0: RIP 0x[0-9a-f]+ <\w+", outcome.stderr)
    assert "last console lines:" in outcome.stderr


def test_idle_timeout(outcomes):
    outcome = _find(outcomes, "--idle-timeout 30")
    assert "--idle-timeout: no console output for 30 s" in outcome.stderr


def test_profile_example_writes_a_report(outcomes):
    outcome = _find(outcomes, "--profile boot.prof")
    report = (outcome.cwd / "boot.prof").read_text()
    assert "top functions:" in report and "phases" in report
    assert (outcome.cwd / "boot.prof.folded").stat().st_size > 0
