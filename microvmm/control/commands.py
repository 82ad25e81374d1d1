"""The control socket's commands, run against a ControlTarget.

The target is the running VMM (vmmlink.py) or, in tests, a fake; the
consoles it lists are VirtioConsole devices (or anything with their
hotplug.py calls). Every failure becomes a RequestError (an error reply).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from microvmm.control.protocol import ErrorCode, Request, RequestError

logger = logging.getLogger(__name__)

#: Ports the run itself owns (`-- CMD`, the kernel log, the test agent):
#: removing or closing them would cut the run's own line to the guest.
RESERVED_PREFIX = "microvmm."


class ControlTarget(Protocol):
    def consoles(self) -> list[tuple[str, Any]]:
        """(device name, console device) of every running virtio-console."""

    def open_backend(self, spec: Any) -> Any:
        """The host end of a new port (raises BackendError)."""

    def dump(self) -> str:
        """The SIGUSR1 report: where each vCPU is."""

    def stats(self) -> dict:
        """Run statistics (exits, bus accesses, uptime)."""

    def stop(self) -> None:
        """End the run (as SIGTERM would)."""


@dataclass
class Reply:
    """A command's result, and what to do once it has been sent."""

    result: Any
    after: Callable[[], None] | None = None


def _arity(request: Request, names: str) -> list:
    wanted = names.split()
    if len(request.args) != len(wanted):
        usage = " ".join([request.cmd, *wanted])
        raise RequestError(ErrorCode.BAD_ARGUMENTS.value,
                           f"{request.cmd} takes {len(wanted)} argument(s): {usage}")
    return request.args


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RequestError(ErrorCode.BAD_ARGUMENTS.value, f"{what} must be a string, not {value!r}")
    return value


