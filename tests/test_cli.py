"""The `microvmm` command line: every bad input is refused with one error line
naming the bad value and exit status 2, before any VM work starts; the help
documents every option and the exit codes; the default command line follows
the console ports.

No guest is booted: main() hands a valid VmConfig to microvmm.vmm.run_vm,
which the tests replace to capture it (or to fail loudly if reached).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import microvmm.vmm
from microvmm import cli
from microvmm.cli import DEFAULT_CMDLINE, UsageError, parse_size
from microvmm.run.exitcodes import ExitCode

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    """A file to pass as --kernel: the CLI only checks that it exists."""
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF not really")
    return path


@pytest.fixture
def captured_config(monkeypatch, tmp_path):
    """Replace the VMM: record the VmConfig main() would run, return 0."""
    seen = []

    def fake_run_vm(config, preparation=None):
        if preparation is not None:
            preparation.close()  # what the CLI started for the VMM: its threads, the VM, guest RAM
        seen.append(config)
        return 0

    monkeypatch.setattr(microvmm.vmm, "run_vm", fake_run_vm)
    monkeypatch.setenv("MICROVMM_IMAGES", str(tmp_path / "no-images"))
    return seen


@pytest.fixture
def no_vm(monkeypatch, tmp_path):
    """Fail the test if main() ever gets as far as starting the VMM."""

    def must_not_run(config, preparation=None):
        if preparation is not None:
            preparation.close()
        raise AssertionError(f"the VMM was started for a bad command line: {config}")

    monkeypatch.setattr(microvmm.vmm, "run_vm", must_not_run)
    monkeypatch.setenv("MICROVMM_IMAGES", str(tmp_path / "no-images"))


def run_main(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, err.splitlines(), out


def assert_usage_error(capsys, argv: list[str], *names: str) -> str:
    """main(argv) fails with status 2 and exactly one error line naming `names`."""
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors exit instead of returning
        status = exc.code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert status == ExitCode.USAGE == 2, (argv, err)
    assert len(lines) == 1, f"expected one error line for {argv}, got:\n{err}"
    assert lines[0].startswith("microvmm"), lines
    assert "error" in lines[0]
    for name in names:
        assert name in lines[0], f"the error does not name {name!r}: {lines[0]}"
    assert out == ""
    return lines[0]


# -- as a user runs it: a subprocess ---------------------------------------

def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, MICROVMM_IMAGES="/nonexistent-images")
    return subprocess.run([sys.executable, "-m", "microvmm", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, bad", [
    (["--mem", "garbage"], "garbage"),
    (["--cpus", "0"], "0"),
    (["--queue-size", "3"], "3"),
    (["--serial", "tcp:1234"], "tcp:1234"),
    (["--console", "bogus:p0"], "bogus"),
])
def test_subprocess_bad_input_exits_2_with_one_line(kernel, args, bad):
    started = time.monotonic()
    result = run_cli("run", "--kernel", str(kernel), "--initrd", "none", *args)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("microvmm: error: ")
    assert bad in lines[0]
    assert result.stdout == ""
    # Nothing started: no host announcement, no VM, answered at once.
    assert "KVM" not in result.stderr
    assert time.monotonic() - started < 15


def test_subprocess_missing_kernel_is_named(tmp_path):
    missing = tmp_path / "no-such-bzImage"
    result = run_cli("run", "--kernel", str(missing), "--initrd", "none")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"microvmm: error: --kernel {missing}: no such file"]


# -- cli.main() for the rest -------------------------------------------------

def test_missing_initrd_is_named(capsys, no_vm, kernel, tmp_path):
    missing = tmp_path / "initramfs.cpio"
    assert_usage_error(capsys, ["run", "--kernel", str(kernel), "--initrd", str(missing)],
                       "--initrd", str(missing))


def test_default_kernel_missing_says_how_to_get_one(capsys, no_vm):
    line = assert_usage_error(capsys, ["run"], "--kernel")
    assert "make images" in line


@pytest.mark.parametrize("args, names", [
    (["--mem", "garbage"], ["--mem", "garbage"]),
    (["--mem", "1.5G"], ["1.5G"]),
    (["--mem=-1M"], ["-1M"]),
    (["--mem", "64T"], ["64T"]),
    (["--mem", "0"], ["--mem", "0"]),             # no RAM at all
    (["--mem", "1K"], ["--mem", "1K"]),           # far below what a kernel needs
    (["--mem", "1000000G"], ["--mem", "1000000G"]),  # more than fits below the PCI hole
    (["--cpus", "0"], ["--cpus", "0"]),
    (["--cpus", "-2"], ["--cpus", "-2"]),
    (["--cpus", "65"], ["--cpus", "65"]),
    (["--cpus", "abc"], ["--cpus", "abc"]),       # argparse's own type check
    (["--queue-size", "3"], ["--queue-size", "3"]),
    (["--queue-size", "0"], ["--queue-size", "0"]),
    (["--queue-size", "65536"], ["--queue-size", "65536"]),
    (["--serial", "tcp:1234"], ["tcp:1234"]),
    (["--serial", "file:"], ["file:"]),
    (["--serial", ""], ["--serial"]),
    (["--fail-on", "never"], ["--fail-on", "never"]),  # argparse choices
    (["--timeout", "0"], ["--timeout", "0"]),
    (["--timeout", "nan"], ["--timeout", "nan"]),          # nan > 0 is False, but so is nan <= 0
    (["--timeout", "inf"], ["--timeout", "inf"]),
    (["--timeout=-inf"], ["--timeout", "-inf"]),
    (["--boot-timeout", "nan"], ["--boot-timeout", "nan"]),
    (["--boot-timeout", "inf"], ["--boot-timeout", "inf"]),
    (["--idle-timeout", "NaN"], ["--idle-timeout", "nan"]),
    (["--idle-timeout", "infinity"], ["--idle-timeout", "inf"]),
    (["--profile-rate", "nan"], ["--profile-rate", "nan"]),
    (["--profile-rate", "inf"], ["--profile-rate", "inf"]),
    (["--mem", "64B"], ["--mem", "64B"]),                  # bytes, not MiB: refused
    (["--mem", "64iB"], ["--mem", "64iB"]),
    (["--expect", "("], ["--expect", "("]),
    (["--append", "x" * 2100], ["command line", "2047"]),  # Linux would cut it
])
def test_bad_option_values(capsys, no_vm, kernel, args, names):
    assert_usage_error(capsys, ["run", "--kernel", str(kernel), "--initrd", "none", *args], *names)


@pytest.mark.parametrize("specs, names", [
    (["bogus:p0"], ["bogus"]),                       # unknown backend
    (["pty:"], ["pty:"]),                            # missing name
    (["@pty"], ["pty"]),                             # no ':name' at all
    (["file:log"], ["file:log", "portpath"]),        # file needs =PATH
    (["socket:ctl:server"], ["socket:ctl:server", "portpath"]),
    (["tty:t0"], ["tty:t0", "portpath"]),
    (["socket:ctl=/tmp/x.sock"], ["socket:ctl=/tmp/x.sock", "server"]),
    (["pty:p0=/dev/x"], ["/dev/x"]),                 # pty takes no path
    (["pty:same", "file:same=/tmp/f"], ["same", "duplicate"]),
    ([f"pty:p{i}" for i in range(17)], ["pty:p16", "16"]),
    (["stdio:a", "stdio:b"], ["stdio:b", "stdio"]),
    (["pty:bad/name"], ["bad/name"]),
])
def test_bad_console_ports(capsys, no_vm, kernel, specs, names):
    argv = ["run", "--kernel", str(kernel), "--initrd", "none", "--serial", "off"]
    for spec in specs:
        argv += ["--console", spec]
    assert_usage_error(capsys, argv, *names)


def test_bad_device_option(capsys, no_vm, kernel):
    assert_usage_error(capsys, ["run", "--kernel", str(kernel), "--initrd", "none",
                                "--device", "virtio-blk,pty:p0"], "virtio-blk")
    assert_usage_error(capsys, ["run", "--kernel", str(kernel), "--initrd", "none",
                                "--device", "virtio-console,pty:a,pty:a"], "'a'", "duplicate")


def test_ports_are_counted_across_console_and_device(capsys, no_vm, kernel):
    argv = ["run", "--kernel", str(kernel), "--initrd", "none", "--serial", "off",
            "--device", "virtio-console," + ",".join(f"pty:d{i}" for i in range(10))]
    for i in range(7):
        argv += ["--console", f"pty:c{i}"]
    assert_usage_error(capsys, argv, "too many ports")


def test_serial_stdio_and_a_stdio_console_port_conflict(capsys, no_vm, kernel):
    # --serial defaults to stdio.
    line = assert_usage_error(capsys, ["run", "--kernel", str(kernel), "--initrd", "none",
                                       "--console", "@stdio:con"], "--serial stdio", "stdio")
    assert "--serial off" in line  # says how to fix it


def test_serial_off_with_a_stdio_console_port_is_accepted(capsys, captured_config, kernel):
    status, err, _ = run_main(capsys, ["run", "--kernel", str(kernel), "--initrd", "none",
                                       "--serial", "off", "--console", "@stdio:con"])
    assert status == 0, err
    (config,) = captured_config
    assert config.serial.kind == "off"
    assert [str(p) for p in config.ports] == ["@stdio:con"]


def test_the_cyclic_collector_is_paused_for_start_up_only(capsys, monkeypatch, tmp_path, kernel):
    """main() turns the collector off while it parses and imports (start-up time)
    and back on before the VMM runs, and after a usage error too."""
    import gc
    seen = []

    def fake_run_vm(config, preparation=None):
        if preparation is not None:
            preparation.close()
        seen.append(gc.isenabled())
        return 0

    def fake_config(args):
        seen.append(gc.isenabled())
        return real_config(args)
    real_config = cli._config_from_args
    monkeypatch.setattr(microvmm.vmm, "run_vm", fake_run_vm)
    monkeypatch.setattr(cli, "_config_from_args", fake_config)
    monkeypatch.setenv("MICROVMM_IMAGES", str(tmp_path / "no-images"))
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    status, err, _ = run_main(capsys, ["run", "--kernel", str(kernel), "--initrd", "none"])
    assert status == 0, err
    assert seen == [False, True] and gc.isenabled()
    assert gc.get_freeze_count() == frozen  # called with an argv: nothing frozen
    assert_usage_error(capsys, ["run", "--kernel", str(kernel), "--initrd", "none", "--cpus", "0"], "--cpus")
    assert gc.isenabled()


def test_the_microvmm_command_freezes_what_start_up_built(kernel):
    """As the process's entry point (no argv), main() freezes the objects start-up
    built before it turns the collector back on for the VMM."""
    code = ("import gc, sys\n"
            "import microvmm.vmm\n"
            "def fake_run_vm(config, preparation=None):\n"
            "    if preparation is not None:\n"
            "        preparation.close()\n"
            "    print('frozen', gc.get_freeze_count(), gc.isenabled())\n"
            "    return 0\n"
            "microvmm.vmm.run_vm = fake_run_vm\n"
            "from microvmm import cli\n"
            f"sys.argv = ['microvmm', 'run', '--kernel', {str(kernel)!r}, '--initrd', 'none']\n"
            "sys.exit(cli.main())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    _, count, enabled = proc.stdout.split()
    assert int(count) > 10_000 and enabled == "True"


def test_guest_command_after_dashdash(capsys, no_vm, kernel):
    assert_usage_error(capsys, ["run", "--kernel", str(kernel), "--initrd", "none", "--"], "--")


# -- sizes -------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("64M", 64 * MiB),
    ("64m", 64 * MiB),
    ("64", 64 * MiB),          # a bare number is MiB, as in QEMU's -m
    ("1G", 1 << 30),
    ("2g", 2 << 30),
    ("131072K", 128 * MiB),
    ("512k", 512 << 10),
    ("64MiB", 64 * MiB),
    ("64MB", 64 * MiB),
    ("1GiB", 1 << 30),
    (" 96M ", 96 * MiB),
])
def test_parse_size_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1M", "64T", "0x40M", "64 M", "sixty",
                                  "64B", "64b", "64iB", "MiB", "64KiBB"])
def test_parse_size_rejects_and_names_the_value(text):
    with pytest.raises(UsageError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_a_size_in_bytes_says_why_it_is_refused():
    with pytest.raises(UsageError, match="too small.*64M"):
        parse_size("64B")


def test_a_guest_command_of_any_length_leaves_the_kernel_cmdline_alone(capsys, captured_config, kernel):
    """The command travels in the initramfs (vmm.COMMAND_FILE): a 64 KiB one is
    accepted, and only a short one is also put on the command line."""
    from microvmm.host.hostinfo import HostKind, host_quirks
    from microvmm.vmconfig import COMMAND_PARAM, COMMAND_PARAM_CMDLINE_LIMIT, kernel_cmdline
    additions = host_quirks(HostKind.EMULATING, "test").cmdline_additions
    status, err, _ = run_main(capsys, ["run", "--kernel", str(kernel), "--initrd", "none",
                                       "--", "echo", "y" * 65536])
    assert status == 0, err
    (config,) = captured_config
    long_line = kernel_cmdline(config.cmdline, additions, config.command)
    assert COMMAND_PARAM not in long_line and len(long_line) <= COMMAND_PARAM_CMDLINE_LIMIT
    assert f"{COMMAND_PARAM}=" in kernel_cmdline(config.cmdline, additions, ["echo", "hi"])


def test_every_command_line_we_build_fits_what_the_kernel_reads(capsys, captured_config, kernel):
    """With the emulating host's workarounds (the longest additions) and a
    modest command, the full command line stays within COMMAND_LINE_SIZE, and
    clearcpuid's value within the 127 characters Linux 6.1 copies."""
    from microvmm.host.hostinfo import CLEARCPUID_MAX_LENGTH, HostKind, host_quirks
    from microvmm.vmconfig import KERNEL_CMDLINE_MAX, kernel_cmdline
    additions = host_quirks(HostKind.EMULATING, "test").cmdline_additions
    for args in ([], ["--console", "@pty:p0"]):
        status, err, _ = run_main(capsys, ["run", "--kernel", str(kernel), "--initrd", "none", *args,
                                           "--", "sh", "-c", "uname -a; cat /proc/cpuinfo"])
        assert status == 0, err
        config = captured_config.pop()
        full = kernel_cmdline(config.cmdline, additions, config.command)
        assert len(full.encode()) <= KERNEL_CMDLINE_MAX
        for token in full.split():
            if token.startswith("clearcpuid="):
                assert len(token) - len("clearcpuid=") <= CLEARCPUID_MAX_LENGTH


