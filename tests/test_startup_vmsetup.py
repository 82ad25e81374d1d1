"""The VM is created, and the kernel loaded into guest RAM, on helper threads
while the main thread imports the boot loaders (issue 6): what they hand over,
and that a failure anywhere in them surfaces as the same error, with nothing
left open and no thread left running.
"""

from __future__ import annotations

import os
import sys

import pytest

import microvmm.kvm
import microvmm.vmm as vmm
import microvmm.vmprep as vmprep
from boot_testimages import make_bzimage, make_elf
from microvmm.boot import guest_ram_layout
from microvmm.boot.elf import LoadedElf
from microvmm.boot.errors import ElfError, InitrdError
from microvmm.boot.initrd import SYNTHETIC_INITRD_ADDR_MAX, LoadedInitrd, place_initrd
from microvmm.run.exitcodes import ExitCode
from microvmm.kvm import Kvm, KvmError, KvmUnavailableError
from microvmm.memory import GuestMemory
from microvmm.vmconfig import VmConfig
from tests.e2e_support import IMAGES

MEM = 64 << 20
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def memory():
    ram = GuestMemory(guest_ram_layout(MEM))
    yield ram
    ram.close()


@needs_kvm
def test_take_hands_over_the_vm_with_its_registered_guest_ram(memory):
    before = sys.getswitchinterval()
    setup = vmprep.VmSetup(memory)
    kvm, vm, cpuid = setup.take()
    try:
        assert not setup._thread.is_alive()
        assert sys.getswitchinterval() == before
        assert vm.fileno() >= 0 and kvm.fileno() >= 0
        # KVM's supported leaves (leaf 1 EBX carries the calling host CPU's APIC id: keys only).
        assert {(e.function, e.index) for e in cpuid} == {(e.function, e.index) for e in kvm.get_supported_cpuid()}
        assert any(e.function == 0 for e in cpuid)
        vcpu = vm.create_vcpu(0)  # the irqchip exists: a vCPU gets its LAPIC
        vcpu.close()
        # The RAM is registered: another slot over the same guest range is refused (EEXIST).
        region = memory.regions[0]
        with pytest.raises(KvmError, match="File exists"):
            vm.set_user_memory_region(len(memory.regions), region.guest_addr, region.size, region.host_addr)
        with pytest.raises(RuntimeError, match="twice"):
            setup.take()
        setup.close()  # nothing left to close: it handed everything over
        assert vm.fileno() >= 0
    finally:
        vm.close()
        kvm.close()


@needs_kvm
def test_close_without_take_closes_everything(memory):
    fds = _open_fds()
    setup = vmprep.VmSetup(memory)
    setup.close()
    assert not setup._thread.is_alive()
    assert _open_fds() == fds


@needs_kvm
@pytest.mark.parametrize("fail_in", ["Kvm", "create_irqchip", "set_user_memory_region"])
def test_a_failure_in_the_setup_is_raised_by_take_with_nothing_left_open(monkeypatch, memory, fail_in):
    error = KvmError("KVM_TEST", 5, f"injected in {fail_in}")
    opened = []

    def failing(*_args, **_kwargs):
        raise error

    if fail_in == "Kvm":
        monkeypatch.setattr(microvmm.kvm, "Kvm", failing)
    else:
        monkeypatch.setattr(microvmm.kvm.Vm, fail_in, failing)
    real_kvm = microvmm.kvm.Kvm

    def recording_kvm(*args, **kwargs):
        kvm = real_kvm(*args, **kwargs)
        opened.append(kvm)
        return kvm
    if fail_in != "Kvm":
        monkeypatch.setattr(microvmm.kvm, "Kvm", recording_kvm)
    fds = _open_fds()
    before = sys.getswitchinterval()
    setup = vmprep.VmSetup(memory)
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
    monkeypatch.setattr(microvmm.kvm, "Kvm", lambda: Kvm(missing))
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


def _read_kernel(tmp_path, image: bytes, memory: GuestMemory, initrd: bytes | None = None):
    kernel = tmp_path / "kernel"
    kernel.write_bytes(image)
    initrd_path = None
    if initrd is not None:
        initrd_path = tmp_path / "initrd"
        initrd_path.write_bytes(initrd)
    reader = vmprep.ImageReader(kernel, initrd_path, memory)
    try:
        return reader.take()
    finally:
        reader.close()
        assert not reader._thread.is_alive()


def test_the_image_reader_loads_an_elf_vmlinux_and_its_initrd_into_guest_ram(tmp_path, memory):
    text = os.urandom(0x3000)
    initrd_data = b"070701" + os.urandom(0x5000)
    kernel, initrd = _read_kernel(tmp_path, make_elf([(0x100_0000, text, 0x3000)], entry=0x100_0000),
                                  memory, initrd=initrd_data)
    assert isinstance(kernel, LoadedElf)
    assert kernel.entry == 0x100_0000
    assert memory.read(0x100_0000, 0x3000) == text
    assert isinstance(initrd, LoadedInitrd) and initrd.size == len(initrd_data)
    assert initrd.addr == place_initrd(memory.end, len(initrd_data), SYNTHETIC_INITRD_ADDR_MAX, kernel.kernel_end)
    assert memory.read(initrd.addr, initrd.size) == initrd_data


