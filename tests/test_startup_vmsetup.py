"""The VM is created on a helper thread while the main thread imports the boot
loaders (issue 6): what it hands over, and that a failure anywhere in it
surfaces as the same error, with nothing left open and no thread left running.
"""

from __future__ import annotations

import os
import sys

import pytest

import microvmm.vmm as vmm
from microvmm.exitcodes import ExitCode
from microvmm.kvm import Kvm, KvmError, KvmUnavailableError
from microvmm.vmconfig import VmConfig
from tests.e2e_support import IMAGES

MEM = 64 << 20
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@needs_kvm
def test_take_hands_over_the_vm_with_its_registered_guest_ram():
    before = sys.getswitchinterval()
    setup = vmm._VmSetup(MEM)
    kvm, vm, memory = setup.take()
    try:
        assert not setup._thread.is_alive()
        assert sys.getswitchinterval() == before
        assert memory.size == MEM
        assert vm.fileno() >= 0 and kvm.fileno() >= 0
        vcpu = vm.create_vcpu(0)  # the irqchip exists: a vCPU gets its LAPIC
        vcpu.close()
        with pytest.raises(RuntimeError, match="twice"):
            setup.take()
        setup.close()  # nothing left to close: it handed everything over
        assert vm.fileno() >= 0
    finally:
        memory.close()
        vm.close()
        kvm.close()


@needs_kvm
def test_close_without_take_closes_everything():
    fds = _open_fds()
    setup = vmm._VmSetup(MEM)
    setup.close()
    assert not setup._thread.is_alive()
    assert _open_fds() == fds


@needs_kvm
@pytest.mark.parametrize("fail_in", ["Kvm", "create_irqchip", "GuestMemory", "set_user_memory_region"])
def test_a_failure_in_the_setup_is_raised_by_take_with_nothing_left_open(monkeypatch, fail_in):
    error = KvmError("KVM_TEST", 5, f"injected in {fail_in}")
    opened = []

    def failing(*_args, **_kwargs):
        raise error

    if fail_in == "Kvm":
        monkeypatch.setattr(vmm, "Kvm", failing)
    elif fail_in == "GuestMemory":
        monkeypatch.setattr(vmm, "GuestMemory", failing)
    else:
        monkeypatch.setattr(vmm.Vm, fail_in, failing)
    real_kvm = vmm.Kvm

    def recording_kvm(*args, **kwargs):
        kvm = real_kvm(*args, **kwargs)
        opened.append(kvm)
        return kvm
    if fail_in != "Kvm":
        monkeypatch.setattr(vmm, "Kvm", recording_kvm)
    fds = _open_fds()
    before = sys.getswitchinterval()
    setup = vmm._VmSetup(MEM)
    with pytest.raises(KvmError) as info:
        setup.take()
    assert info.value is error
    assert not setup._thread.is_alive()
    assert sys.getswitchinterval() == before
    assert _open_fds() == fds, "the setup left file descriptors open"
    assert all(kvm._fd < 0 for kvm in opened)
    setup.close()  # after a failure: nothing to do, no error


def test_no_dev_kvm_gives_the_same_error_and_exit_status_as_before(monkeypatch, capsys, tmp_path):
    """The error reaches run_vm from the helper thread unchanged: one line, exit 125."""
    missing = str(tmp_path / "no-kvm")
    monkeypatch.setattr(vmm, "Kvm", lambda: Kvm(missing))
    kernel = IMAGES / "vmlinux"
    if not kernel.is_file():
        kernel = tmp_path / "vmlinux"
        kernel.write_bytes(b"\x7fELF")
    config = VmConfig(kernel=kernel, initrd=None, cmdline="console=ttyS0", mem_size=MEM)
    fds = _open_fds()
    status = vmm.run_vm(config)
    expected = str(KvmUnavailableError.from_open_error(missing, FileNotFoundError(2, "No such file or directory")))
    assert status == ExitCode.VMM_ERROR
    assert f"microvmm: error: {expected}" in capsys.readouterr().err
    assert _open_fds() <= fds, "a failed run left file descriptors open"