def test_version_from_the_package_metadata():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"microvmm {cli.package_version()}"
    assert cli.package_version() != "unknown"


def test_version_falls_back_to_pyproject(monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "version", not_installed)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{cli.package_version()}"' in pyproject


def test_check_host_reports_the_kvm_device(monkeypatch, capsys):
    from microvmm.host import hostinfo
    from microvmm.host.hostinfo import KvmDeviceStatus
    monkeypatch.setattr(hostinfo, "check_kvm_device",
                        lambda path="/dev/kvm": KvmDeviceStatus(path, False, "No such file or directory: load kvm"))
    status = cli.main(["check-host"])
    out = capsys.readouterr().out
    assert status == 1
    assert "/dev/kvm: not usable: No such file or directory" in out


def test_check_host_opens_a_missing_device_and_says_so(tmp_path):
    from microvmm.host.hostinfo import check_kvm_device
    missing = check_kvm_device(str(tmp_path / "kvm"))
    assert not missing.usable and "No such file" in missing.summary
    not_kvm = tmp_path / "plain"
    not_kvm.write_text("")
    device = check_kvm_device(str(not_kvm))
    assert not device.usable and "not a KVM device" in device.summary


def test_check_host_on_this_machine():
    result = run_cli("check-host")
    usable = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    assert result.returncode == (0 if usable else 1), result.stdout + result.stderr
    assert "/dev/kvm: " in result.stdout
    if usable:
        assert "usable (KVM API version 12)" in result.stdout
    from microvmm.host.hostinfo import HostKind, detect_host_kind
    listed = result.stdout.split("host workarounds run applies: ", 1)[1]
    if detect_host_kind()[0] is HostKind.EMULATING:
        assert "\n  int3-as-bp: " in listed and "\n  cmdline: " in listed, result.stdout
    else:
        assert listed.strip() == "none", result.stdout


