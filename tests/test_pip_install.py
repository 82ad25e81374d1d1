"""microvmm for pip users (issue 13): in a fresh venv, `pip install` of this
tree gives a `microvmm` that builds the default guest images into the user's
cache from the installed package, finds them from any directory, boots them,
and a pytest plugin that runs the README's example (skipped, saying why,
before the images exist).

Slow: a venv, a pip install (PyPI for the dependencies), two guest boots.
The image build comes from the warm build cache (`make test` builds the same
images first: the wheel carries the same guest sources, so the same key).
Not in the real-KVM lane (its L1 has no network).
"""

from __future__ import annotations

import os
import re
import subprocess
import venv
from pathlib import Path

import pytest

from microvmm.guestbuild.cache import cache_root
from tests.e2e_support import GUEST_TEST_TIMEOUT, REPO, require_kvm

pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

PLUGIN_EXAMPLE = re.compile(r"## The pytest plugin.*?```python\n(.*?)```", re.DOTALL)


class Installed:
    """A venv with this tree pip-installed, and an environment like a fresh user's."""

    def __init__(self, root: Path):
        self.venv = root / "venv"
        self.bin = self.venv / "bin"
        self.elsewhere = root / "elsewhere"      # no images/ here, nor above
        self.elsewhere.mkdir()
        self.user_images = root / "xdg-cache" / "microvmm" / "images"
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("MICROVMM_", "PYTHON", "VIRTUAL_ENV"))}
        self.env.update(PATH=f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                        XDG_CACHE_HOME=str(root / "xdg-cache"),
                        # the warm build cache of this machine (read, plus one entry's files linked out)
                        MICROVMM_CACHE=str(cache_root()),
                        PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore")

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=self.elsewhere, env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    site = Installed(tmp_path_factory.mktemp("pip"))
    venv.create(site.venv, with_pip=True)
    result = site.run(str(site.bin / "python"), "-m", "pip", "install", "-q", str(REPO), "pytest", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def test_the_installed_package_is_not_this_checkout(installed):
    result = installed.run(str(installed.bin / "python"), "-c",
                           "import microvmm, microvmm.guestbuild as g; print(microvmm.__file__); "
                           "print(sorted(p.name for p in g.GUEST_SOURCES.iterdir()))")
    assert result.returncode == 0, result.stderr
    location, sources = result.stdout.splitlines()
    assert str(installed.venv) in location and str(REPO) not in location
    assert sources == "['initramfs', 'kernel.config', 'patches']"  # the guest sources ship in the wheel
    version = installed.run("microvmm", "--version")
    assert version.stdout.startswith("microvmm ") and "unknown" not in version.stdout


def test_images_path_build_then_run_from_another_directory(installed):
    before = installed.run("microvmm", "images", "path")
    assert before.returncode == 1
    assert before.stdout.strip() == str(installed.user_images)
    assert "microvmm images build" in before.stderr

    no_image = installed.run("microvmm", "run", "--", "true")
    assert no_image.returncode == 2
    assert "run `microvmm images build`" in no_image.stderr

    build = installed.run("microvmm", "images", "build", timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "cache hit" in build.stderr, build.stderr[-3000:]   # same sources as the checkout: same key
    assert build.stdout.strip().splitlines()[-1] == str(installed.user_images)
    for name in ("vmlinux", "initramfs.cpio", "System.map", "manifest.json"):
        assert (installed.user_images / name).is_file(), name

    after = installed.run("microvmm", "images", "path")
    assert (after.returncode, after.stdout.strip()) == (0, str(installed.user_images))

    require_kvm()
    booted = installed.run("microvmm", "run", "--timeout", "600", "--", "true", timeout=700)
    assert booted.returncode == 0, booted.stderr[-3000:]
    assert "command exited with status 0" in booted.stderr


def test_the_readme_plugin_example_skips_without_images_then_passes(installed, tmp_path):
    example = PLUGIN_EXAMPLE.search((REPO / "README.md").read_text())
    assert example, "README has no python example in its pytest plugin section"
    test_file = installed.elsewhere / "test_readme_plugin.py"
    test_file.write_text(example.group(1))
    pytest_cmd = (str(installed.bin / "python"), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                  test_file.name)

    empty_env = dict(installed.env, MICROVMM_IMAGES=str(tmp_path / "no-images"))
    skipped = subprocess.run(pytest_cmd, cwd=installed.elsewhere, env=empty_env, capture_output=True,
                             text=True, timeout=300)
    assert skipped.returncode == 0, skipped.stdout[-3000:]
    assert "1 skipped" in skipped.stdout, skipped.stdout[-3000:]
    require_kvm()
    assert "no microvmm guest image" in skipped.stdout and "microvmm images build" in skipped.stdout

    if not (installed.user_images / "vmlinux").is_file():
        built = installed.run("microvmm", "images", "build", timeout=900)
        assert built.returncode == 0, built.stderr[-3000:]
    passed = installed.run(*pytest_cmd, timeout=GUEST_TEST_TIMEOUT - 120)
    assert passed.returncode == 0, passed.stdout[-5000:]
    assert "1 passed" in passed.stdout, passed.stdout[-3000:]
