"""`--device` repeated: the first virtio-console shares its device with
--console, each further one is a device of its own; virtio-rng options; port
names, the terminal and socket paths shared by all consoles; and where the
kernel's log goes when a further device has console ports. No guest is booted."""

from __future__ import annotations

from pathlib import Path

from microvmm.devices.virtio_rng import RngOptions
from microvmm.virtio_console.spec import parse_port_spec
from microvmm.vmconfig import VmConfig
from microvmm.vmm import plan_kernel_console
from tests.test_cli import assert_usage_error, captured_config, kernel, no_vm, run_main  # noqa: F401

BASE = ["run", "--initrd", "none", "--serial", "off"]


def test_each_further_virtio_console_is_a_device_of_its_own(capsys, captured_config, kernel):
    status, err, _ = run_main(capsys, [*BASE, "--kernel", str(kernel), "--console", "pty:c0",
                                       "--device", "virtio-console,pty:d0",
                                       "--device", "virtio-rng,max-bytes=100,period=10",
                                       "--device", "virtio-console,pty:e0,pty:e1"])
    assert status == 0, err
    (config,) = captured_config
    assert [p.name for p in config.ports] == ["c0", "d0"]  # the first device, as before
    assert [(d.kind, d.options) for d in config.devices] == [
        ("virtio-rng", RngOptions(100, 10)),
        ("virtio-console", [parse_port_spec("pty:e0"), parse_port_spec("pty:e1")])]
    assert [p.name for p in config.all_ports] == ["c0", "d0", "e0", "e1"]


def test_ports_are_counted_per_device(capsys, captured_config, kernel):
    sixteen = ",".join(f"pty:a{i}" for i in range(16))
    other = ",".join(f"pty:b{i}" for i in range(16))
    status, err, _ = run_main(capsys, [*BASE, "--kernel", str(kernel), "--device", f"virtio-console,{sixteen}",
                                       "--device", f"virtio-console,{other}"])
    assert status == 0, err


def test_what_consoles_share_is_checked_across_devices(capsys, no_vm, kernel):
    argv = [*BASE, "--kernel", str(kernel)]
    assert_usage_error(capsys, [*argv, "--device", "virtio-console,pty:same",
                                "--device", "virtio-console,pty:same"], "same", "duplicate")
    assert_usage_error(capsys, [*argv, "--console", "stdio:a", "--device", "virtio-console,pty:x",
                                "--device", "virtio-console,stdio:b"], "stdio:b", "stdio")
    assert_usage_error(capsys, [*argv, "--device", "virtio-console,socket:s=/tmp/x.sock:server",
                                "--device", "virtio-console,socket:t=/tmp/x.sock:client"], "/tmp/x.sock")
    assert_usage_error(capsys, [*argv, "--device", "virtio-console,pty:a",
                                "--device", "virtio-console,pty:microvmm.kmsg"], "microvmm.kmsg")
    assert_usage_error(capsys, [*argv, "--device", "virtio-console,pty:a",
                                "--device", "virtio-console"], "virtio-console", "port")


def test_bad_rng_options_are_one_error_line(capsys, no_vm, kernel):
    for option, token in (("virtio-rng,max-bytes=-1", "max-bytes=-1"), ("virtio-rng,rate=5", "rate=5"),
                          ("virtio-rng,period=100", "period")):
        assert_usage_error(capsys, [*BASE, "--kernel", str(kernel), "--device", option], token)


def test_console_ports_on_a_further_device_send_the_kernel_log_to_the_serial_line(tmp_path: Path):
    from microvmm.devmgr.registry import parse_device_option
    kernel_path = tmp_path / "vmlinux"
    kernel_path.write_bytes(b"\x7fELF")
    (tmp_path / "System.map").write_text("ffffffff811c7510 t virtcons_probe\n")

    def plan(*devices: str):
        return plan_kernel_console(VmConfig(
            kernel=kernel_path, initrd=None, cmdline="reboot=k panic=-1", default_console=True,
            ports=[parse_port_spec("@pty:p0")], devices=tuple(parse_device_option(d) for d in devices)))
    # Plain ports on the second device: the log port stays, after the first device's console.
    kept = plan("virtio-console,pty:x", "virtio-rng")
    assert kept.kmsg and kept.cmdline_additions[0] == "console=hvc1"
    # A console there: hvc numbers follow the guest's probe order, so the serial line.
    moved = plan("virtio-console,@pty:x")
    assert not moved.kmsg and "further virtio-console" in moved.why
    assert moved.cmdline_additions == ("console=ttyS0", "console=hvc0")
