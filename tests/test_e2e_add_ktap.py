"""`--add` and `--ktap` end to end with the default guest: the README's two
examples run as written (bash, `microvmm` = this checkout's `python -m
microvmm`), one boot each, two at a time where allowed.

- `--add`: a static binary compiled here with `cc -static` runs in the guest
  via `-- CMD` and its exit status is the run's; a directory tree arrives
  with its modes and its symlink.
- `--add` with `--initrd none`: a static /init of our own is the whole user space.
- `--ktap`: a kselftest-style script added with `--add` gives a JUnit file
  with one case per test, read back with junitparser, and the JSON lists them;
  a kernel panic in the middle of a test fails it with the console's tail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import junitparser
import pytest

from tests.e2e_support import BOOT_TIMEOUT, GUEST_TEST_TIMEOUT, GUESTS_AT_ONCE, IMAGES, REPO, require_images, \
    require_kvm

pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

ADD_HEADING = "### Your files in the guest: `--add`"
KTAP_HEADING = "### kselftest and KUnit results: `--ktap`"


def readme_block(heading: str, index: int = 0) -> str:
    """The `index`th ```sh block of the README section under `heading`."""
    section = (REPO / "README.md").read_text().split(heading, 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.M | re.S)
    assert len(blocks) > index, f"no sh block {index} under {heading}"
    return blocks[index]


# KTAP output cut by a kernel panic in the middle of test 2.
CRASH_MID_TEST = ("microvmm run --ktap --junit crash.xml --json crash.json -- "
                  "sh -c 'echo 1..3; echo ok 1 before; echo \"# test 2 starts\"; echo c > /proc/sysrq-trigger'\n")


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path


def run_block(script: str, workdir: Path) -> Ran:
    """Run a README block in `workdir` (with images/ there, as in a checkout)."""
    workdir.mkdir()
    (workdir / "images").symlink_to(IMAGES)
    prelude = f'microvmm() {{ "{sys.executable}" -m microvmm "$@"; }}\n'
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(["bash", "-c", prelude + script], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=BOOT_TIMEOUT + 120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the shell and the microvmm it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"README block did not finish in {BOOT_TIMEOUT + 120} s:\n{stderr[-3000:]}")
    return Ran(proc.returncode, stdout, stderr, workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Ran]:
    require_kvm()
    require_images()
    if shutil.which("cc") is None:
        pytest.fail("no C compiler: scripts/setup-host installs gcc and libc6-dev (cc -static needs libc.a)")
    base = tmp_path_factory.mktemp("addktap")
    blocks = {"add": readme_block(ADD_HEADING), "ktap": readme_block(KTAP_HEADING),
              "init": readme_block(ADD_HEADING, 1), "crash": CRASH_MID_TEST}
    with ThreadPoolExecutor(max_workers=min(GUESTS_AT_ONCE, 2)) as pool:
        futures = {name: pool.submit(run_block, block, base / name) for name, block in blocks.items()}
        return {name: future.result() for name, future in futures.items()}


def test_a_static_binary_added_runs_with_its_exit_status(runs):
    ran = runs["add"]
    assert ran.returncode == 42, ran.stderr[-3000:]
    assert "built on the host, run in the guest\n" in ran.stdout
    assert "command exited with status 42" in ran.stderr


def test_an_added_tree_keeps_its_modes_and_symlinks(runs):
    ran = runs["add"]
    assert "check: one\n" in ran.stdout  # executable script, run through the symlink
    assert re.search(r"^lrwxrwxrwx .* /opt/suite/check -> bin/check$", ran.stdout, re.M), ran.stdout


def test_an_added_static_init_boots_without_an_initramfs(runs):
    """--initrd none: the archive is the initrd, unpacked over the kernel's built-in one."""
    ran = runs["init"]
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "my own init, pid 1\n" in ran.stderr  # on the kernel's console: its log, on stderr
    assert "the guest requested a reset" in ran.stderr


def test_ktap_results_one_junit_case_per_test(runs):
    ran = runs["ktap"]
    assert ran.returncode == 1, ran.stderr[-3000:]  # exited 0, but a test failed
    assert "command exited with status 0" in ran.stderr and "but 1 KTAP test(s) failed" in ran.stderr
    assert "KTAP: 5 tests: 2 passed, 1 failed, 1 skipped, 1 todo" in ran.stderr
    (suite,) = junitparser.JUnitXml.fromfile(str(ran.cwd / "ktap.xml"))
    cases = {case.name: case for case in suite}
    files = "selftests: demo: files"
    assert list(cases) == ["boot", "command", f"{files} / proc is mounted", f"{files} / nested kvm", files,
                           "selftests: demo: fails_on_purpose", "selftests: demo: later"]
    assert cases[f"{files} / proc is mounted"].is_passed and cases[files].is_passed
    assert cases[f"{files} / nested kvm"].is_skipped  # the default guest has no /dev/kvm
    assert cases["selftests: demo: later"].is_skipped
    (failure,) = cases["selftests: demo: fails_on_purpose"].result
    assert isinstance(failure, junitparser.Failure)
    assert suite.tests == 7 and suite.failures == 2  # the test, and the command case (status 1)
    result = json.loads((ran.cwd / "ktap.json").read_text())
    assert result["command_status"] == 0 and result["exit_code"] == 1 and result["verdict"] == "fail"
    assert [(t["name"], t["status"]) for t in result["tests"]] == [
        (f"{files} / proc is mounted", "pass"), (f"{files} / nested kvm", "skip"), (files, "pass"),
        ("selftests: demo: fails_on_purpose", "fail"), ("selftests: demo: later", "todo")]


def test_a_panic_mid_test_fails_the_running_test_with_the_console_tail(runs):
    ran = runs["crash"]
    assert ran.returncode == 126, ran.stderr[-3000:]  # the panic's status, not the tests'
    (suite,) = junitparser.JUnitXml.fromfile(str(ran.cwd / "crash.xml"))
    cases = {case.name: case for case in suite}
    assert list(cases) == ["boot", "command", "before", "tests 2-3 (no result)"]
    assert cases["before"].is_passed
    (failure,) = cases["tests 2-3 (no result)"].result
    assert isinstance(failure, junitparser.Failure)
    assert failure.message.startswith("planned 1..3, 1 reported: guest kernel panic")
    assert "# test 2 starts" in failure.text  # its own output, then the console's last lines
    assert "Kernel panic - not syncing: sysrq triggered crash" in failure.text
    tests = json.loads((ran.cwd / "crash.json").read_text())["tests"]
    assert [(t["name"], t["status"]) for t in tests] == [("before", "pass"), ("tests 2-3 (no result)", "fail")]
