"""ACRN port syntax: valid examples parse, every error names its token."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from microvmm.virtio_console.spec import (
    BackendKind, PortSpec, PortSpecError, SocketMode, parse_device_option, parse_port_spec,
    validate_ports,
)


@pytest.mark.parametrize("text, expected", [
    # The examples of acrn-virtio-console.rst.
    ("@stdio:stdio_port", PortSpec(True, BackendKind.STDIO, "stdio_port")),
    ("@pty:pty_port", PortSpec(True, BackendKind.PTY, "pty_port")),
    ("@tty:tty_port=/dev/pts/0", PortSpec(True, BackendKind.TTY, "tty_port", "/dev/pts/0")),
    ("@file:file_port=/tmp/out.log", PortSpec(True, BackendKind.FILE, "file_port", "/tmp/out.log")),
    ("socket:socket_file_name=/run/vm.sock:server",
     PortSpec(False, BackendKind.SOCKET, "socket_file_name", "/run/vm.sock", SocketMode.SERVER)),
    ("socket:socket_file_name=/run/vm.sock:client",
     PortSpec(False, BackendKind.SOCKET, "socket_file_name", "/run/vm.sock", SocketMode.CLIENT)),
    ("pty:p0", PortSpec(False, BackendKind.PTY, "p0")),
])
def test_valid_specs(text, expected):
    spec = parse_port_spec(text)
    assert spec == expected
    assert str(spec) == text


def test_acrn_two_console_example():
    ports = parse_device_option("virtio-console,@tty:tty_port=/dev/pts/0,@pty:pty_port")
    assert [p.name for p in ports] == ["tty_port", "pty_port"]
    assert ports[0].backend is BackendKind.TTY and ports[0].console
    assert ports[1].backend is BackendKind.PTY and ports[1].console


@pytest.mark.parametrize("text, token", [
    ("serial:p0", "serial"),
    ("@telnet:p0", "telnet"),
    ("pty", "pty"),
    ("pty:", "pty:"),
    ("tty:t", "tty:t"),
    ("file:f", "file:f"),
    ("socket:s:server", "socket:s:server"),
    ("file:f=", "file:f="),
    ("pty:p=/dev/pts/3", "/dev/pts/3"),
    ("stdio:s=/dev/tty", "/dev/tty"),
    ("socket:s=/tmp/s", "socket:s=/tmp/s"),
    ("socket:s=/tmp/s:listen", "listen"),
    ("file:f=/tmp/f:server", "server"),
    ("pty:p:client", "client"),
    ("tty:t=/dev/a:b:server", "b:server"),
    ("pty:bad/name", "bad/name"),
    ("pty:bad name", "bad name"),
    ("", ""),
])
def test_invalid_spec_names_token(text, token):
    with pytest.raises(PortSpecError) as info:
        parse_port_spec(text)
    assert info.value.token == token
    assert repr(token) in str(info.value)


def test_duplicate_names():
    with pytest.raises(PortSpecError) as info:
        parse_device_option("virtio-console,pty:a,pty:b,pty:a")
    assert info.value.token == "a" and "duplicate" in str(info.value)


def test_two_stdio_ports():
    with pytest.raises(PortSpecError) as info:
        parse_device_option("virtio-console,@stdio:a,stdio:b")
    assert info.value.token == "stdio:b"


def test_same_socket_path_twice():
    with pytest.raises(PortSpecError) as info:
        parse_device_option("virtio-console,socket:a=/tmp/s:server,socket:b=/tmp/s:client")
    assert info.value.token == "/tmp/s"


def test_sixteen_ports_ok_seventeen_not():
    sixteen = ",".join(f"pty:p{i}" for i in range(16))
    assert len(parse_device_option("virtio-console," + sixteen)) == 16
    with pytest.raises(PortSpecError) as info:
        parse_device_option("virtio-console," + sixteen + ",pty:p16")
    assert info.value.token == "pty:p16" and "16" in str(info.value)


def test_first_port_is_port_zero():
    ports = parse_device_option("virtio-console,file:log=/tmp/l,@pty:con")
    assert ports[0].name == "log" and ports[1].name == "con"


@pytest.mark.parametrize("text, token", [
    ("virtio-serial,pty:a", "virtio-serial"),
    ("virtio-console", "virtio-console"),
    ("virtio-console,pty:a,,pty:b", ""),
])
def test_device_option_errors(text, token):
    with pytest.raises(PortSpecError) as info:
        parse_device_option(text)
    assert info.value.token == token


def test_validate_empty_list():
    with pytest.raises(PortSpecError):
        validate_ports([])


names = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=20)


@given(console=st.booleans(), kind=st.sampled_from(list(BackendKind)), name=names,
       mode=st.sampled_from(list(SocketMode)))
def test_roundtrip(console, kind, name, mode):
    spec = PortSpec(console, kind, name, "/tmp/x" if kind.needs_path else None,
                    mode if kind is BackendKind.SOCKET else None)
    assert parse_port_spec(str(spec)) == spec