def test_mem_reaches_the_config_in_bytes(capsys, captured_config, kernel):
    status, err, _ = run_main(capsys, ["run", "--kernel", str(kernel), "--initrd", "none",
                                       "--mem", "128M", "--cpus", "2", "--queue-size", "256"])
    assert status == 0, err
    (config,) = captured_config
    assert (config.mem_size, config.cpus, config.queue_size) == (128 * MiB, 2, 256)
    assert config.kernel == kernel and config.initrd is None


# -- help --------------------------------------------------------------------

def _run_subparser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["run"]


def test_help_documents_every_option_with_an_example_and_the_exit_codes():
    result = run_cli("run", "--help")
    assert result.returncode == 0
    text = result.stdout
    run = _run_subparser()
    checked = 0
    for action in run._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        long_option = max(action.option_strings, key=len)
        assert long_option in text, f"{long_option} missing from --help"
        assert action.help, f"{long_option} has no help text"
        if action.nargs != 0:  # options that take a value show an example of it
            assert "e.g. " + long_option in " ".join(action.help.split()), \
                f"{long_option}: no example in its help: {action.help!r}"
        checked += 1
    assert checked >= 20  # the parser was really inspected
    # Exit statuses: every ExitCode and the signal range, with a meaning each.
    lines = text.splitlines()
    for code in ExitCode:
        assert any(line.strip().startswith(f"{code.value} ") for line in lines), \
            f"exit status {code.value} ({code.name}) is not documented in --help"
    assert any(line.strip().startswith("128+N") for line in lines)
    assert "examples:" in text and "microvmm run --kernel bzImage --console @pty:p0" in text


