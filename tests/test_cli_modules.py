"""`run --modules DIR` and `--kaslr` on the command line: a usable modules
tree becomes the VmConfig's module list; one that cannot give the guest its
console is refused with one line and status 2 before anything starts; and
`nokaslr` is on the guest's command line unless --kaslr."""

from __future__ import annotations

from pathlib import Path

import pytest

import microvmm.vmm
from microvmm import cli
from microvmm.run.exitcodes import ExitCode
from microvmm.vmconfig import VmConfig
from microvmm.vmconfig import kernel_cmdline
from test_guestmodules import DEBIAN_DEP, VERSION, make_tree


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """(--kernel, --initrd) files: the CLI only checks that they exist (and a bzImage's release)."""
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initramfs.cpio"
    kernel.write_bytes(b"\x7fELF not really")
    initrd.write_bytes(b"070701")
    return kernel, initrd


@pytest.fixture
def vmm_calls(monkeypatch, tmp_path):
    """Replace the VMM: record the VmConfig main() would run."""
    seen: list[VmConfig] = []

    def fake_run_vm(config, preparation=None):
        if preparation is not None:
            preparation.close()
        seen.append(config)
        return 0

    monkeypatch.setattr(microvmm.vmm, "run_vm", fake_run_vm)
    monkeypatch.setenv("MICROVMM_IMAGES", str(tmp_path / "no-images"))
    return seen


def usage_error(capsys, argv: list[str]) -> str:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    assert status == ExitCode.USAGE, err
    assert len(err.splitlines()) == 1 and err.startswith("microvmm: error: "), err
    assert out == ""
    return err


def test_modules_of_an_install_mod_path_root_reach_the_config_in_load_order(tmp_path, files, vmm_calls):
    make_tree(tmp_path / "mods")
    kernel, initrd = files
    assert cli.main(["run", "--kernel", str(kernel), "--initrd", str(initrd),
                     "--modules", str(tmp_path / "mods"), "--", "true"]) == 0
    (config,) = vmm_calls
    assert [m.name for m in config.initrd_modules] == [
        "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_ring", "virtio", "virtio_pci", "virtio_console"]
    assert config.initrd_modules[0].path.is_file()
    assert not config.kaslr


def test_without_the_console_driver_a_command_run_is_refused(tmp_path, files, vmm_calls, capsys):
    dep = DEBIAN_DEP.replace("kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko "
                             "kernel/drivers/virtio/virtio_ring.ko\n", "")
    make_tree(tmp_path / "mods", dep)
    kernel, initrd = files
    err = usage_error(capsys, ["run", "--kernel", str(kernel), "--initrd", str(initrd),
                               "--modules", str(tmp_path / "mods"), "--", "true"])
    assert "virtio_console neither built in" in err and VERSION in err
    assert vmm_calls == []
    # Without ports or a command the console is optional: the rest is loaded.
    assert cli.main(["run", "--kernel", str(kernel), "--initrd", str(initrd),
                     "--modules", str(tmp_path / "mods")]) == 0
    assert vmm_calls[0].initrd_modules[-1].name == "virtio_pci"


@pytest.mark.parametrize("case", ["missing", "no-initrd", "two-kernels"])
def test_bad_modules_directories_get_one_line_and_status_2(tmp_path, files, vmm_calls, capsys, case):
    kernel, initrd = files
    mods = tmp_path / "mods"
    args = ["run", "--kernel", str(kernel), "--initrd", str(initrd), "--modules", str(mods)]
    if case == "missing":
        expected = "no such directory"
    elif case == "no-initrd":
        make_tree(mods)
        args[4] = "none"
        expected = "--modules needs an initramfs"
    else:
        make_tree(mods)
        (mods / "lib/modules/5.10.0-other").mkdir()
        (mods / "lib/modules/5.10.0-other/modules.dep").write_text("")
        expected = "holds modules for 2 kernels"
    assert expected in usage_error(capsys, args)
    assert vmm_calls == []


def test_nokaslr_is_added_unless_kaslr_is_asked_for(tmp_path, files, vmm_calls):
    kernel, _ = files
    assert cli.main(["run", "--kernel", str(kernel), "--initrd", "none"]) == 0
    assert cli.main(["run", "--kernel", str(kernel), "--initrd", "none", "--kaslr"]) == 0
    default, kaslr = vmm_calls
    assert not default.kaslr and kaslr.kaslr
    assert "nokaslr" in kernel_cmdline(default.cmdline, (), None, kaslr=default.kaslr).split()
    assert "nokaslr" not in kernel_cmdline(kaslr.cmdline, (), None, kaslr=kaslr.kaslr).split()
    # Host additions and the user's own line are kept; init's arguments stay last.
    assert kernel_cmdline("console=ttyS0 -- single", ("noxsave",), None) == "console=ttyS0 noxsave nokaslr -- single"


@pytest.mark.parametrize("driver_seen, hinted", [(False, True), (True, False)])
def test_a_command_without_result_says_when_no_virtio_driver_ever_came(files, driver_seen, hinted):
    """A distribution kernel booted without --modules: the guest never drives
    the console device, the command never reports; the verdict says why."""
    from types import SimpleNamespace

    from microvmm.vmm import Vmm
    kernel, initrd = files
    vmm = Vmm(VmConfig(kernel=kernel, initrd=initrd, cmdline="console=ttyS0", command=["true"]))
    vmm._console_transport = SimpleNamespace(driver_seen=driver_seen)
    outcome = vmm._outcome()
    assert outcome.exit_code == ExitCode.NO_RESULT
    assert ("never started the virtio-console device" in outcome.summary) is hinted
    assert ("--modules DIR" in outcome.summary) is hinted
