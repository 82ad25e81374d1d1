"""pytest plugin: boot microvmm guests from tests and run commands in them.

Loaded through the `pytest11` entry point of the installed package. It adds

* options `--microvmm-kernel PATH`, `--microvmm-initrd PATH` (default: the
  default images, see `microvmm.images`; a test that asks for a VM is
  skipped, saying so, when there are none), `--microvmm-arg ARG`
  (repeatable: extra `microvmm run` arguments for every VM) and
  `--microvmm-boot-timeout SECONDS`;
* the factory fixtures `microvm` (VMs live for one test), `microvm_module`
  and `microvm_session` (VMs live for the module / session; a second call
  with the same arguments returns the VM already booted):

      def test_driver(microvm):
          vm = microvm(ports=["data"], mem="64M")
          status, out, err = vm.run("cat /sys/class/virtio-ports/*/name")
          vm.port("data").write(b"ping\\n")
          vm.port("data").expect(rb"pong", timeout=30)

* the guest's console log (and microvmm's own output) as a report section of
  every failing test that used one of the fixtures.

A VM is a `microvmm run` child process. Its serial console goes to a log
file; the virtio-console ports `microvmm.agent`, `microvmm.stdout`,
`microvmm.stderr` and the test's own ports are unix socket servers this
plugin connects to. The default initramfs then starts an agent that runs the
commands sent on `microvmm.agent` (protocol: guest/README.md, "Running
commands"); a user's own initramfs can do the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from microvmm.testing.vm import DEFAULT_BOOT_TIMEOUT, MicroVM, VmSpec, kvm_unusable_reason

# A report section shows at most this much of the console log (the end of it).
REPORT_LOG_LIMIT = 64 * 1024


@dataclass
class MicroVMFactory:
    """`factory(ports=..., mem=..., cmdline_append=..., extra_args=..., boot_timeout=...)`
    boots a VM (or returns the one it already booted with the same arguments)."""
    kernel: Path
    initrd: Path | None
    default_args: tuple[str, ...]
    boot_timeout: float
    log_dir: Path
    #: Why no VM can be booted: the default images are not there (a skip, not a failure).
    missing_images: str | None = None
    vms: list[MicroVM] = field(default_factory=list)
    _cache: dict[VmSpec, MicroVM] = field(default_factory=dict)

    def __call__(self, ports: list[str] | tuple[str, ...] = (), mem: str = "64M", cmdline_append: str = "",
                 extra_args: list[str] | tuple[str, ...] = (), boot_timeout: float | None = None,
                 control: bool = False) -> MicroVM:
        reason = kvm_unusable_reason()
        if reason:
            pytest.skip(reason)
        if self.missing_images:
            pytest.skip(self.missing_images)
        spec = VmSpec(self.kernel, self.initrd, tuple(ports), mem, cmdline_append,
                      self.default_args + tuple(extra_args), control)
        cached = self._cache.get(spec)
        if cached is not None and cached.healthy:
            return cached
        if cached is not None:
            cached.close(graceful=False)
        vm = MicroVM(spec, self.log_dir, name=f"vm{len(self.vms) + 1}")
        self.vms.append(vm)
        vm.boot(self.boot_timeout if boot_timeout is None else boot_timeout)
        self._cache[spec] = vm
        return vm

    def close_all(self) -> None:
        errors = []
        for vm in self.vms:
            try:
                vm.close()
            except Exception as err:  # close every VM before reporting
                errors.append(err)
        self._cache.clear()
        if errors:
            raise errors[0]


_ACTIVE_FACTORIES = pytest.StashKey[dict[str, MicroVMFactory]]()
_LOG_STARTS = pytest.StashKey[dict[int, int]]()
FIXTURE_NAMES = ("microvm", "microvm_module", "microvm_session")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("microvmm", "microvmm guests (the microvm fixtures)")
    group.addoption("--microvmm-kernel", metavar="PATH",
                    help="kernel to boot (bzImage or vmlinux; default: vmlinux of the default images)")
    group.addoption("--microvmm-initrd", metavar="PATH",
                    help="initramfs (default: initramfs.cpio of the default images; 'none' for none)")
    group.addoption("--microvmm-arg", metavar="ARG", action="append", default=[],
                    help="extra `microvmm run` argument for every VM (repeatable), "
                         "e.g. --microvmm-arg=--cpus=2")
    group.addoption("--microvmm-boot-timeout", metavar="SECONDS", type=float, default=DEFAULT_BOOT_TIMEOUT,
                    help=f"seconds a guest may take to boot to its agent (default {DEFAULT_BOOT_TIMEOUT:g})")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ACTIVE_FACTORIES] = {}


def _make_factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MicroVMFactory:
    from microvmm.images import BUILD_HINT, INITRD_IMAGE, KERNEL_IMAGE, default_images_dir
    config = request.config
    images = default_images_dir()
    kernel_option = config.getoption("microvmm_kernel")
    initrd_option = config.getoption("microvmm_initrd")
    kernel = Path(kernel_option) if kernel_option else images / KERNEL_IMAGE
    initrd = (None if initrd_option == "none"
              else Path(initrd_option) if initrd_option else images / INITRD_IMAGE)
    # A default image that is not there skips (the machine is not set up for
    # guests); a path the user gave that is not there fails (MicroVM.boot).
    defaults = [path for path, option in ((kernel, kernel_option), (initrd, initrd_option))
                if path is not None and not option]
    missing = [path for path in defaults if not path.is_file()]
    why = (f"no microvmm guest image {missing[0]}: {BUILD_HINT}, or pass --microvmm-kernel/--microvmm-initrd"
           if missing else None)
    return MicroVMFactory(kernel=kernel, initrd=initrd,
                          default_args=tuple(config.getoption("microvmm_arg")),
                          boot_timeout=config.getoption("microvmm_boot_timeout"),
                          log_dir=tmp_path_factory.mktemp("microvm", numbered=True),
                          missing_images=why)


def _factory_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                     name: str) -> Iterator[MicroVMFactory]:
    factory = _make_factory(request, tmp_path_factory)
    active = request.config.stash[_ACTIVE_FACTORIES]
    active[name] = factory
    try:
        yield factory
    finally:
        try:
            factory.close_all()
        finally:
            active.pop(name, None)


@pytest.fixture
def microvm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroVMFactory]:
    """Factory of VMs that are powered off at the end of the test."""
    yield from _factory_fixture(request, tmp_path_factory, "microvm")


@pytest.fixture(scope="module")
def microvm_module(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroVMFactory]:
    """Factory of VMs shared by a module's tests (same arguments, same VM)."""
    yield from _factory_fixture(request, tmp_path_factory, "microvm_module")


