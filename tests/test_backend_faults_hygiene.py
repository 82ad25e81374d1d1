"""Host hygiene of console backends: private files, no symlink following, no
hang on a busy socket, and no host path chosen by the guest.

Where host paths come from (checked by reading the code, kept true by the
tests below): every path a backend opens, binds, connects to or unlinks is
`PortSpec.path`, parsed from the host's command line (spec.py) into a frozen
dataclass. The guest's control messages can only be DEVICE_READY, PORT_READY
and PORT_OPEN (control.GUEST_EVENTS; anything else fails the device), and
they carry a port *index* that selects among the host-configured ports. Port
names travel host -> guest only. Guest data is bytes written to a backend,
never interpreted (the `-- CMD` status port is parsed as an integer only).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import struct
import threading
import time

import pytest

from microvmm.virtio_console.backends import (
    BackendError, FileBackend, SocketClientBackend, SocketServerBackend,
)
from microvmm.virtio_console.control import GUEST_EVENTS, ControlEvent
from microvmm.virtio_console.device import CONTROL_TX_QUEUE
from microvmm.virtio_console.spec import parse_port_spec
from tests.console_helpers import wait_for
from tests.test_console_device import make_env  # noqa: F401  (fixture)

O_APPEND = os.O_APPEND
CTRL = struct.Struct("<IHH")


def fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as handle:
        for line in handle:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


@pytest.fixture
def open_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def in_thread(function, timeout: float):
    """Run function on a thread; (finished, result or exception)."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as exc:
            outcome["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), outcome


# ------------------------------------------------------------------ files


def test_file_port_opened_append_only_and_private(tmp_path, open_umask):
    path = tmp_path / "guest.log"
    backend = FileBackend("log", str(path))
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # even with umask 0
        flags = fd_flags(backend._fd)
        assert flags & O_APPEND, "not opened O_APPEND"
        assert flags & os.O_ACCMODE == os.O_WRONLY
        assert flags & os.O_CLOEXEC, "would leak into child processes"
    finally:
        backend.close()


def test_file_port_symlink_refused_with_a_clear_message(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"keep me")
    link = tmp_path / "guest.log"
    link.symlink_to(target)
    with pytest.raises(BackendError) as caught:
        FileBackend("log", str(link))
    message = str(caught.value)
    assert str(link) in message and "symbolic link" in message, message
    assert "Too many levels" not in message  # ELOOP's own text says nothing useful here
    assert target.read_bytes() == b"keep me"


def test_file_port_dangling_symlink_creates_nothing(tmp_path):
    link = tmp_path / "guest.log"
    link.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(BackendError, match="symbolic link"):
        FileBackend("log", str(link))
    assert not (tmp_path / "would-be-created").exists()


# ------------------------------------------------------------------ sockets


def test_socket_file_is_born_private(tmp_path, open_umask, monkeypatch):
    """0600 from bind on, not only after a chmod: with umask 0 and the chmod made
    a no-op, the file must still be private."""
    path = tmp_path / "s.sock"
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    backend = SocketServerBackend("s", str(path))
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        monkeypatch.undo()
        backend.close()
    assert not path.exists()


def _fill_backlog(path) -> list[socket.socket]:
    clients = []
    while True:
        client = socket.socket(socket.AF_UNIX)
        client.setblocking(False)
        try:
            client.connect(str(path))
        except BlockingIOError:
            client.close()
            return clients
        clients.append(client)
        assert len(clients) < 1000


def _drain_backlog(server: socket.socket, clients: list[socket.socket]) -> None:
    """Close the waiting clients and accept them away: the backlog has room again."""
    for client in clients:
        client.close()
    server.setblocking(False)
    try:
        while True:
            server.accept()[0].close()
    except BlockingIOError:
        pass
    finally:
        server.setblocking(True)


def test_second_server_on_a_busy_live_socket_refuses_without_hanging(tmp_path):
    path = tmp_path / "s.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    waiting = _fill_backlog(path)  # a live server whose backlog is full
    try:
        finished, outcome = in_thread(lambda: SocketServerBackend("t", str(path)), 5)
        assert finished, "probing a busy live socket hung"
        assert isinstance(outcome.get("error"), BackendError), outcome
        assert "listening" in str(outcome["error"]) and str(path) in str(outcome["error"])
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # not removed
    finally:
        for client in waiting:
            client.close()
        live.close()


def test_client_to_a_busy_server_neither_hangs_at_start_nor_blocks_the_loop(tmp_path):
    from microvmm.eventloop import EventLoop
    from tests.console_helpers import run_on_loop
    from tests.test_backends import attach
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    waiting = _fill_backlog(path)
    loop = EventLoop()
    loop.start()
    backend = None
    try:
        finished, outcome = in_thread(lambda: SocketClientBackend("c", str(path)), 5)
        assert finished, "connecting to a busy server hung"
        assert isinstance(outcome.get("error"), BackendError) and "backlog" in str(outcome["error"])
        # a client whose server becomes busy later reconnects without blocking the I/O thread
        _drain_backlog(server, waiting)
        backend = SocketClientBackend("c", str(path), monitor_interval=0.01, reconnect_interval=0.01)
        conn, _ = server.accept()
        attach(loop, backend)
        waiting = _fill_backlog(path)
        conn.close()  # the client notices and retries against the full backlog
        assert wait_for(lambda: not backend.connected)
        time.sleep(0.2)
        finished, _ = in_thread(lambda: run_on_loop(loop, lambda: None, timeout=1), 3)
        assert finished and loop.running, "the I/O thread is stuck in a reconnect"
        _drain_backlog(server, waiting)
        waiting = []
        server.setblocking(False)

        def accepted() -> bool:  # keep accepting: the client's retries land in the backlog
            try:
                server.accept()
            except BlockingIOError:
                pass
            return backend.connected
        assert wait_for(accepted, 5)  # room again: it reconnects
    finally:
        if backend is not None:
            run_on_loop(loop, backend.close)
        loop.close()
        for client in waiting:
            client.close()
        server.close()


# ------------------------------------------------------------------ the guest chooses no host path


def test_port_spec_is_immutable():
    spec = parse_port_spec("file:log=/tmp/x.log")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.path = "/etc/passwd"


def test_guest_can_only_send_events_without_paths():
    assert GUEST_EVENTS == {ControlEvent.DEVICE_READY, ControlEvent.PORT_READY, ControlEvent.PORT_OPEN}


@pytest.mark.parametrize("event", [ControlEvent.PORT_NAME, ControlEvent.DEVICE_ADD, ControlEvent.RESIZE])
def test_guest_port_name_or_other_host_events_cannot_name_a_host_path(make_env, tmp_path, event):
    env = make_env(["file:log={tmp}/log.txt", "socket:s={tmp}/s.sock:server"])
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: len(guest.names) == 2)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    evil = str(tmp_path / "evil")
    for port in (0, 1):
        env.driver.rings[CONTROL_TX_QUEUE].add(readable=[CTRL.pack(port, event, 1) + evil.encode() + b"\0"])
        env.driver.kick(CONTROL_TX_QUEUE, force=True)
    assert wait_for(lambda: env.needs_reset())
    assert not os.path.lexists(evil)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert [(p.spec.name, p.spec.path) for p in env.device.ports] == [
        ("log", str(tmp_path / "log.txt")), ("s", str(tmp_path / "s.sock"))]
    assert [p.backend.path for p in env.device.ports] == [str(tmp_path / "log.txt"), str(tmp_path / "s.sock")]


def test_guest_data_that_looks_like_paths_is_only_data(make_env, tmp_path):
    env = make_env(["file:log={tmp}/log.txt"])
    guest = env.guest
    guest.probe()
    assert guest.until(lambda: 0 in guest.names)
    guest.open_port(0)
    evil = f"{tmp_path}/evil\0../../../{tmp_path.name}/evil2\n".encode()
    guest.write(0, evil)
    assert wait_for(lambda: (tmp_path / "log.txt").read_bytes() == evil)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]