def test_top_level_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "check-host", "check-config"):
        assert command in result.stdout


# -- default command line ----------------------------------------------------

@pytest.mark.parametrize("args, cmdline, default_console", [
    ([], DEFAULT_CMDLINE, True),
    (["--console", "@pty:p0"], DEFAULT_CMDLINE, True),       # console= is the VMM's (vmm.plan_kernel_console)
    (["--console", "@pty:p0", "--cmdline", "console=ttyS0 quiet"], "console=ttyS0 quiet", False),
    (["--console", "@pty:p0", "--append", "initcall_debug"], DEFAULT_CMDLINE + " initcall_debug", True),
    (["--cmdline", "root=/dev/vda", "--append", "quiet"], "root=/dev/vda quiet", False),
])
def test_default_cmdline_leaves_the_console_to_the_vmm(capsys, captured_config, kernel, args, cmdline,
                                                       default_console):
    status, err, _ = run_main(capsys, ["run", "--kernel", str(kernel), "--initrd", "none", *args])
    assert status == 0, err
    (config,) = captured_config
    assert (config.cmdline, config.default_console) == (cmdline, default_console)
    assert "console=" not in DEFAULT_CMDLINE


def test_the_kernel_log_port_name_is_reserved(capsys, kernel):
    status, err, _ = run_main(capsys, ["run", "--kernel", str(kernel), "--console", "pty:microvmm.kmsg"])
    assert status == 2 and "microvmm.kmsg" in "".join(err)