@pytest.fixture(scope="session")
def microvm_session(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroVMFactory]:
    """Factory of VMs shared by the whole session (same arguments, same VM)."""
    yield from _factory_fixture(request, tmp_path_factory, "microvm_session")


# --------------------------------------------------------------------------- console logs in reports


def _vms_of(item: pytest.Item) -> list[MicroVM]:
    active = item.config.stash.get(_ACTIVE_FACTORIES, {})
    vms: list[MicroVM] = []
    for name in FIXTURE_NAMES:
        if name in getattr(item, "fixturenames", ()) and name in active:
            vms.extend(active[name].vms)
    return vms


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    # Where each already running VM's log stands: a shared VM's report shows
    # what this test added, not the whole session's console.
    item.stash[_LOG_STARTS] = {id(vm): vm.log_size() for vm in _vms_of(item)}
    yield


def console_report_sections(item: pytest.Item) -> list[tuple[str, str]]:
    """(title, text) of the console log of every VM the test used (from where the test began)."""
    starts = item.stash.get(_LOG_STARTS, {})
    sections = []
    for vm in _vms_of(item):
        start = starts.get(id(vm), 0)
        try:
            with open(vm.log_path, "rb") as log:
                log.seek(start)
                data = log.read()
        except OSError:
            data = b""
        if start and not data:
            continue  # a shared VM this test did not make say anything
        if len(data) > REPORT_LOG_LIMIT:
            data = b"[... earlier output cut ...]\n" + data[-REPORT_LOG_LIMIT:]
        text = data.decode(errors="replace")
        where = " since the test began" if start else ""
        sections.append((f"microvm console log {vm.name}{where} ({vm.log_path})", text))
        if not vm.alive and vm.vmm_output:
            sections.append((f"microvm microvmm output {vm.name} ({vm.vmm_log_path})",
                             vm.vmm_output[-REPORT_LOG_LIMIT:]))
    return sections


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.extend(console_report_sections(item))
