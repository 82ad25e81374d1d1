"""The control socket (microvmm/control/) against the real default guest:
ports hot-plugged and removed under I/O, the host end opened and closed, a
console resized, and random requests that must not hurt the VMM or guest.

One VM (the plugin's microvm_module, booted with control=True) serves the
module's tests; each test adds ports of its own names.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvmm.control.client import ControlClient, ControlReplyError
from tests.e2e_support import GUEST_TEST_TIMEOUT

pytestmark = pytest.mark.timeout(GUEST_TEST_TIMEOUT)

FIND_VPORT = ("for d in /sys/class/virtio-ports/*; do [ \"$(cat $d/name)\" = {name} ] && "
              "echo ${{d##*/}}; done; true")


@pytest.fixture(scope="module")
def vm(microvm_module):
    return microvm_module(control=True)


def wait_for(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.3)


def vport_of(vm, name: str) -> str:
    """The guest's vportXpY for a port name ("" if none)."""
    return vm.run(FIND_VPORT.format(name=name), timeout=60, text=True).stdout.strip()


def connect(path, timeout: float = 30.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def recv_until_eof(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_add_port_appears_with_its_name_and_carries_data_both_ways(vm, tmp_path):
    path = tmp_path / "hp1.sock"
    added = vm.add_port(f"socket:hotplug1={path}:server")
    assert added["name"] == "hotplug1"
    host = connect(path)
    vport = wait_for("the guest's vport for hotplug1", lambda: vport_of(vm, "hotplug1"))
    assert vm.run(f"test -c /dev/{vport} && cat /sys/class/virtio-ports/{vport}/name",
                  timeout=60) == (0, b"hotplug1\n", b"")
    host.sendall(b"to the guest\n")
    assert vm.run(f"head -n 1 /dev/{vport}", timeout=60) == (0, b"to the guest\n", b"")
    assert vm.run(f"echo to the host > /dev/{vport}", timeout=60).status == 0
    received = b""
    while not received.endswith(b"\n"):
        received += host.recv(100)
    assert received == b"to the host\n"
    state = next(p for p in vm.ports() if p["name"] == "hotplug1")
    assert state["to_guest_bytes"] == len(b"to the guest\n")
    assert state["to_host_bytes"] == len(b"to the host\n")
    assert state["host_open"] is True
    host.close()


def test_remove_port_under_a_reading_cat_loses_nothing_the_guest_wrote(vm, tmp_path):
    path = tmp_path / "hp2.sock"
    vm.add_port(f"socket:hotplug2={path}:server")
    host = connect(path)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recv_until_eof(host, 120)))
    reader.start()
    vport = wait_for("the guest's vport for hotplug2", lambda: vport_of(vm, "hotplug2"))
    # 200 KB the guest writes (some still in the ring when the port goes) and
    # a cat reading the port when it is removed.
    status, out, _ = vm.run(f"head -c 200000 /dev/urandom > /tmp/blob && md5sum < /tmp/blob && "
                            f"{{ cat /dev/{vport} > /tmp/cat.out 2>/tmp/cat.err & echo $! > /tmp/cat.pid; }} && "
                            f"cat /tmp/blob > /dev/{vport}", timeout=120, text=True)
    assert status == 0, out
    guest_md5 = out.split()[0]
    vm.remove_port("hotplug2")
    reader.join(120)
    assert not reader.is_alive(), "the host end was not closed after remove-port"
    assert len(received[0]) == 200000
    assert hashlib.md5(received[0]).hexdigest() == guest_md5
    wait_for("the vport to go", lambda: vm.run(f"test -e /dev/{vport}", timeout=60).status != 0)
    wait_for("the reading cat to end",
             lambda: vm.run("kill -0 $(cat /tmp/cat.pid) 2>/dev/null", timeout=60).status != 0)
    assert all(p["name"] != "hotplug2" for p in vm.ports())
    assert vm.run("echo still here", timeout=60) == (0, b"still here\n", b"")
    assert vm.healthy


def test_close_gives_the_guest_eof_and_open_gives_it_back(vm, tmp_path):
    path = tmp_path / "hp3.sock"
    vm.add_port(f"socket:hotplug3={path}:server")
    host = connect(path)
    vport = wait_for("the guest's vport for hotplug3", lambda: vport_of(vm, "hotplug3"))
    assert vm.close_port("hotplug3") == {"name": "hotplug3", "host_open": False}
    # host end closed: a read returns end-of-file at once (busybox timeout: 143 if it blocked)
    assert vm.run(f"timeout 20 cat /dev/{vport}; echo rc=$?", timeout=60) == (0, b"rc=0\n", b"")
    assert vm.open_port("hotplug3") == {"name": "hotplug3", "host_open": True}
    # open again: the read waits for data, which the host then sends
    reader = vm.run(f"timeout 3 cat /dev/{vport}; echo rc=$?", timeout=60)
    assert reader[:2] == (0, b"rc=143\n"), reader  # killed by timeout: it was waiting
    host.sendall(b"after reopening\n")
    assert vm.run(f"head -n 1 /dev/{vport}", timeout=60) == (0, b"after reopening\n", b"")
    host.close()


