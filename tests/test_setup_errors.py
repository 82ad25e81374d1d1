"""A run that fails during setup (an invalid kernel, no usable /dev/kvm) opens
no backend, leaves no file it created behind, and says so as an <error> in
its results; the results files themselves are well-formed and versioned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), MICROVMM_IMAGES="/nonexistent-images")
    return subprocess.run([sys.executable, "-m", "microvmm", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_invalid_kernel_opens_no_pty_and_leaves_no_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"garbage, not a kernel\n")
    (tmp_path / "kept.log").write_text("")  # the user's own file: never removed
    result = _run(tmp_path, "--kernel", "bad", "--initrd", "none", "--log", "run.log",
                  "--serial", "file:serial.txt", "--console", "pty:p0", "--console", "file:f=port.txt",
                  "--json", "out.json", "--junit", "out.xml")
    assert result.returncode == 125, result.stderr
    assert "redirected to /dev/pts" not in result.stderr  # no pty made before the kernel was checked
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["bad", "kept.log", "out.json", "out.xml"], left

    data = json.loads((tmp_path / "out.json").read_text())
    assert data["exit_code"] == 125 and data["verdict"] == "fail" and data["infrastructure_error"]
    assert data["log"] is None  # the (empty) log was taken away again
    assert data["schema_version"] == 1 and data["microvmm_version"]
    suite = ET.parse(tmp_path / "out.xml").getroot()
    assert suite.get("errors") == "1" and suite.get("failures") == "0"
    assert suite.find("testcase/error").get("type") == "exit-125"


def test_an_existing_log_is_kept_after_a_setup_error(tmp_path):
    (tmp_path / "bad").write_bytes(b"garbage\n")
    (tmp_path / "run.log").write_text("")
    result = _run(tmp_path, "--kernel", "bad", "--initrd", "none", "--log", "run.log")
    assert result.returncode == 125
    assert (tmp_path / "run.log").exists()


def test_results_hold_rounded_durations_and_an_absolute_log(tmp_path, monkeypatch):
    from microvmm.run.exitcodes import ExitCode
    from microvmm.vmconfig import VmConfig
    from microvmm.run.outcome import VmOutcome
    from microvmm.run.results_files import write_results as _write_results
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.log").write_text("x\n")
    config = VmConfig(kernel=Path("vmlinux"), initrd=None, cmdline="console=ttyS0",
                      log=Path("run.log"), json=Path("out.json"))
    _write_results(config, None, VmOutcome(ExitCode.OK, "guest stopped"), 12.3456789, "9.9")
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["duration_s"] == 12.346
    assert data["log"] == str(tmp_path / "run.log")
    assert data["microvmm_version"] == "9.9"
