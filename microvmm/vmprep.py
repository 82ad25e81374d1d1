"""Preparing a VM on helper threads while the VMM is still being imported.

As soon as the configuration is known (issue 6: time to the first KVM_RUN),
guest RAM is mapped and two helper threads start: one reads an ELF kernel
and its initrd into that RAM (or a bzImage's bytes, its payload decompressed
on an emulating host), the other creates the VM (its in-kernel irqchip and
PIT), registers that RAM and asks for KVM's CPUID leaves. Their preadv()s,
decoders and ioctl()s drop the GIL, so they overlap the main thread's imports
of the VMM, the devices and the boot loaders. This module imports little itself
(the CLI imports it before the VMM); the KVM bindings are imported when a
preparation starts.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from microvmm.boot.layout import guest_ram_layout
from microvmm.memory import GuestMemory

if TYPE_CHECKING:
    from microvmm.boot.bzimage import DecompressedBzImage
    from microvmm.boot.elf import LoadedElf
    from microvmm.boot.initrd import LoadedInitrd
    from microvmm.initramfs.guestfiles import AddedEntry
    from microvmm.initramfs.guestmodules import ModuleFile
    from microvmm.kvm import CpuidEntry, Kvm, Vm
    from microvmm.vmconfig import VmConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

TSS_ADDRESS = 0xFFFBD000
IDENTITY_MAP_ADDRESS = 0xFFFBC000


class VmmError(Exception):
    """Setting up or running the VM failed on the host side."""


class VmPreparation:
    """Guest RAM, the VM being created and the kernel being loaded, for one run.

    Started from the configuration alone; the VMM takes what it needs with
    take_vm() and take_images() (each re-raises the error its thread met) and
    calls close() when the run ends: it waits for both threads, closes
    whatever was not taken, and unmaps guest RAM.
    """

    def __init__(self, config: VmConfig):
        from microvmm.host.hostinfo import detect_host_kind, host_quirks
        #: (HostKind, why) and the workarounds the run applies: the image thread needs them.
        self.host = detect_host_kind()
        self.quirks = host_quirks(*self.host, config.host_workarounds)
        try:
            self.memory = GuestMemory(guest_ram_layout(config.mem_size))
        except OSError as err:
            raise VmmError(f"cannot map {config.mem_size >> 20} MiB of guest RAM: {err.strerror}") from err
        self._vm_setup: VmSetup | None = None
        self._images: ImageReader | None = None
        try:
            # The kernel's reads first: they need nothing more imported.
            self._images = ImageReader(config.kernel, config.initrd, self.memory,
                                       decompress_bzimage=self.quirks.decompress_bzimage_on_host,
                                       initrd_modules=config.initrd_modules,
                                       added_files=config.added_files)
            # The KVM bindings are imported here, before the VM thread starts:
            # imported on that thread they would compete with the caller's
            # imports for the GIL and hold back the VM's ioctls.
            import microvmm.kvm  # noqa: F401
            self._vm_setup = VmSetup(self.memory)
        except BaseException:
            self.close()
            raise

    def take_vm(self) -> tuple[Kvm, Vm, list[CpuidEntry]]:
        """(kvm, vm, the CPUID leaves this KVM supports)."""
        return self._vm_setup.take()

    def take_images(self) -> tuple[LoadedElf | DecompressedBzImage | bytes, LoadedInitrd | bytes | None]:
        """(the kernel, the initrd or None): an ELF vmlinux and its initrd already in
        guest RAM (LoadedElf, LoadedInitrd); a bzImage (its payload maybe
        decompressed already: DecompressedBzImage) and its initrd as bytes."""
        return self._images.take()

    def close(self) -> None:
        """Join the helper threads (no thread outlives the run, none writes into
        unmapped RAM), close what was never taken, unmap guest RAM."""
        for helper in (self._vm_setup, self._images):
            if helper is not None:
                helper.close()
        try:
            self.memory.close()
        except BufferError as err:  # a view still exported: the mapping goes with the process
            logger.debug("guest RAM: %s", err)


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise VmmError(f"cannot read {what} {path}: {err.strerror}") from err


class HelperThread(Generic[T]):
    """Runs `_work()` on a daemon thread started at construction: its reads,
    mmap()s and ioctl()s drop the GIL, so the main thread's imports overlap them.

    take() waits and hands the result over (once: no reference stays here), or
    raises the very exception `_work()` met. close() waits too and passes a
    result that was never taken to `_dispose()` (a run that failed before
    needing it), so no helper thread or resource outlives the run.
    """

    def __init__(self, name: str) -> None:
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> T:
        raise NotImplementedError

    def _dispose(self, result: T) -> None:
        """Release a result that take() never handed over."""

    def _run(self) -> None:
        try:
            self._result = self._work()
        except BaseException as err:  # handed to the main thread by take()
            self._error = err

    def _join(self) -> None:
        self._thread.join()

    def take(self) -> T:
        self._join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        result, self._result = self._result, None
        if result is None:
            raise RuntimeError(f"{type(self).__name__}.take() called twice")
        return result

    def close(self) -> None:
        self._join()
        result, self._result = self._result, None
        if result is not None:
            self._dispose(result)


class VmSetup(HelperThread["tuple[Kvm, Vm, list[CpuidEntry]]"]):
    """Opens /dev/kvm and creates the VM (in-kernel irqchip and PIT) and
    registers the guest RAM it is given, and asks KVM which CPUID leaves it
    supports, on a helper thread (started by VmPreparation).

    Registering guest RAM alone takes ~8 ms of ioctl time on this project's
    emulating host, which the GIL does not cover: the main thread imports the
    boot loaders meanwhile. take() hands over (kvm, vm, cpuid), or raises the very
    error the setup met (KvmUnavailableError, KvmError, VmmError...), after the
    thread closed whatever it had built. close() closes what take() did not
    hand over. The guest RAM stays the caller's.
    """

    #: The GIL switch interval while the setup runs. The thread takes the GIL
    #: back after each of its ~10 ioctls; at Python's default 5 ms it waits that
    #: long behind the importing main thread every time (measured: the setup
    #: took 17 ms instead of 6).
    SWITCH_INTERVAL = 0.0005

    def __init__(self, memory: GuestMemory):
        self._memory = memory
        self._previous_switch_interval: float | None = sys.getswitchinterval()
        sys.setswitchinterval(min(self._previous_switch_interval, self.SWITCH_INTERVAL))
        super().__init__("microvmm-vm-setup")

    def _join(self) -> None:
        super()._join()
        previous, self._previous_switch_interval = self._previous_switch_interval, None
        if previous is not None:
            sys.setswitchinterval(previous)

    def _work(self) -> tuple[Kvm, Vm, list[CpuidEntry]]:
        from microvmm.kvm import Cap, Kvm  # imported already (VmPreparation): a lookup
        closers = []
        try:
            kvm = Kvm()
            closers.append(kvm.close)
            for cap in (Cap.IRQCHIP, Cap.IRQFD, Cap.IOEVENTFD, Cap.USER_MEMORY, Cap.PIT2, Cap.IMMEDIATE_EXIT):
                if not kvm.check_extension(cap):
                    raise VmmError(f"this host's KVM lacks {cap.name}, which microvmm needs")
            vm = kvm.create_vm()
            closers.append(vm.close)
            vm.set_tss_addr(TSS_ADDRESS)
            vm.set_identity_map_addr(IDENTITY_MAP_ADDRESS)
            vm.create_irqchip()
            vm.create_pit2(flags=0)
            for slot, region in enumerate(self._memory.regions):
                vm.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr)
            return kvm, vm, kvm.get_supported_cpuid()
        except BaseException:
            for close in reversed(closers):
                try:
                    close()
                except Exception as close_err:  # keep closing the rest
                    logger.debug("VM setup cleanup: %s", close_err)
            raise

    def _dispose(self, result: tuple[Kvm, Vm, list[CpuidEntry]]) -> None:
        kvm, vm, _cpuid = result
        vm.close()
        kvm.close()


class ImageReader(HelperThread["tuple[LoadedElf | DecompressedBzImage | bytes, LoadedInitrd | bytes | None]"]):
    """Loads the kernel and reads the initrd on a helper thread, started before
    the VM is built.

    An ELF vmlinux is read segment by segment straight into guest RAM
    (load_elf_vmlinux_file: preadv() without the GIL, no ~15 MB copy in host
    memory); take() then returns its LoadedElf, and the initrd goes the same
    way to where the boot loader would put it (a LoadedInitrd). A bzImage is
    returned as bytes, its initrd too: the boot loader places both. With
    `decompress_bzimage` (a host workaround on emulating hosts) its payload is
    decompressed here, off the main thread (a DecompressedBzImage). Failures
    surface from take() as the VmmError (unreadable file) or BootError (bad
    ELF, initrd or payload) they were. It keeps no reference to what take()
    handed over (a bzImage's bytes are garbage once in guest RAM).

    `initrd_modules` (`run --modules`): kernel modules packed into a second
    archive (guestmodules.build_modules_archive) that follows the initrd in
    guest RAM; the initrd's size covers both. `added_files` (`run --add`):
    host files packed into an archive after that (guestfiles.build_added_archive);
    without an initrd that archive is the initrd (the kernel unpacks it over
    its built-in initramfs).
    """

    def __init__(self, kernel: Path, initrd: Path | None, memory: GuestMemory, *,
                 decompress_bzimage: bool = False, initrd_modules: tuple[ModuleFile, ...] = (),
                 added_files: tuple[AddedEntry, ...] = ()):
        self._paths = (kernel, initrd)
        self._memory = memory
        self._decompress_bzimage = decompress_bzimage
        self._initrd_modules = initrd_modules
        self._added_files = added_files
        super().__init__("microvmm-images")

    def _work(self) -> tuple[LoadedElf | DecompressedBzImage | bytes, LoadedInitrd | bytes | None]:
        from microvmm.boot.elf import LoadedElf  # imported by load_kernel already
        kernel_path, initrd_path = self._paths
        appendix = b""
        if self._initrd_modules:
            from microvmm.initramfs.guestmodules import ModulesError, build_modules_archive
            try:
                appendix = build_modules_archive(list(self._initrd_modules))
            except ModulesError as err:
                raise VmmError(str(err)) from err
        if self._added_files:
            from microvmm.initramfs.guestfiles import AddError, build_added_archive
            try:
                appendix += build_added_archive(self._added_files)  # newc lengths are 4-byte multiples
            except AddError as err:
                raise VmmError(str(err)) from err
        kernel = load_kernel(kernel_path, self._memory)
        if isinstance(kernel, LoadedElf):
            if initrd_path:
                return kernel, load_initrd(initrd_path, self._memory, kernel, appendix)
            if appendix:
                from microvmm.boot.initrd import load_initrd_bytes
                return kernel, load_initrd_bytes(self._memory, appendix, kernel.kernel_end)
            return kernel, None
        # Not an ELF: the boot loader places it and its initrd.
        if self._decompress_bzimage:
            kernel = decompress_payload(kernel)
        if not initrd_path:
            return kernel, appendix or None
        from microvmm.boot.initrd import append_archive
        return kernel, append_archive(read_file(initrd_path, "initrd"), appendix)


def decompress_payload(image: bytes) -> DecompressedBzImage | bytes:
    """A bzImage with its payload decompressed (the decoders, python-lz4, zlib,
    lzma and bz2, drop the GIL while they work), else the bytes as they are: not a bzImage (the boot
    loader says what it is), or a payload format the host does not decode (the
    boot loader says so and boots it through its own decompressor)."""
    from microvmm.boot.bzimage import is_bzimage
    if not is_bzimage(image):
        return image
    from microvmm.boot.errors import UnsupportedPayloadError
    from microvmm.boot.payload import decompress_bzimage
    try:
        return decompress_bzimage(image, "kernel")
    except UnsupportedPayloadError:
        return image


def load_initrd(path: Path, memory: GuestMemory, kernel: LoadedElf, appendix: bytes = b"") -> LoadedInitrd:
    """The initrd of an ELF kernel, read straight to its place in guest RAM
    (followed by `appendix`, another archive, if any)."""
    from microvmm.boot.initrd import load_initrd_file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return load_initrd_file(memory, fd, kernel.kernel_end, source=str(path), appendix=appendix)
        finally:
            os.close(fd)
    except OSError as err:
        raise VmmError(f"cannot read initrd {path}: {err.strerror}") from err


def load_kernel(path: Path, memory: GuestMemory) -> LoadedElf | bytes:
    """An ELF vmlinux loaded into `memory`, else the kernel file's bytes."""
    from microvmm.boot.elf import ELF_MAGIC, load_elf_vmlinux_file
    try:
        with open(path, "rb") as kernel:
            if kernel.read(len(ELF_MAGIC)) == ELF_MAGIC:
                return load_elf_vmlinux_file(memory, kernel.fileno(), "kernel")
            kernel.seek(0)
            return kernel.read()
    except OSError as err:
        raise VmmError(f"cannot read kernel {path}: {err.strerror}") from err
