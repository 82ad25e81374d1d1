"""The virtio-console end to end, through the real booted guest on KVM.

One guest per interrupt mode (MSI-X, the default, and INTx with `pci=nomsi`),
each with ACRN's port mix: the shell on a stdio console port, a second console
port on a pty, a plain (non-console) pty port, a file port and a unix socket
server port; the COM1 UART goes to a file, since stdio is taken. Data is checked
byte for byte in both directions through /dev/vportNpM.

A boot costs about a minute on an emulating KVM host: the tests of a mode share
one boot and run in file order; the last one powers the guest off.
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from microvmm.testing import GuestProcess
from tests.e2e_support import (GUEST_TEST_TIMEOUT, announced_ptys, assert_guest_file, assert_no_more_data,
                               assert_no_stray_processes, boot, connect_unix, open_pty_slave, read_exact,
                               socket_path_in, start_command, virtio_ports, write_all, write_pattern)

# A guest boot and its commands; nothing may hang the run.
pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

PORT_NAMES = ["con", "tty1", "raw", "log", "sock"]  # port 0 first, as given on the command line
# After the user's ports: the kernel's log port (a console: hvc2, after con's
# hvc0 and tty1's hvc1).
GUEST_PORTS = [*PORT_NAMES, "microvmm.kmsg"]
COMMAND_TIMEOUT = 120


@dataclass
class ConsoleGuest:
    guest: GuestProcess
    mode: str
    log_path: Path
    socket_path: Path
    serial_path: Path
    ptys: dict[str, str]       # port name -> host pty slave path
    vports: dict[str, str]     # port name -> guest /dev/vportNpM
    pattern: bytes             # what the guest's /tmp/pattern holds


MODES = {"msix": (), "intx": ("--append", "pci=nomsi")}


@pytest.fixture(scope="module", params=list(MODES))
def vm(request, tmp_path_factory):
    # tmp_path_factory keeps paths short: a unix socket path must fit in 108 bytes.
    work = tmp_path_factory.mktemp(f"con-{request.param}")
    paths = {"log": work / "port.log", "sock": socket_path_in(work, "port.sock"), "serial": work / "serial.log"}
    started = time.monotonic()
    guest = boot("--console", "@stdio:con", "--console", "@pty:tty1", "--console", "pty:raw",
                 "--console", f"file:log={paths['log']}", "--console", f"socket:sock={paths['sock']}:server",
                 "--serial", f"file:{paths['serial']}", *MODES[request.param])
    print(f"\n[{request.param}] booted to a shell in {time.monotonic() - started:.1f} s")
    try:
        ptys = announced_ptys(guest)
        assert len(ptys) == 2, f"expected two pty announcements on stderr:\n{guest.stderr.text}"
        yield ConsoleGuest(guest=guest, mode=request.param, log_path=paths["log"], socket_path=paths["sock"],
                           serial_path=paths["serial"], ptys=dict(zip(["tty1", "raw"], ptys)),
                           vports=virtio_ports(guest), pattern=write_pattern(guest, "/tmp/pattern"))
    finally:
        guest.kill()
        assert_no_stray_processes(guest)
        # A killed VMM must not leave its socket behind either (SIGTERM ends it cleanly).
        leftover = paths["sock"].exists()
        if leftover:
            paths["sock"].unlink()
        assert not leftover, f"{paths['sock']} left behind after the VMM was killed"


def test_shell_is_on_the_stdio_console_port(vm):
    status, out = vm.guest.run("tty; cat /sys/class/tty/console/active")
    assert status == 0, out
    tty_name, active = out.strip().splitlines()
    assert tty_name == "/dev/hvc0"
    # the kernel's console is its own log port, not the shell's: nothing the
    # shell shows is the kernel's, and nothing typed there passes for it
    assert active.split() == ["hvc2"]
    assert not re.search(r"\[\s*\d+\.\d{6}\] ", vm.guest.stdout.text), vm.guest.stdout.text[-2000:]
    # the kernel log (the early part from guest RAM included) went where --serial goes
    serial = vm.serial_path.read_text(errors="replace")
    assert "Linux version" in serial and "Run /init as init process" in serial


def test_every_port_appears_with_its_name(vm):
    assert vm.vports == {name: f"/dev/vport0p{index}" for index, name in enumerate(GUEST_PORTS)}
    status, out = vm.guest.run("cat /sys/class/virtio-ports/vport0p*/name")
    assert status == 0, out
    assert out.split() == GUEST_PORTS
    # console ports are hvc consoles: their vport nodes refuse to open (ENXIO)
    status, out = vm.guest.run("cat /dev/vport0p1 </dev/null")
    assert status != 0 and "No such device or address" in out, out


def _virtio_interrupt_lines(guest: GuestProcess) -> list[str]:
    status, out = guest.run("grep virtio /proc/interrupts")
    assert status == 0, out
    return [line for line in out.splitlines() if "virtio" in line]


def test_interrupt_mode_is_the_configured_one(vm):
    lines = _virtio_interrupt_lines(vm.guest)
    if vm.mode == "msix":
        # a vector each: config, every port's input and output queue, the control
        # receive queue (the control transmit queue has no callback, so no vector)
        assert all("PCI-MSI" in line for line in lines), lines
        assert any("virtio0-config" in line for line in lines), lines
        assert sum("virtio0-input" in line for line in lines) == len(GUEST_PORTS), lines
        assert sum("virtio0-output" in line for line in lines) == len(GUEST_PORTS), lines
    else:
        # one shared, level-triggered line through the IO-APIC
        assert len(lines) == 1, lines
        assert "IO-APIC" in lines[0] and "fasteoi" in lines[0] and "MSI" not in lines[0], lines
    # and interrupts really arrive that way: the counts grow with console output
    before = sum(int(line.split()[1]) for line in lines)
    status, _ = vm.guest.run("seq 1 200 > /dev/null; echo interrupt check")
    after = sum(int(line.split()[1]) for line in _virtio_interrupt_lines(vm.guest))
    assert after > before, (before, after)


def test_pty_port_carries_data_both_ways(vm):
    port = vm.vports["raw"]
    slave = open_pty_slave(vm.ptys["raw"])
    try:
        # guest -> host: the writer waits for the host side to be open (it is).
        status, out = vm.guest.run(f"cat /tmp/pattern > {port}", COMMAND_TIMEOUT)
        assert status == 0, out
        got = read_exact(slave, len(vm.pattern), 60, f"pty {vm.ptys['raw']} reading guest output")
        assert got == vm.pattern
        assert_no_more_data(slave, 0.5, "pty after the guest's output")

        # host -> guest: the guest has the port open before the host writes.
        data = random.Random(1).randbytes(3000)
        reader = start_command(vm.guest, f"{{ echo vport-is-open; head -c {len(data)} > /tmp/from-pty; }} < {port}")
        vm.guest.expect("vport-is-open", COMMAND_TIMEOUT, reader.start)
        write_all(slave, data, 60, f"writing to pty {vm.ptys['raw']}")
        status, out = reader.result(COMMAND_TIMEOUT)
        assert status == 0, out
        assert_guest_file(vm.guest, "/tmp/from-pty", data)
    finally:
        os.close(slave)


def test_second_console_port_is_hvc1_on_its_pty(vm):
    slave = open_pty_slave(vm.ptys["tty1"])
    try:
        status, out = vm.guest.run("echo hello-from-hvc1 > /dev/hvc1")
        assert status == 0, out
        # hvc1 is a terminal: its output processing turns \n into \r\n
        expected = b"hello-from-hvc1\r\n"
        assert read_exact(slave, len(expected), 60, "hvc1 output") == expected
        reader = start_command(vm.guest, "{ stty -echo; echo hvc1-is-open; read -r line; } < /dev/hvc1; "
                                         "echo \"hvc1 read: $line\"")
        vm.guest.expect("hvc1-is-open", COMMAND_TIMEOUT, reader.start)
        write_all(slave, b"typed on tty1\r", 30, "typing on hvc1's pty")
        status, out = reader.result(COMMAND_TIMEOUT)
        assert status == 0, out
        assert "hvc1 read: typed on tty1" in out.splitlines(), out
    finally:
        os.close(slave)


def test_socket_port_carries_data_both_ways(vm):
    port = vm.vports["sock"]
    assert vm.socket_path.is_socket()
    assert (vm.socket_path.stat().st_mode & 0o777) == 0o600
    peer = connect_unix(str(vm.socket_path), 30)
    try:
        # guest -> host
        status, out = vm.guest.run(f"cat /tmp/pattern > {port}", COMMAND_TIMEOUT)
        assert status == 0, out
        got = read_exact(peer.fileno(), len(vm.pattern), 60, "socket peer reading guest output")
        assert got == vm.pattern

        # host -> guest, sent BEFORE the guest opens the port: the VMM must hold
        # it (Linux drops data that arrives on a port nobody has open).
        data = random.Random(2).randbytes(3000)
        write_all(peer.fileno(), data, 30, "socket peer writing")
        time.sleep(1.0)  # time for a VMM that forwards too early to do so
        status, out = vm.guest.run(f"head -c {len(data)} {port} > /tmp/from-socket", COMMAND_TIMEOUT)
        assert status == 0, out
        assert_guest_file(vm.guest, "/tmp/from-socket", data)
    finally:
        peer.close()


def _wait_for_file_size(path: Path, size: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        if len(data) >= size or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


def test_file_port_gets_guest_output_byte_exact(vm):
    status, out = vm.guest.run(f"cat /tmp/pattern > {vm.vports['log']}", COMMAND_TIMEOUT)
    assert status == 0, out
    data = _wait_for_file_size(vm.log_path, len(vm.pattern), 30)
    assert data == vm.pattern


def test_file_port_throughput(vm):
    """Measured, not asserted: guest dd into a file port (timed by guest and host)."""
    offset = vm.log_path.stat().st_size
    block, count = 4096, 256
    host_started = time.monotonic()
    status, out = vm.guest.run(f"time dd if=/dev/zero bs={block} count={count} of={vm.vports['log']}", 600)
    assert status == 0, out
    data = _wait_for_file_size(vm.log_path, offset + block * count, 60)
    host_seconds = time.monotonic() - host_started
    assert len(data) == offset + block * count and data[offset:] == bytes(block * count)
    real = re.search(r"real\s+(\d+)m\s*([\d.]+)s", out)
    guest_seconds = int(real.group(1)) * 60 + float(real.group(2)) if real else float("nan")
    kib = block * count / 1024
    print(f"\n[{vm.mode}] file port throughput: {kib:.0f} KiB; guest `time`: {guest_seconds:.2f} s "
          f"({kib / guest_seconds:.0f} KiB/s); host wall (command round trip): {host_seconds:.2f} s "
          f"({kib / host_seconds:.0f} KiB/s)")


def test_poweroff_ends_vm_and_removes_socket_file(vm):
    vm.guest.send("poweroff\n")
    assert vm.guest.wait(120) == 0
    assert not vm.socket_path.exists(), "the socket server port's file is still there after the VM exited"
    # the file port keeps what the guest wrote
    assert vm.log_path.read_bytes().startswith(vm.pattern)