def _number(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RequestError(ErrorCode.BAD_ARGUMENTS.value, f"{what} must be an integer, not {value!r}") from None


class ControlCommands:
    """Dispatches requests to the target; `handle` never raises anything but RequestError."""

    def __init__(self, target: ControlTarget):
        self.target = target
        self._commands: dict[str, Callable[[Request], Reply]] = {
            "help": self._help, "ports": self._ports, "add-port": self._add_port,
            "remove-port": self._remove_port, "open": self._open, "close": self._close,
            "resize": self._resize, "send": self._send, "stats": self._stats, "dump": self._dump,
            "stop": self._stop,
        }

    @property
    def names(self) -> list[str]:
        return sorted(self._commands)

    def handle(self, request: Request) -> Reply:
        command = self._commands.get(request.cmd)
        if command is None:
            raise RequestError(ErrorCode.UNKNOWN_COMMAND.value,
                               f"unknown command {request.cmd!r} (commands: {', '.join(self.names)})")
        from microvmm.virtio_console.hotplug import PortControlError
        try:
            return command(request)
        except RequestError:
            raise
        except PortControlError as err:
            raise RequestError(err.code, str(err)) from None
        except ValueError as err:  # a port spec, a port name (PortSpecError)
            raise RequestError(ErrorCode.BAD_ARGUMENTS.value, str(err)) from None
        except Exception as err:  # a device or host failure: an answer, not a crash
            logger.warning("control: %s: %s", request.cmd, err, exc_info=True)
            raise RequestError(ErrorCode.FAILED.value, f"{request.cmd}: {type(err).__name__}: {err}") from None

    # ---- lookups ---------------------------------------------------------------

    def _find(self, name: Any) -> tuple[str, Any]:
        name = _text(name, "NAME")
        for device_name, console in self.target.consoles():
            if console.find_port(name) is not None:
                return device_name, console
        raise RequestError(ErrorCode.UNKNOWN_PORT.value, f"no port named {name!r}")

    def _find_changeable(self, name: Any) -> tuple[str, Any]:
        found = self._find(name)
        if name.startswith(RESERVED_PREFIX):
            raise RequestError(ErrorCode.BAD_ARGUMENTS.value,
                               f"port {name!r} belongs to the run itself ({RESERVED_PREFIX}*)")
        return found

    # ---- commands -----------------------------------------------------------------

    def _help(self, request: Request) -> Reply:
        _arity(request, "")
        return Reply(self.names)

    def _ports(self, request: Request) -> Reply:
        _arity(request, "")
        ports = []
        for device_name, console in self.target.consoles():
            for state in console.port_states():
                ports.append({"device": device_name, **state})
        return Reply(ports)

    def _add_port(self, request: Request) -> Reply:
        if len(request.args) not in (1, 2):
            raise RequestError(ErrorCode.BAD_ARGUMENTS.value, "add-port takes SPEC [DEVICE], e.g. "
                               "add-port socket:data=/tmp/data.sock:server")
        from microvmm.virtio_console.spec import BackendKind, parse_port_spec
        spec = parse_port_spec(_text(request.args[0], "SPEC"))
        if spec.backend is BackendKind.STDIO:
            raise RequestError(ErrorCode.BAD_ARGUMENTS.value, "a port added at run time cannot use stdio")
        if spec.name.startswith(RESERVED_PREFIX):
            raise RequestError(ErrorCode.BAD_ARGUMENTS.value, f"port names {RESERVED_PREFIX}* are the run's")
        consoles = self.target.consoles()
        if not consoles:
            raise RequestError(ErrorCode.FAILED.value, "this VM has no virtio-console device")
        for _, console in consoles:
            if console.find_port(spec.name) is not None:
                raise RequestError(ErrorCode.BAD_ARGUMENTS.value, f"a port named {spec.name!r} exists")
        if len(request.args) == 2:
            wanted = _text(request.args[1], "DEVICE")
            matching = [c for c in consoles if c[0] == wanted]
            if not matching:
                raise RequestError(ErrorCode.BAD_ARGUMENTS.value, f"no virtio-console device {wanted!r} "
                                   f"(devices: {', '.join(n for n, _ in consoles)})")
            device_name, console = matching[0]
        else:
            device_name, console = consoles[0]
        from microvmm.virtio_console.backends import BackendError
        try:
            backend = self.target.open_backend(spec)
        except BackendError as err:
            raise RequestError(ErrorCode.FAILED.value, str(err)) from None
        try:
            port_id = console.add_port(spec, backend)
        except BaseException:
            backend.close()
            raise
        return Reply({"device": device_name, "id": port_id, "name": spec.name})

    def _remove_port(self, request: Request) -> Reply:
        (name,) = _arity(request, "NAME")
        device_name, console = self._find_changeable(name)
        return Reply({"device": device_name, "id": console.remove_port(name), "name": name})

    def _open(self, request: Request) -> Reply:
        (name,) = _arity(request, "NAME")
        _, console = self._find_changeable(name)
        return Reply({"name": name, "host_open": console.set_host_open(name, True)})

    def _close(self, request: Request) -> Reply:
        (name,) = _arity(request, "NAME")
        _, console = self._find_changeable(name)
        return Reply({"name": name, "host_open": console.set_host_open(name, False)})

    def _resize(self, request: Request) -> Reply:
        name, cols, rows = _arity(request, "NAME COLS ROWS")
        _, console = self._find(name)
        cols, rows = _number(cols, "COLS"), _number(rows, "ROWS")
        console.resize_port(name, cols, rows)
        return Reply({"name": name, "cols": cols, "rows": rows})

    def _send(self, request: Request) -> Reply:
        name, data = _arity(request, "NAME DATA")
        _, console = self._find_changeable(name)
        payload = _text(data, "DATA").encode("utf-8", "surrogateescape")
        return Reply({"name": name, "bytes": len(payload), "queued": console.send_to_port(name, payload)})

    def _stats(self, request: Request) -> Reply:
        _arity(request, "")
        return Reply(self.target.stats())

    def _dump(self, request: Request) -> Reply:
        _arity(request, "")
        return Reply(self.target.dump())

    def _stop(self, request: Request) -> Reply:
        _arity(request, "")
        return Reply("stopping", after=self.target.stop)
