"""ACRN's virtio-console port syntax.

    virtio-console,SPEC[,SPEC...]
    SPEC = [@]stdio|tty|pty|file|socket:portname[=portpath][:server|client]

`@` marks a console port (the guest binds an hvc console to it). The first
port listed is port 0. `tty`, `file` and `socket` need a portpath; `stdio` and
`pty` take none. `socket` needs `:server` or `:client`; other backends take
neither. A portpath therefore cannot contain `,` or `:` (as in ACRN).
Every error names the offending token.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

MAX_PORTS = 16
DEVICE_NAME = "virtio-console"
#: The name travels to the guest in one control buffer and ends up in sysfs
#: and /dev/virtio-ports/NAME: keep it a short, path-safe word.
MAX_NAME_LENGTH = 128
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


class PortSpecError(ValueError):
    """A console port specification is invalid; `token` is the culprit."""

    def __init__(self, token: str, reason: str):
        super().__init__(f"{token!r}: {reason}")
        self.token = token
        self.reason = reason


class BackendKind(enum.Enum):
    STDIO = "stdio"
    TTY = "tty"
    PTY = "pty"
    FILE = "file"
    SOCKET = "socket"

    @property
    def needs_path(self) -> bool:
        return self in (BackendKind.TTY, BackendKind.FILE, BackendKind.SOCKET)


class SocketMode(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True)
class PortSpec:
    console: bool
    backend: BackendKind
    name: str
    path: str | None = None
    socket_mode: SocketMode | None = None

    def __str__(self) -> str:
        text = ("@" if self.console else "") + f"{self.backend.value}:{self.name}"
        if self.path is not None:
            text += f"={self.path}"
        if self.socket_mode is not None:
            text += f":{self.socket_mode.value}"
        return text


def parse_port_spec(text: str) -> PortSpec:
    """Parse one SPEC; raises PortSpecError naming the bad token."""
    if not text:
        raise PortSpecError(text, "empty port specification")
    console = text.startswith("@")
    body = text[1:] if console else text
    kind_token, sep, rest = body.partition(":")
    try:
        backend = BackendKind(kind_token)
    except ValueError:
        known = "|".join(kind.value for kind in BackendKind)
        raise PortSpecError(kind_token, f"unknown backend in {text!r} (expected {known})") from None
    if not sep:
        raise PortSpecError(text, f"missing ':portname' after {kind_token!r}")

    name_and_path, sep, mode_token = rest.partition(":")
    name, has_path, path = name_and_path.partition("=")
    if not name:
        raise PortSpecError(text, "missing port name")
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise PortSpecError(name, f"port name must be 1-{MAX_NAME_LENGTH} characters of A-Z a-z 0-9 . _ -")

    if has_path and not path:
        raise PortSpecError(text, "empty portpath after '='")
    if backend.needs_path and not has_path:
        raise PortSpecError(text, f"{backend.value} port {name!r} needs '=portpath'")
    if not backend.needs_path and has_path:
        raise PortSpecError(path, f"{backend.value} port {name!r} takes no portpath")

    socket_mode: SocketMode | None = None
    if sep:
        if ":" in mode_token:
            raise PortSpecError(mode_token, "unexpected ':' (a portpath cannot contain ':')")
        try:
            socket_mode = SocketMode(mode_token)
        except ValueError:
            raise PortSpecError(mode_token, "socket type must be 'server' or 'client'") from None
        if backend is not BackendKind.SOCKET:
            raise PortSpecError(mode_token, f"':{mode_token}' is only valid for socket ports")
    elif backend is BackendKind.SOCKET:
        raise PortSpecError(text, "socket port needs ':server' or ':client'")
    return PortSpec(console, backend, name, path or None, socket_mode)


def validate_ports(ports: list[PortSpec], max_ports: int | None = MAX_PORTS) -> None:
    """Checks that apply to the whole port list (names, count, shared resources).

    `max_ports` None: the ports of several devices, checked for what they
    share (names, the terminal, socket paths) but not counted."""
    if not ports:
        raise PortSpecError(DEVICE_NAME, "needs at least one port")
    if max_ports is not None and len(ports) > max_ports:
        raise PortSpecError(str(ports[max_ports]), f"too many ports (at most {max_ports})")
    names: set[str] = set()
    stdio_seen = False
    socket_paths: set[str] = set()
    for port in ports:
        if port.name in names:
            raise PortSpecError(port.name, "duplicate port name")
        names.add(port.name)
        if port.backend is BackendKind.STDIO:
            if stdio_seen:
                raise PortSpecError(str(port), "only one port can use stdio")
            stdio_seen = True
        if port.backend is BackendKind.SOCKET and port.path is not None:
            if port.path in socket_paths:
                raise PortSpecError(port.path, "socket path used by two ports")
            socket_paths.add(port.path)


def parse_device_option(text: str) -> list[PortSpec]:
    """Parse "virtio-console,SPEC[,SPEC...]" into validated ports (port 0 first)."""
    device, _, specs = text.partition(",")
    if device != DEVICE_NAME:
        raise PortSpecError(device, f"expected {DEVICE_NAME!r}")
    if not specs:
        raise PortSpecError(text, "needs at least one port specification")
    ports = [parse_port_spec(spec) for spec in specs.split(",")]
    validate_ports(ports)
    return ports
