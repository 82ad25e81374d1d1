"""The device gate (issue 6): the VMM starts vCPU 0 before it builds the devices,
and a vCPU exit that needs a device before they are all registered waits, then
goes to the right device; if the deferred build fails, the VM stops with that
error and nothing is dispatched.

Tiny real-mode guests on the real KVM for the runner; the real images for the
VMM itself.
"""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest

from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
from microvmm.run.exitcodes import ExitCode
from microvmm.host.hostinfo import HostKind, host_quirks
from microvmm.vcpu_runner import DeviceGate, StopReason, VcpuRunner, VcpuStop
from tests.e2e_support import IMAGES
from tests.tiny_guest import real_mode_guest

pytestmark = pytest.mark.usefixtures("kick_handler")  # conftest.py: vCPUs get kicked

DATA = 0x1100
NO_QUIRKS = host_quirks(HostKind.HARDWARE, "test: no workarounds")
#: out 0x70, 0x5A; in al, 0x71; mov [DATA], al; hlt (real mode)
PORT_GUEST = bytes([0xB0, 0x5A, 0xE6, 0x70, 0xE4, 0x71, 0xA2, DATA & 0xFF, DATA >> 8, 0xF4])


class RecordingPorts:
    """Two ports (0x70/0x71 at offsets 0/1) that log accesses; reads answer 0x3C."""

    def __init__(self) -> None:
        self.accesses: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("r", offset, size, 0x3C))
        return 0x3C

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size, value))


@pytest.fixture
def gated_guest(kvm):
    """A started vCPU running PORT_GUEST behind a closed gate: (runner, gate, memory, stops)."""
    vm = kvm.create_vm()
    mem, vcpu = real_mode_guest(vm, PORT_GUEST)
    gate = DeviceGate()
    stops: queue.SimpleQueue[VcpuStop] = queue.SimpleQueue()
    runner = VcpuRunner(0, vcpu, mem, None, None, NO_QUIRKS, on_stop=stops.put, gate=gate)
    runner.start()
    yield runner, gate, mem, stops
    runner.stop()
    runner.thread.join(10)
    vcpu.close()
    vm.close()
    mem.close()


def _wait_for_first_io_exit(runner: VcpuRunner) -> None:
    deadline = time.monotonic() + 10
    while runner.exit_counts.get("io", 0) < 1:
        assert time.monotonic() < deadline, "the guest's first out never exited"
        time.sleep(0.005)


def test_an_exit_before_the_devices_exist_waits_then_reaches_the_right_device(gated_guest):
    runner, gate, mem, stops = gated_guest
    _wait_for_first_io_exit(runner)
    time.sleep(0.2)
    # held at the gate: the out has not completed, nothing ran past it
    assert runner.thread.is_alive() and stops.empty()
    assert runner.exit_counts["io"] == 1
    assert mem.read(DATA, 1) == b"\0"

    io_bus, mmio_bus = Bus("pio", PIO_ADDRESS_LIMIT), Bus("mmio")
    ports, other = RecordingPorts(), RecordingPorts()
    io_bus.register(0x60, 2, other, "other")
    io_bus.register(0x70, 2, ports, "rtc-like")
    gate.open(io_bus, mmio_bus)

    stop = stops.get(timeout=10)
    assert stop.reason is StopReason.SHUTDOWN and not stop.fatal  # the guest's hlt
    assert ports.accesses == [("w", 0, 1, 0x5A), ("r", 1, 1, 0x3C)]
    assert other.accesses == []
    assert mem.read(DATA, 1) == b"\x3c"  # the in's answer reached the guest
    assert runner.exit_counts["io"] == 2


def test_a_failed_device_build_dispatches_nothing_and_ends_the_vcpu(gated_guest):
    runner, gate, mem, stops = gated_guest
    _wait_for_first_io_exit(runner)
    gate.fail()
    runner.thread.join(5)
    assert not runner.thread.is_alive()
    assert stops.empty()  # the build's own error is the VM's outcome, not a vCPU stop
    assert runner.exit_counts["io"] == 1
    assert mem.read(DATA, 1) == b"\0"


def test_a_stop_while_waiting_at_the_gate_ends_the_vcpu(gated_guest):
    runner, gate, mem, stops = gated_guest
    _wait_for_first_io_exit(runner)
    runner.stop()  # a signal during the device build
    runner.thread.join(5)
    assert not runner.thread.is_alive()
    assert mem.read(DATA, 1) == b"\0"


def test_a_runner_needs_buses_or_a_gate():
    with pytest.raises(ValueError):
        VcpuRunner(0, None, None, None, None, NO_QUIRKS, on_stop=print)
    with pytest.raises(ValueError):
        VcpuRunner(0, None, None, Bus("pio"), Bus("mmio"), NO_QUIRKS, on_stop=print, gate=DeviceGate())


