"""Several PCI devices at once in the booted guest: two virtio-console devices
and a virtio-rng, with MSI-X (the default) and with INTx (`pci=nomsi`).

Each device's ports appear under its own virtio index (/dev/vport0pN,
/dev/vport1pN), /dev/hwrng reads bytes from the virtio-rng, and, once every
device is set up, each one's interrupts still arrive: data moved through each
raises that device's interrupt count.

One boot per interrupt mode, shared by the tests of the mode in file order.
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
from tests.e2e_support import (GUEST_TEST_TIMEOUT, announced_ptys, assert_guest_file, assert_no_stray_processes,
                               boot, open_pty_slave, read_exact, start_command, virtio_ports, write_all)

pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

COMMAND_TIMEOUT = 120
#: virtio device ids (spec §5) in slot order: console, console, entropy.
DEVICE_IDS = ["0x0003", "0x0003", "0x0004"]
MODES = {"msix": (), "intx": ("--append", "pci=nomsi")}
#: The INTx guest's rng is rate-limited (10 kB/s: not a multiple of Linux's
#: 64-byte requests, so requests wait for whole budgets); the MSI-X guest's is not.
RNG_OPTIONS = {"msix": "virtio-rng", "intx": "virtio-rng,max-bytes=1000,period=100"}


@dataclass
class DevicesGuest:
    guest: GuestProcess
    mode: str
    ptys: dict[str, str]       # port name -> host pty slave
    vports: dict[str, str]     # port name -> guest /dev/vportNpM
    log_path: Path


@pytest.fixture(scope="module", params=list(MODES))
def vm(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"dev-{request.param}")
    log_path = work / "second.log"
    started = time.monotonic()
    guest = boot("--device", "virtio-console,pty:first",
                 "--device", f"virtio-console,pty:second,file:second-log={log_path}",
                 "--device", RNG_OPTIONS[request.param], *MODES[request.param])
    print(f"\n[{request.param}] booted to a shell in {time.monotonic() - started:.1f} s")
    try:
        ptys = announced_ptys(guest)
        assert len(ptys) == 2, f"expected two pty announcements on stderr:\n{guest.stderr.text}"
        yield DevicesGuest(guest, request.param, dict(zip(["first", "second"], ptys)),
                           virtio_ports(guest), log_path)
    finally:
        guest.kill()
        assert_no_stray_processes(guest)


def test_every_device_is_on_the_bus_in_its_slot_order(vm):
    status, out = vm.guest.run("cat /sys/bus/virtio/devices/virtio*/device")
    assert status == 0, out
    assert out.split() == DEVICE_IDS


def test_each_console_devices_ports_have_its_virtio_index(vm):
    assert vm.vports == {"first": "/dev/vport0p0", "microvmm.kmsg": "/dev/vport0p1",
                         "second": "/dev/vport1p0", "second-log": "/dev/vport1p1"}


def test_hwrng_is_the_virtio_rng_and_reads_bytes(vm):
    status, out = vm.guest.run("cat /sys/class/misc/hw_random/rng_current; "
                               "head -c 4096 /dev/hwrng > /tmp/rng; wc -c < /tmp/rng; "
                               "od -An -tx1 -v /tmp/rng | tr -s ' ' '\\n' | sort -u | wc -l")
    assert status == 0, out
    current, size, distinct = out.split()
    assert re.fullmatch(r"virtio_rng\.\d+", current), current
    assert int(size) == 4096
    assert int(distinct) > 200  # of 256 byte values: not a constant or a short cycle


def _interrupt_counts(guest: GuestProcess) -> dict[str, int]:
    """virtioN -> interrupts taken so far on all of that device's lines."""
    status, out = guest.run("grep virtio /proc/interrupts")
    assert status == 0, out
    counts: dict[str, int] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 3 or not fields[0].endswith(":"):
            continue
        for device in set(re.findall(r"\bvirtio\d+", line)):
            counts[device] = counts.get(device, 0) + int(fields[1])
    return counts


def test_interrupt_mode_is_the_configured_one_for_every_device(vm):
    status, out = vm.guest.run("grep virtio /proc/interrupts")
    assert status == 0, out
    lines = out.splitlines()
    for index in range(len(DEVICE_IDS)):
        mine = [line for line in lines if re.search(rf"\bvirtio{index}\b", line)]
        assert mine, (index, lines)
        if vm.mode == "msix":
            assert all("PCI-MSI" in line for line in mine), mine
        else:  # its own level-triggered IOAPIC line
            assert len(mine) == 1 and "IO-APIC" in mine[0] and "fasteoi" in mine[0], mine


def _pty_to_guest(vm: DevicesGuest, name: str, seed: int) -> None:
    """Host -> guest through the named pty port: needs the device's receive interrupt."""
    port = vm.vports[name]
    slave = open_pty_slave(vm.ptys[name])
    try:
        data = random.Random(seed).randbytes(2000)
        reader = start_command(vm.guest, f"{{ echo {name}-is-open; head -c {len(data)} > /tmp/from-{name}; }} "
                                         f"< {port}")
        vm.guest.expect(f"{name}-is-open", COMMAND_TIMEOUT, reader.start)
        write_all(slave, data, 60, f"writing to pty {vm.ptys[name]}")
        status, out = reader.result(COMMAND_TIMEOUT)
        assert status == 0, out
        assert_guest_file(vm.guest, f"/tmp/from-{name}", data)
        # and guest -> host
        status, out = vm.guest.run(f"echo back-from-{name} > {port}", COMMAND_TIMEOUT)
        assert status == 0, out
        expected = f"back-from-{name}\n".encode()
        assert read_exact(slave, len(expected), 60, f"{name} output") == expected
    finally:
        os.close(slave)


def test_every_devices_interrupts_arrive_after_all_are_set_up(vm):
    """All three devices were probed at boot; each is now driven in turn and
    its own interrupt count must grow (a device that took another's GSI
    routes, or dropped its ioeventfds, would stall here)."""
    before = _interrupt_counts(vm.guest)
    assert set(before) == {"virtio0", "virtio1", "virtio2"}, before
    _pty_to_guest(vm, "first", 1)
    _pty_to_guest(vm, "second", 2)
    status, out = vm.guest.run(f"echo file-port-of-the-second-device > {vm.vports['second-log']}")
    assert status == 0, out
    status, out = vm.guest.run("head -c 2048 /dev/hwrng | wc -c", COMMAND_TIMEOUT)
    assert status == 0 and out.split() == ["2048"], out
    after = _interrupt_counts(vm.guest)
    grew = {device for device in before if after.get(device, 0) > before[device]}
    assert grew == {"virtio0", "virtio1", "virtio2"}, (before, after)
    assert vm.log_path.read_bytes() == b"file-port-of-the-second-device\n"


def test_poweroff_ends_the_vm(vm):
    vm.guest.send("poweroff\n")
    assert vm.guest.wait(COMMAND_TIMEOUT) == 0
