"""Two guests linked by a socket port (ACRN's SOCKET use case), end to end.

VM A listens (`socket:link=PATH:server`), VM B connects (`socket:link=PATH:client`);
what one guest writes to its /dev/vportNpM the other reads from its own. The two
VMs boot concurrently (A must have created the socket before B starts); the
tests share them and run in file order; the last ones power them off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from microvmm.testing import GuestProcess
from tests.e2e_support import (BOOT_TIMEOUT, GUEST_TEST_TIMEOUT, assert_guest_file, assert_no_stray_processes, launch,
                               require_guests_at_once, socket_path_in, start_command, virtio_ports,
                               wait_for_path, write_pattern)

pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)
COMMAND_TIMEOUT = 120


@dataclass
class LinkedVms:
    server: GuestProcess
    client: GuestProcess
    socket_path: Path
    server_port: str      # /dev/vportNpM of the link port in A
    client_port: str      # ... and in B


@pytest.fixture(scope="module")
def vms(tmp_path_factory):
    require_guests_at_once(2)
    socket_path = socket_path_in(tmp_path_factory.mktemp("link"), "link.sock")
    started = time.monotonic()
    server = launch("--console", f"socket:link={socket_path}:server")
    client = None
    try:
        # the server VMM creates the socket before its guest boots; the client
        # VMM refuses to start without it
        wait_for_path(socket_path, 60, server)
        client = launch("--console", f"socket:link={socket_path}:client")
        server.wait_for_shell(BOOT_TIMEOUT)
        client.wait_for_shell(BOOT_TIMEOUT)
        print(f"\ntwo VMs booted to their shells in {time.monotonic() - started:.1f} s")
        server_ports, client_ports = virtio_ports(server), virtio_ports(client)
        # the user's port, then the kernel's log port microvmm adds
        assert list(server_ports) == ["link", "microvmm.kmsg"], server_ports
        assert list(client_ports) == ["link", "microvmm.kmsg"], client_ports
        yield LinkedVms(server, client, socket_path, server_ports["link"], client_ports["link"])
    finally:
        if client is not None:
            client.kill()
            assert_no_stray_processes(client)
        server.kill()
        assert_no_stray_processes(server)
        leftover = socket_path.exists()
        if leftover:
            socket_path.unlink()
        assert not leftover, f"{socket_path} left behind after the VMMs were killed"


def test_server_to_client_written_before_the_reader_opens(vms):
    # A writes first: its VMM passes the bytes to the socket, B's VMM must hold
    # them until B's guest opens the port (Linux drops data for a closed port).
    pattern = write_pattern(vms.server, "/tmp/to-b", lines=300)
    status, out = vms.server.run(f"cat /tmp/to-b > {vms.server_port}", COMMAND_TIMEOUT)
    assert status == 0, out
    time.sleep(1.0)
    status, out = vms.client.run(f"head -c {len(pattern)} {vms.client_port} > /tmp/from-a", COMMAND_TIMEOUT)
    assert status == 0, out
    assert_guest_file(vms.client, "/tmp/from-a", pattern)


def test_client_to_server_with_the_reader_waiting(vms):
    pattern = write_pattern(vms.client, "/tmp/to-a", lines=500)
    reader = start_command(vms.server, f"{{ echo link-is-open; head -c {len(pattern)} > /tmp/from-b; }} "
                                       f"< {vms.server_port}")
    vms.server.expect("link-is-open", COMMAND_TIMEOUT, reader.start)
    status, out = vms.client.run(f"cat /tmp/to-a > {vms.client_port}", COMMAND_TIMEOUT)
    assert status == 0, out
    status, out = reader.result(COMMAND_TIMEOUT)
    assert status == 0, out
    assert_guest_file(vms.server, "/tmp/from-b", pattern)


def test_server_vm_exit_removes_socket_and_client_keeps_running(vms):
    vms.server.send("poweroff\n")
    assert vms.server.wait(120) == 0
    assert not vms.socket_path.exists(), "the server VM's socket file is still there after it exited"
    # the client VM lost its peer but goes on (it retries the connection)
    status, out = vms.client.run("echo still here")
    assert (status, out.strip()) == (0, "still here")


def test_client_vm_powers_off(vms):
    vms.client.send("poweroff\n")
    assert vms.client.wait(120) == 0