# -- the VMM: vCPUs first, devices while they run ------------------------------

needs_images = pytest.mark.skipif(
    not (IMAGES / "vmlinux").is_file() or not (IMAGES / "initramfs.cpio").is_file(),
    reason=f"no guest images in {IMAGES} (make images)")


def _config(**kwargs):
    from microvmm.vmconfig import SerialConfig, VmConfig
    return VmConfig(kernel=IMAGES / "vmlinux", initrd=IMAGES / "initramfs.cpio", cmdline="console=ttyS0",
                    serial=SerialConfig("off"), **kwargs)


@needs_images
def test_the_vcpu_runs_while_the_devices_are_built_and_a_build_error_ends_the_vm(kvm, monkeypatch, capfd):
    from microvmm import vmm as vmm_module
    seen: dict = {}
    real_build = vmm_module.Vmm._build_devices

    def failing_build(self):
        # vCPU 0 is already running when the devices are built
        seen["vcpu_started"] = [r.thread.is_alive() for r in self.runners]
        seen["no_buses_yet"] = not hasattr(self, "io_bus")
        seen["threads"] = [r.thread for r in self.runners]
        real_build(self)  # half-built is fine: the gate must stay shut
        raise vmm_module.VmmError("--console p0: test failure in the deferred device build")

    monkeypatch.setattr(vmm_module.Vmm, "_build_devices", failing_build)
    code = vmm_module.run_vm(_config())
    err = capfd.readouterr().err
    assert seen["vcpu_started"] == [True] and seen["no_buses_yet"]
    assert code == ExitCode.VMM_ERROR
    assert err.splitlines()[-1] == "microvmm: error: --console p0: test failure in the deferred device build"
    assert "stopped" not in err and "Traceback" not in err
    assert all(not thread.is_alive() for thread in seen["threads"])


@needs_images
@pytest.mark.parametrize("gsi_shift, expected", [(0, ExitCode.NO_RESULT), (1, ExitCode.VMM_ERROR)])
def test_the_mp_table_routing_written_before_the_pci_bus_exists_is_checked(kvm, monkeypatch, capfd,
                                                                           gsi_shift, expected):
    """The MP table's PCI routing comes from the configuration, before the bus is
    built; the deferred build fails the run if the bus assigned anything else."""
    from microvmm import vmm as vmm_module
    from microvmm.devmgr import plan as plan_module  # where the planned routing comes from
    monkeypatch.setattr(plan_module, "INTX_GSIS", tuple(gsi + gsi_shift for gsi in plan_module.INTX_GSIS))
    monkeypatch.setenv(vmm_module.EXIT_AT_FIRST_RUN_ENV, "1")
    code = vmm_module.run_vm(_config(command=["true"]))  # stops at the first KVM_RUN: no status
    err = capfd.readouterr().err
    assert code == expected, err
    if gsi_shift:
        assert err.splitlines()[-1].startswith("microvmm: error: PCI interrupt routing")
    else:
        assert "error" not in err


@needs_images
def test_no_device_module_is_imported_before_the_vcpus_start():
    """What the guest needs only later is imported after vCPU 0 starts: the
    modules loaded when _start_vcpus is called (all pre-KVM_RUN work done)."""
    import json
    import subprocess
    import sys
    code = (
        "import json, sys\nfrom microvmm import vmm\nseen = {}\nreal = vmm.Vmm._start_vcpus\n"
        "def start(self):\n    seen['modules'] = sorted(sys.modules)\n    real(self)\n"
        "vmm.Vmm._start_vcpus = start\nfrom microvmm.cli import main\n"
        f"status = main(['run', '--serial', 'off', '--kernel', {str(IMAGES / 'vmlinux')!r}, "
        f"'--initrd', {str(IMAGES / 'initramfs.cpio')!r}, '--', 'true'])\n"
        "print('MODULES=' + json.dumps(seen['modules']))\n")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "MICROVMM_EXIT_AT_FIRST_RUN": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES=")), None)
    assert line is not None, proc.stderr[-3000:]
    loaded = set(json.loads(line.removeprefix("MODULES=")))
    assert "microvmm.boot" in loaded and "microvmm.kvm" in loaded
    deferred = {"microvmm.devices.bus", "microvmm.devices.serial", "microvmm.devices.i8042",
                "microvmm.devices.rtc", "microvmm.eventloop", "microvmm.pci.bus", "microvmm.pci.config",
                "microvmm.virtio.pci_legacy", "microvmm.virtio_console.device", "microvmm.interrupts"}
    assert sorted(loaded & deferred) == []
