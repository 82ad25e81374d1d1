"""The control socket (microvmm/control/) without a guest: the server on a
real unix socket, its commands against a fake console device, the CLI's
--control checks and `microvmm ctl`. Fast; the real guest is in
test_e2e_control.py."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvmm.control.commands import ControlCommands
from microvmm.control.protocol import MAX_LINE
from microvmm.control.server import ControlPathError, ControlServer, check_control_path, line_handler
from microvmm.virtio_console.hotplug import PortControlError

REPO = Path(__file__).resolve().parent.parent


class FakeConsole:
    """The hotplug.py calls of a VirtioConsole, on a dict of ports."""

    def __init__(self, names=("data",), capacity=4):
        self.capacity = capacity
        self.ports = {name: {"host_open": True, "size": None, "queued": b""} for name in names}
        self.next_id = len(names)

    def find_port(self, name):
        return self.ports.get(name)

    def _get(self, name):
        if name not in self.ports:
            raise PortControlError("unknown-port", f"no port named {name!r}")
        return self.ports[name]

    def port_states(self):
        return [{"id": i, "name": n, "backend": "fake", "console": False, "host_open": p["host_open"],
                 "guest_open": True, "ready": True, "to_guest_bytes": len(p["queued"]), "to_host_bytes": 0,
                 "dropped_bytes": 0, "buffered_bytes": 0, "queued_input_bytes": 0}
                for i, (n, p) in enumerate(self.ports.items())]

    def add_port(self, spec, backend):
        if self.next_id >= self.capacity:
            raise PortControlError("no-port-id", "all port ids used")
        self.ports[spec.name] = {"host_open": True, "size": None, "queued": b""}
        self.next_id += 1
        return self.next_id - 1

    def remove_port(self, name):
        self._get(name)
        del self.ports[name]
        return 0

    def set_host_open(self, name, is_open):
        self._get(name)["host_open"] = is_open
        return is_open

    def resize_port(self, name, cols, rows):
        if not (0 <= cols <= 0xFFFF and 0 <= rows <= 0xFFFF):
            raise PortControlError("bad-arguments", "out of range")
        self._get(name)["size"] = (cols, rows)

    def send_to_port(self, name, data):
        port = self._get(name)
        port["queued"] += data
        return len(port["queued"])


class FakeBackend:
    closed = False

    def close(self):
        self.closed = True


class FakeTarget:
    def __init__(self):
        self.console = FakeConsole()
        self.stopped = threading.Event()
        self.backends = []

    def consoles(self):
        return [("virtio-console0", self.console)]

    def open_backend(self, spec):
        backend = FakeBackend()
        self.backends.append(backend)
        return backend

    def dump(self):
        return "vCPU 0: RIP 0xffffffff81000000"

    def stats(self):
        return {"uptime_s": 1.0}

    def stop(self):
        self.stopped.set()


@pytest.fixture
def served(tmp_path):
    target = FakeTarget()
    path = tmp_path / "ctl.sock"
    server = ControlServer(str(path), line_handler(ControlCommands(target)))
    server.start()
    yield server, target, path
    server.close()


class Conn:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")

    def ask(self, request) -> dict:
        line = request if isinstance(request, bytes) else json.dumps(request).encode()
        self.sock.sendall(line + b"\n")
        return json.loads(self.reader.readline())

    def close(self):
        self.reader.close()
        self.sock.close()


def test_socket_is_0600_and_gone_after_close_with_its_thread(tmp_path):
    path = tmp_path / "ctl.sock"
    server = ControlServer(str(path), line_handler(ControlCommands(FakeTarget())))
    server.start()
    mode = os.lstat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    conn = Conn(path)
    assert conn.ask({"id": 1, "cmd": "help"})["id"] == 1
    server.close()
    assert not path.exists()
    assert not any(t.name == "microvmm-control" for t in threading.enumerate())
    assert conn.reader.readline() == b""  # the connection was closed
    assert sorted(os.listdir(tmp_path)) == []  # no staging directory left
    conn.close()


def test_requests_and_replies_carry_ids(served):
    _, target, path = served
    conn = Conn(path)
    assert conn.ask({"id": "a", "cmd": "ports"})["result"][0]["name"] == "data"
    assert conn.ask({"id": 2, "cmd": "close", "args": ["data"]}) == {
        "id": 2, "result": {"name": "data", "host_open": False}}
    assert target.console.ports["data"]["host_open"] is False
    assert conn.ask({"id": 3, "cmd": "resize", "args": ["data", "100", 30]})["result"] == {
        "name": "data", "cols": 100, "rows": 30}
    assert target.console.ports["data"]["size"] == (100, 30)
    assert conn.ask({"cmd": "send", "args": ["data", "héllo"]})["result"]["bytes"] == len("héllo".encode())
    assert conn.ask({"id": 5, "cmd": "dump"})["result"].startswith("vCPU 0")
    conn.close()


@pytest.mark.parametrize("line, code", [
    (b"{not json", "bad-json"),
    (b"\xff\xfe", "bad-json"),
    (b"[1, 2]", "bad-request"),
    (b'{"id": 1}', "bad-request"),
    (b'{"id": 1, "cmd": "ports", "args": "x"}', "bad-request"),
    (b'{"id": 1, "cmd": "ports", "args": [[1]]}', "bad-request"),
    (b'{"id": 1, "cmd": "frobnicate"}', "unknown-command"),
    (b'{"id": 1, "cmd": "open", "args": ["nosuch"]}', "unknown-port"),
    (b'{"id": 1, "cmd": "open", "args": []}', "bad-arguments"),
    (b'{"id": 1, "cmd": "resize", "args": ["data", "wide", 3]}', "bad-arguments"),
    (b'{"id": 1, "cmd": "resize", "args": ["data", 70000, 3]}', "bad-arguments"),
    (b'{"id": 1, "cmd": "add-port", "args": ["bogus:x"]}', "bad-arguments"),
    (b'{"id": 1, "cmd": "add-port", "args": ["stdio:x"]}', "bad-arguments"),
    (b'{"id": 1, "cmd": "add-port", "args": ["pty:data"]}', "bad-arguments"),
    (b'{"id": 1, "cmd": "add-port", "args": ["pty:microvmm.x"]}', "bad-arguments"),
    (b'{"id": 1, "cmd": "add-port", "args": ["pty:new", "virtio-console9"]}', "bad-arguments"),
])
def test_protocol_errors_are_error_objects(served, line, code):
    _, _, path = served
    conn = Conn(path)
    reply = conn.ask(line)
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    assert conn.ask({"id": 9, "cmd": "help"})["id"] == 9  # the connection still serves
    conn.close()


def test_port_limit_and_a_failed_add_closes_its_backend(served):
    _, target, path = served
    conn = Conn(path)
    for index in range(3):
        assert conn.ask({"cmd": "add-port", "args": [f"pty:p{index}"]})["result"]["id"] == index + 1
    reply = conn.ask({"cmd": "add-port", "args": ["pty:p9"]})
    assert reply["error"]["code"] == "no-port-id"
    assert target.backends[-1].closed and not any(b.closed for b in target.backends[:-1])
    conn.close()


def test_oversized_line_gets_an_error_and_the_connection_is_dropped(served):
    _, _, path = served
    conn = Conn(path)
    other = Conn(path)
    conn.sock.sendall(b"y" * (MAX_LINE + 10))  # no newline yet: already too long
    assert json.loads(conn.reader.readline())["error"]["code"] == "line-too-long"
    assert conn.reader.readline() == b""
    assert other.ask({"id": 1, "cmd": "help"})["id"] == 1  # other clients carry on
    conn.close()
    other.close()


def test_several_clients_at_once(served):
    _, _, path = served
    conns = [Conn(path) for _ in range(5)]
    for index, conn in enumerate(conns):
        conn.sock.sendall(json.dumps({"id": index, "cmd": "stats"}).encode() + b"\n")
    for index, conn in enumerate(reversed(conns)):
        assert json.loads(conn.reader.readline())["id"] == len(conns) - 1 - index
    for conn in conns:
        conn.close()


def test_stop_answers_then_stops(served):
    _, target, path = served
    conn = Conn(path)
    assert conn.ask({"id": 1, "cmd": "stop"}) == {"id": 1, "result": "stopping"}
    assert target.stopped.wait(5)
    conn.close()


def test_a_command_that_raises_gets_an_error_not_a_dead_server(served):
    server, target, path = served

    def broken():
        raise RuntimeError("device on fire")
    target.dump = broken
    conn = Conn(path)
    assert conn.ask({"id": 1, "cmd": "dump"})["error"] == {
        "code": "failed", "message": "dump: RuntimeError: device on fire"}
    assert conn.ask({"id": 2, "cmd": "help"})["id"] == 2
    conn.close()


ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3),
                        max_leaves=6)
COMMANDS = ["ports", "add-port", "remove-port", "open", "close", "resize", "send", "stats", "dump", "help"]
REQUEST = st.one_of(
    st.fixed_dictionaries({"cmd": st.sampled_from(COMMANDS) | st.text(max_size=6),
                           "args": st.lists(st.sampled_from(["data", "pty:x", "socket:y", "@pty:z", "5"])
                                            | st.text(max_size=6) | st.integers(), max_size=4)},
                          optional={"id": ANY_JSON}).map(lambda d: json.dumps(d).encode()),
    ANY_JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(line=REQUEST)
def test_1000_random_requests_each_get_one_reply(tmp_path_factory, line):
    global _SHARED
    if _SHARED is None:
        target = FakeTarget()
        path = tmp_path_factory.mktemp("ctl") / "ctl.sock"
        server = ControlServer(str(path), line_handler(ControlCommands(target)))
        server.start()
        _SHARED = (server, Conn(path))
    _, conn = _SHARED
    if not line.strip():
        return  # blank lines are skipped without a reply
    conn.sock.sendall(line + b"\n")
    reply = json.loads(conn.reader.readline())
    assert ("result" in reply) != ("error" in reply), reply
    if "error" in reply:
        assert isinstance(reply["error"]["code"], str) and reply["error"]["message"]
        assert reply["error"]["code"] != "internal", reply


_SHARED = None


def test_the_random_requests_left_the_server_serving():
    if _SHARED is None:
        pytest.skip("runs after the random requests")
    server, conn = _SHARED
    assert conn.ask({"id": "last", "cmd": "help"})["id"] == "last"
    conn.close()
    server.close()


# ---- the --control path and the CLI ------------------------------------------------------

def test_control_path_checks(tmp_path):
    check_control_path(str(tmp_path / "new.sock"))  # nothing there: fine
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ControlPathError, match="exists and is not a socket"):
        check_control_path(str(regular))
    with pytest.raises(ControlPathError, match="does not exist"):
        check_control_path(str(tmp_path / "nodir" / "s"))
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()  # bound, nobody listens: stale
    check_control_path(str(stale))
    assert not stale.exists()
    live = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live))
    listener.listen(1)
    with pytest.raises(ControlPathError, match="another process listens"):
        check_control_path(str(live))
    listener.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "microvmm", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_run_refuses_an_existing_control_path_before_anything_starts(tmp_path):
    existing = tmp_path / "taken"
    existing.write_text("keep me")
    result = run_cli("run", "--control", str(existing), "--timeout", "5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"microvmm: error: --control {existing}: exists and is not a socket"]
    assert existing.read_text() == "keep me"


def test_ctl_without_a_socket_says_so(tmp_path):
    result = run_cli("ctl", str(tmp_path / "none.sock"), "ports")
    assert result.returncode == 2
    assert "no such control socket" in result.stderr


def test_ctl_prints_results_and_fails_on_error_objects(served):
    _, _, path = served
    ok = run_cli("ctl", str(path), "ports")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0].split()[:3] == ["DEVICE", "ID", "NAME"]
    assert "data" in ok.stdout.splitlines()[1].split()
    raw = run_cli("ctl", "--json", str(path), "resize", "data", "80", "24")
    assert json.loads(raw.stdout)["result"] == {"name": "data", "cols": 80, "rows": 24}
    bad = run_cli("ctl", str(path), "open", "nosuch")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "microvmm: error: unknown-port: no port named 'nosuch'"


# ---- torture schedules (microvmm/control/torture.py) ---------------------------------------

def test_torture_schedule_replays_by_seed_and_keeps_to_the_id_budget():
    from microvmm.control.torture import schedule
    first = schedule(1234, 300, 5, "/d")
    assert first == schedule(1234, 300, 5, "/d")
    assert first != schedule(1235, 300, 5, "/d")
    assert sum(e.cmd == "add-port" for e in first) == 5
    assert {e.cmd for e in first} == {"add-port", "remove-port", "open", "close", "resize", "send"}
    live: set[str] = set()
    for event in first:  # every event names a port that is there at that point
        if event.cmd == "add-port":
            live.add(event.args[0].lstrip("@").split(":")[1].split("=")[0])
        else:
            assert event.args[0] in live, event
            if event.cmd == "remove-port":
                live.discard(event.args[0])


def test_torture_runs_against_the_server_and_counts_refusals(served, tmp_path):
    from microvmm.control.client import ControlClient
    from microvmm.control.torture import run_torture
    _, target, path = served
    target.console.capacity = 16  # as a real console under --control
    with ControlClient(str(path)) as client:
        summary = run_torture(client, seed=99, events=60, directory=str(tmp_path))
    assert summary.id_budget == 15  # the fake's one port has id 0
    assert summary.applied + sum(summary.refused.values()) == len(summary.log) == 60
    assert summary.refused == {}, summary.refused  # the schedule only names ports that are there
    assert len(target.console.ports) == 1 + sum(e.startswith(("    ", " ")) and " add-port " in e
                                                 for e in summary.log) - sum(" remove-port " in e
                                                                             for e in summary.log)
    assert "seed 99" in summary.text()