def test_resize_changes_the_hvc_console_size(vm, tmp_path):
    # Every /dev/hvcN node exists from boot; only those with a console behind open.
    usable = "for h in /dev/hvc*; do stty size < $h > /dev/null 2>&1 && echo ${h#/dev/}; done; true"
    before = set(vm.run(usable, timeout=60, text=True).stdout.split())
    vm.add_port(f"@socket:term1={tmp_path / 'term.sock'}:server")
    new = wait_for("a new hvc console", lambda: set(vm.run(usable, timeout=60, text=True).stdout.split()) - before)
    (hvc,) = new
    vm.resize("term1", 100, 37)
    size = wait_for("the new size", lambda: (out := vm.run(f"stty size < /dev/{hvc}", timeout=60,
                                                            text=True).stdout.split()) != ["0", "0"] and out)
    # rows cols; Linux before its 2025 fix reads RESIZE's fields the other
    # way round (control.py), so the 6.1 guest may show them swapped.
    assert size in (["37", "100"], ["100", "37"]), size


def test_protocol_errors_get_error_objects(vm):
    sock = connect(vm.control_path)
    reader = sock.makefile("rb")

    def ask(line: bytes) -> dict:
        sock.sendall(line + b"\n")
        return json.loads(reader.readline())
    assert ask(b"{not json")["error"]["code"] == "bad-json"
    assert ask(b'{"id": 4, "cmd": "frobnicate"}') == {"id": 4, "error": {
        "code": "unknown-command", "message": ask(b'{"id": 4, "cmd": "frobnicate"}')["error"]["message"]}}
    assert ask(b'{"id": 5, "cmd": "open", "args": ["no-such-port"]}')["error"]["code"] == "unknown-port"
    assert ask(b'{"id": 6, "cmd": "add-port", "args": ["bogus:x"]}')["error"]["code"] == "bad-arguments"
    sock.sendall(b"x" * (70 * 1024) + b"\n")
    assert json.loads(reader.readline())["error"]["code"] == "line-too-long"
    assert reader.readline() == b""  # dropped
    sock.close()
    assert vm.run("echo fine", timeout=60) == (0, b"fine\n", b"")


REQUESTS = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["ports", "open", "close", "resize", "send", "stats", "help",
                             "remove-port", "add-port", "bogus"]),
     "args": st.lists(st.one_of(st.sampled_from(["nosuch", "microvmm.agent", "-1", "70000"]),
                                st.text(max_size=8), st.integers(-5, 1 << 17)), max_size=3)},
    optional={"id": st.integers()})


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(requests=st.lists(REQUESTS, min_size=1, max_size=3))
def test_random_requests_do_not_hurt_the_running_vm(vm, requests):
    with ControlClient(str(vm.control_path), timeout=30) as client:
        for request in requests:
            line = json.dumps(request).encode() + b"\n"
            client._sock.sendall(line)
            reply = json.loads(client._read_line())
            assert ("result" in reply) != ("error" in reply)


def test_vm_is_healthy_after_the_random_requests(vm):
    assert vm.run("echo alive", timeout=60) == (0, b"alive\n", b"")
    with pytest.raises(ControlReplyError):
        vm.ctl("remove-port", "microvmm.agent")


def readme_ctl_lines() -> list[str]:
    from tests.e2e_support import REPO
    text = (REPO / "README.md").read_text()
    section = text.split("### Acting on a running guest: `--control`", 1)[1].split("\n### ", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in section.splitlines()
            if line.startswith("microvmm ctl /tmp/vm.ctl ")]


def test_readme_ctl_examples_work_as_written(vm, tmp_path):
    import os
    import shlex
    import subprocess
    import sys

    from tests.e2e_support import REPO
    lines = readme_ctl_lines()
    assert len(lines) >= 9 and lines[-1].endswith(" stop")
    vm.add_port(f"@socket:p0={tmp_path / 'p0.sock'}:server")  # the example's pty console, here a socket
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for line in lines[:-1]:  # `stop` ends the shared VM: the last test's
        command = line.replace("/tmp/vm.ctl", str(vm.control_path)).replace(
            "/tmp/data.sock", str(tmp_path / "data.sock"))
        result = subprocess.run([sys.executable, "-m", "microvmm", *shlex.split(command)[1:]],
                                capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, (line, result.stdout, result.stderr)
        assert result.stdout.strip(), line
    assert vm.run("echo after the examples", timeout=60) == (0, b"after the examples\n", b"")


# After the README's lines: it may use every port id left.
def test_torture_schedule_leaves_the_vm_and_guest_healthy(vm):
    import os
    import subprocess
    import sys

    from tests.e2e_support import REPO
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "microvmm", "ctl", "--json", str(vm.control_path),
                             "torture", "4242", "60"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["seed"] == 4242 and len(summary["log"]) == min(60, len(summary["log"]))
    # resize of a serial port is the one refusal the schedule expects
    assert set(summary["refused"]) <= {"not-a-console"}, summary
    assert summary["applied"] > 0
    assert vm.run("echo survived", timeout=60) == (0, b"survived\n", b"")
    assert vm.healthy


def test_stop_ends_the_run_and_removes_the_socket(vm):
    import subprocess
    import sys

    from tests.e2e_support import REPO
    import os
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "microvmm", "ctl", str(vm.control_path), "stop"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert (result.returncode, result.stdout) == (0, "stopping\n"), result.stderr
    assert vm.proc.wait(120) == 0
    assert not vm.control_path.exists()
