"""Start-up cost guard: what `microvmm run` imports before the guest's first
KVM_RUN (issue 6). Each module named here is slow to import and needed only on
a diagnostic, result-writing or optional path, or for console ports; an eager
import of any of them from the start-up path fails these tests.

Every check runs in a fresh interpreter: the test process has long since
imported everything.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import microvmm.virtio_console as virtio_console

REPO = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("MICROVMM_IMAGES", REPO / "images"))

#: Never needed before the first KVM_RUN of a run without console ports.
NOT_AT_STARTUP = (
    "capstone",                         # instruction decoding in diagnostics
    "microvmm.diag.report",             # vCPU snapshots: faults, SIGUSR1, timeouts
    "microvmm.diag.symbols",            # System.map: diagnostics and --profile
    "microvmm.diag.profiler",                # --profile
    "microvmm.run.results",                 # --json / --junit, written at exit
    "microvmm.host.seccomp",                 # --seccomp, installed after the vCPUs start
    "microvmm.diag.kconfig_check",           # check-config
    "microvmm.virtio_console.device",   # built after the first KVM_RUN (ports, -- CMD, the kernel's log port)
    "microvmm.virtio_console.backends",
    "microvmm.virtio.queue",
    "socket",                           # socket console backends
    "shlex",                            # quoting a `-- CMD` for the kernel command line
    "microvmm.host.terminal",                # raw mode and Ctrl-A escapes: serial input, console ports
    "termios",
    "microvmm.kvm.events",              # vCPU events: #BP injection and diagnostics of a running guest
    "microvmm.boot.payload",            # a bzImage's payload decoders: bzImage boots only
)

#: The modules the CLI and the VMM import to get to the first KVM_RUN.
STARTUP_IMPORTS = ("microvmm.cli", "microvmm.vmm", "microvmm.vmprep", "microvmm.virtio_console.spec", "microvmm.boot",
                   "microvmm.vmconfig", "microvmm.run.monitor", "microvmm.devices", "microvmm.eventloop",
                   "microvmm.pci.bus", "microvmm.memory", "microvmm.kvm", "microvmm.vcpu_runner")


def _modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """sys.modules of a fresh interpreter after running `code`."""
    script = f"{code}\nimport json, sys\nprint('MODULES=' + json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES=")), None)
    assert line is not None, f"child printed no module list (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return set(json.loads(line.removeprefix("MODULES=")))


def test_importing_the_startup_modules_loads_no_diagnostic_or_port_code():
    loaded = _modules_after("\n".join(f"import {name}" for name in STARTUP_IMPORTS))
    assert set(STARTUP_IMPORTS) <= loaded
    assert sorted(loaded & set(NOT_AT_STARTUP)) == []


def test_validating_the_memory_size_does_not_import_the_boot_loaders():
    """The CLI checks --mem with guest_ram_layout; the loaders are imported by the
    VMM while its helper thread creates the VM (microvmm.boot loads them lazily)."""
    loaded = _modules_after("from microvmm.boot.layout import guest_ram_layout\n"
                            "from microvmm.boot import MemoryLayoutError, BootError")
    loaders = {"microvmm.boot.linux", "microvmm.boot.bzimage", "microvmm.boot.elf", "microvmm.boot.paging",
               "microvmm.boot.params", "microvmm.boot.mptable", "microvmm.boot.payload", "microvmm.boot.cpuid"}
    assert sorted(loaded & loaders) == []


@pytest.mark.parametrize("package, lazy_name, submodule", [
    ("microvmm.boot", "setup_linux_boot", "microvmm.boot.linux"),
    ("microvmm.kvm", "VcpuEvents", "microvmm.kvm.events"),
])
def test_a_lazily_loading_package_still_exports_every_name(package, lazy_name, submodule):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018
    namespace: dict = {}
    exec(f"from {package} import {lazy_name}", namespace)  # the from-import form
    assert namespace[lazy_name].__module__ == submodule


def test_the_vm_preparation_imports_neither_the_vmm_nor_the_kvm_bindings():
    """The CLI starts it before importing the VMM: it must stay light to import
    (microvmm.kvm is imported when a preparation starts, to create the VM)."""
    loaded = _modules_after("import microvmm.vmprep")
    assert sorted(loaded & {"microvmm.vmm", "microvmm.kvm", "microvmm.vcpu_runner", "microvmm.boot.linux",
                            "microvmm.boot.elf", *NOT_AT_STARTUP}) == []


def test_the_cli_alone_does_not_import_the_vmm():
    loaded = _modules_after("import microvmm.cli")
    assert "microvmm.cli" in loaded
    assert sorted(loaded & {"microvmm.vmm", "microvmm.kvm", "microvmm.vcpu_runner", *NOT_AT_STARTUP}) == []


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
@pytest.mark.skipif(not (IMAGES / "vmlinux").is_file() or not (IMAGES / "initramfs.cpio").is_file(),
                    reason=f"no guest images in {IMAGES} (make images)")
def test_a_run_up_to_its_first_kvm_run_loads_none_of_them():
    """The real path: `microvmm run` until vCPU 0's first KVM_RUN (the benchmark
    hook ends the run there), then the modules it had loaded."""
    # The modules loaded when vCPU 0 is about to run: the devices (the
    # default guest's kernel-log port among them) are built while it runs.
    code = ("import sys\nfrom microvmm.cli import main\nfrom microvmm.vmm import Vmm\n"
            "start = Vmm._start_vcpus\nat_first_run = set()\n"
            "def snapshot(self):\n    at_first_run.update(sys.modules)\n    start(self)\n"
            "Vmm._start_vcpus = snapshot\n"
            f"status = main(['run', '--serial', 'off', '--kernel', {str(IMAGES / 'vmlinux')!r}, "
            f"'--initrd', {str(IMAGES / 'initramfs.cpio')!r}])\n"
            "assert status == 0, status\n"
            "for name in set(sys.modules) - at_first_run: del sys.modules[name]")
    loaded = _modules_after(code, env={"MICROVMM_EXIT_AT_FIRST_RUN": "1"})
    assert {"microvmm.vmm", "microvmm.kvm", "microvmm.boot", "microvmm.vcpu_runner"} <= loaded
    assert sorted(loaded & set(NOT_AT_STARTUP)) == []


def test_the_console_package_still_exports_every_name_from_its_submodule():
    for name in virtio_console.__all__:
        submodule = importlib.import_module(f"microvmm.virtio_console.{virtio_console._EXPORTS[name]}")
        assert getattr(virtio_console, name) is getattr(submodule, name)
    assert set(virtio_console.__all__) == set(virtio_console._EXPORTS)
    assert set(virtio_console.__all__) <= set(dir(virtio_console))
    with pytest.raises(AttributeError, match="no_such_name"):
        virtio_console.no_such_name  # noqa: B018
    from microvmm.virtio_console import VirtioConsole, create_backend  # the from-import form
    assert VirtioConsole.__module__ == "microvmm.virtio_console.device"
    assert create_backend.__module__ == "microvmm.virtio_console.backends"
