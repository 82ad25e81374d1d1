import subprocess
import sys

import pytest

from microvmm.diag.kconfig_check import REQUIREMENTS, ConfigFileError, check, parse_config, report

FULL = "\n".join(f"{req.option}=y" for req in REQUIREMENTS) + "\n# CONFIG_ACPI is not set\n"


def test_complete_config_passes():
    assert check(parse_config(FULL)) == []


def test_missing_and_modular_options_are_named_with_reasons(tmp_path):
    text = FULL.replace("CONFIG_VIRTIO_CONSOLE=y", "CONFIG_VIRTIO_CONSOLE=m") \
               .replace("CONFIG_X86_MPPARSE=y\n", "") \
               .replace("CONFIG_PCI_MSI=y\n", "# CONFIG_PCI_MSI is not set\n")
    path = tmp_path / ".config"
    path.write_text(text)
    out, status = report(path)
    assert status == 1
    assert "missing: CONFIG_VIRTIO_CONSOLE =m" in out
    assert "missing: CONFIG_X86_MPPARSE is not set: without ACPI" in out
    assert "recommended: CONFIG_PCI_MSI is not set" in out
    assert "2 required option(s) missing" in out


def test_only_recommended_missing_still_boots(tmp_path):
    path = tmp_path / ".config"
    path.write_text(FULL.replace("CONFIG_MAGIC_SYSRQ=y", ""))
    out, status = report(path)
    assert status == 0 and "recommended: CONFIG_MAGIC_SYSRQ" in out


def test_not_a_config_is_an_error(tmp_path):
    path = tmp_path / "x"
    path.write_text("hello\n")
    with pytest.raises(ConfigFileError, match="no CONFIG_ lines"):
        report(path)


def test_cli_exit_codes(tmp_path):
    good = tmp_path / "good"
    good.write_text(FULL)
    bad = tmp_path / "bad"
    bad.write_text(FULL.replace("CONFIG_PCI=y", ""))
    run = lambda *a: subprocess.run([sys.executable, "-m", "microvmm", "check-config", *a],
                                    capture_output=True, text=True)
    assert run(str(good)).returncode == 0
    result = run(str(bad))
    assert result.returncode == 1 and "missing: CONFIG_PCI is not set" in result.stdout
    result = run(str(tmp_path / "absent"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "absent" in result.stderr


def test_share_options_are_named_for_share_without_failing_the_boot(tmp_path):
    path = tmp_path / ".config"
    path.write_text(FULL.replace("CONFIG_9P_FS=y", "CONFIG_9P_FS=m").replace("CONFIG_NET_9P_VIRTIO=y\n", ""))
    out, status = report(path)
    assert status == 0
    assert "for --share: CONFIG_9P_FS =m" in out
    assert "for --share: CONFIG_NET_9P_VIRTIO is not set: 9P's virtio transport" in out