def test_an_initrd_too_big_for_guest_ram_is_the_boot_error_it_was(tmp_path, memory):
    elf = make_elf([(0x100_0000, b"x", 1)], entry=0x100_0000)
    with pytest.raises(InitrdError, match=r"initrd of \d+ bytes does not fit"):
        _read_kernel(tmp_path, elf, memory, initrd=bytes(MEM))


def test_the_image_reader_hands_a_bzimage_and_its_initrd_over_as_bytes(tmp_path, memory):
    image = make_bzimage()
    kernel, initrd = _read_kernel(tmp_path, image, memory, initrd=b"070701rest")
    assert kernel == image and initrd == b"070701rest"
    assert memory.read(0x100_0000, 64) == bytes(64)  # the boot loader places it, not the reader


def test_the_image_reader_decompresses_a_bzimage_payload_when_asked(tmp_path, memory):
    from microvmm.boot import DecompressedBzImage, PayloadCorruptError
    from tests.test_boot_payload import bzimage_with_payload, compress, kernel_elf
    image = bzimage_with_payload(compress("lz4", kernel_elf()))
    path = tmp_path / "bzImage"
    path.write_bytes(image)

    def read(decompress: bool):
        reader = vmprep.ImageReader(path, None, memory, decompress_bzimage=decompress)
        try:
            return reader.take()[0]
        finally:
            reader.close()
    kernel = read(True)
    assert isinstance(kernel, DecompressedBzImage)
    assert kernel.image == image and kernel.payload.elf == kernel_elf()
    assert read(False) == image  # no workaround: the guest decompresses it
    path.write_bytes(bzimage_with_payload(b"\x28\xb5\x2f\xfd" + bytes(64)))  # zstd: not decoded here
    assert isinstance(read(True), bytes)  # the boot loader says why and boots it the usual way
    path.write_bytes(bzimage_with_payload(compress("lz4", kernel_elf())[:-40] + bytes(4)))
    with pytest.raises(PayloadCorruptError, match=r"^kernel: lz4 payload"):
        read(True)


def test_a_bad_elf_is_raised_by_take_as_the_boot_error_it_is(tmp_path, memory):
    elf = make_elf([(0x8000, b"x", 1)], entry=0x8000)  # below 1 MiB
    fds = _open_fds()
    with pytest.raises(ElfError, match=r"kernel: segment 0 at physical 0x8000 is below 1 MiB"):
        _read_kernel(tmp_path, elf, memory)
    assert _open_fds() == fds, "the reader left the kernel file open"


def test_an_unreadable_kernel_is_a_vmm_error_naming_it(tmp_path, memory):
    missing = tmp_path / "no-such-vmlinux"
    reader = vmprep.ImageReader(missing, None, memory)
    with pytest.raises(vmprep.VmmError, match=rf"cannot read kernel {missing}: No such file or directory"):
        reader.take()
    reader.close()


def _threads() -> set[str]:
    import threading
    return {t.name for t in threading.enumerate()}


@needs_kvm
def test_a_preparation_hands_over_the_vm_and_the_loaded_kernel(tmp_path):
    kernel = tmp_path / "vmlinux"
    text = os.urandom(0x2000)
    kernel.write_bytes(make_elf([(0x100_0000, text, 0x2000)], entry=0x100_0000))
    fds = _open_fds()
    preparation = vmprep.VmPreparation(VmConfig(kernel=kernel, initrd=None, cmdline="", mem_size=MEM))
    kvm, vm, _cpuid = preparation.take_vm()
    loaded, initrd = preparation.take_images()
    assert isinstance(loaded, LoadedElf) and initrd is None
    assert preparation.memory.read(0x100_0000, 0x2000) == text
    vm.close()
    kvm.close()
    preparation.close()
    assert preparation.memory.regions[0].mapping.closed
    assert _open_fds() == fds
    assert not {"microvmm-vm-setup", "microvmm-images"} & _threads()


@needs_kvm
def test_closing_an_untaken_preparation_closes_the_vm_and_unmaps_ram(tmp_path):
    fds = _open_fds()
    preparation = vmprep.VmPreparation(VmConfig(kernel=tmp_path / "missing", initrd=None, cmdline="",
                                                mem_size=MEM))
    preparation.close()  # the kernel's read failed, the VM was made: both threads joined, VM closed
    assert preparation.memory.regions[0].mapping.closed
    assert _open_fds() == fds
    assert not {"microvmm-vm-setup", "microvmm-images"} & _threads()


@needs_kvm
def test_run_vm_closes_a_preparation_it_could_not_use(tmp_path, capsys):
    """A VMM that fails before running (here: --log in a missing directory) still
    closes the preparation the CLI started: no VM fd, thread or mapping left."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf([(0x100_0000, b"x", 1)], entry=0x100_0000))
    config = VmConfig(kernel=kernel, initrd=None, cmdline="", mem_size=MEM, log=tmp_path / "no" / "log")
    fds = _open_fds()
    preparation = vmprep.VmPreparation(config)
    assert vmm.run_vm(config, preparation) == ExitCode.VMM_ERROR
    assert "--log" in capsys.readouterr().err
    assert preparation.memory.regions[0].mapping.closed
    assert _open_fds() == fds
    assert not {"microvmm-vm-setup", "microvmm-images"} & _threads()
