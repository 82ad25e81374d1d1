"""microvmm's pytest plugin (microvmm/testing/plugin.py) against the real
default guest on KVM: the plugin's own fixtures boot it, its agent runs the
commands (microvmm/guestbuild/guest/initramfs/sbin/microvmm-agent).

One VM serves the module's tests (microvm_module); the report test boots a
second one in an inner pytest run, only for about 25 s. The tests run in file
order; the last one powers the shared VM off.
"""

import os
import re
from pathlib import Path

import pytest

import microvmm.testing.plugin
from microvmm.testing import CommandResult, kvm_unusable_reason
from tests.e2e_support import GUEST_TEST_TIMEOUT

pytest_plugins = ["pytester"]
# The plugin's fixtures boot guests: the limit of guest-booting modules.
pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

REPO = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("MICROVMM_IMAGES", REPO / "images"))


def test_plugin_is_loaded_through_its_entry_point(pytestconfig):
    # `pip install -e .` registers it; an older install of this checkout lacks it
    assert pytestconfig.pluginmanager.get_plugin("microvmm") is microvmm.testing.plugin, \
        "the pytest11 entry point 'microvmm' is not installed: run `pip install -e .`"


def _microvmm_processes_under(path: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "microvmm" in cmdline and str(path) in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_failing_test_report_carries_the_console_log(pytester):
    reason = kvm_unusable_reason()
    if reason:
        pytest.skip(reason)
    pytester.makepyfile(test_inner="""
        def test_guest_says_something_else(microvm):
            # On an emulating host the boot does not finish in 25 s: the
            # factory fails the test; on hardware KVM the assertion does.
            vm = microvm(boot_timeout=25)
            assert vm.run("echo inner").stdout == b"something else"

        def test_passes_without_a_vm():
            pass
    """)
    result = pytester.runpytest("--microvmm-kernel", str(IMAGES / "vmlinux"),
                                "--microvmm-initrd", str(IMAGES / "initramfs.cpio"))
    result.assert_outcomes(failed=1, passed=1)
    # the section, titled with the log file, holds what the guest printed
    result.stdout.fnmatch_lines(["*- microvm console log vm1 (*vm1-console.log) -*",
                                 "*Linux version*"])
    assert not _microvmm_processes_under(pytester.path), "the inner run left a VM running"
    assert "microvm console log" not in "".join(
        line for line in result.outlines if "test_passes_without_a_vm" in line)


@pytest.fixture(scope="module")
def vm(microvm_module):
    return microvm_module(ports=["data"])


def test_factory_returns_the_booted_vm_for_the_same_arguments(vm, microvm_module):
    assert microvm_module(ports=["data"]) is vm
    assert "microvmm: init reached" in vm.log


@pytest.mark.parametrize("command, expected", [
    ("echo hi", CommandResult(0, b"hi\n", b"")),
    ("printf 'no newline'", CommandResult(0, b"no newline", b"")),
    ("echo err >&2; exit 3", CommandResult(3, b"", b"err\n")),
])
def test_run_returns_exact_status_and_output(vm, command, expected):
    assert vm.run(command, timeout=60) == expected


def test_run_returns_10k_of_output(vm):
    expected = "".join(f"{i}\n" for i in range(1, 2501)).encode()
    assert len(expected) > 10_000
    assert vm.run("seq 1 2500", timeout=60) == (0, expected, b"")


def test_run_returns_every_byte_value(vm):
    every_byte = "".join(f"\\{value:03o}" for value in range(256))
    assert vm.run(f"printf '{every_byte}'; printf '\\377\\000' >&2", timeout=60) == \
        (0, bytes(range(256)), b"\xff\x00")
    assert vm.run("echo text", text=True) == (0, "text\n", "")


def test_host_writes_reach_the_guest_port(vm):
    device = vm.vport("data")
    assert re.fullmatch(r"/dev/vport\d+p\d+", device)
    vm.port("data").write(b"hello from the host\n")
    assert vm.run(f"head -n 1 {device}", timeout=60) == (0, b"hello from the host\n", b"")


def test_guest_writes_reach_the_host_port(vm):
    status, out, err = vm.run(f"echo pong from the guest > {vm.vport('data')}", timeout=60)
    assert (status, err) == (0, b"")
    match = vm.port("data").expect(rb"pong from (\w+) guest\n", timeout=30)
    assert match.group(1) == b"the"


def test_poweroff_ends_the_vm_and_leaves_nothing_behind(vm):
    sockets = list(vm._socket_dir.iterdir())
    assert len(sockets) == 4  # agent, stdout, stderr, data
    assert vm.poweroff(timeout=120) == 0
    assert "reboot: System halted" in vm.log  # /sbin/poweroff: poweroff -f, the final halt
    assert not vm._socket_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(vm.proc.pid, 0)  # nothing left of microvmm's session
