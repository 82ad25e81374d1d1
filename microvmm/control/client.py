"""ControlClient (the pytest plugin and scripts) and `microvmm ctl PATH COMMAND [ARG...]`."""

from __future__ import annotations

import itertools
import json
import socket
import sys
from typing import Any

from microvmm.control.protocol import ENCODING, MAX_LINE, ControlConnectError, ControlReplyError  # noqa: F401


class ControlClient:
    """One connection to a --control socket; `call` sends a request and waits for its reply."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except FileNotFoundError:
            self._sock.close()
            raise ControlConnectError(f"{path}: no such control socket (is `microvmm run --control "
                                      f"{path}` running?)") from None
        except OSError as err:
            self._sock.close()
            raise ControlConnectError(f"{path}: {err.strerror or err}") from None
        self._buffer = bytearray()
        self._ids = itertools.count(1)

    def request(self, cmd: str, *args: str | int) -> dict:
        """The raw reply object."""
        request_id = next(self._ids)
        line = json.dumps({"id": request_id, "cmd": cmd, "args": list(args)}).encode(ENCODING) + b"\n"
        self._sock.sendall(line)
        while True:
            reply = json.loads(self._read_line())
            if reply.get("id") == request_id or reply.get("id") is None:
                return reply

    def call(self, cmd: str, *args: str | int) -> Any:
        """The result; ControlReplyError for an error object."""
        reply = self.request(cmd, *args)
        if "error" in reply:
            error = reply["error"]
            raise ControlReplyError(error.get("code", "?"), error.get("message", ""))
        return reply.get("result")

    def _read_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                return line
            data = self._sock.recv(MAX_LINE)
            if not data:
                raise ControlConnectError(f"{self.path}: the VM closed the control connection")
            self._buffer += data

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_result(cmd: str, result: Any) -> str:
    """A readable rendering of a result (ctl without --json)."""
    if cmd == "ports" and isinstance(result, list):
        lines = [f"{'DEVICE':<17} {'ID':>2} {'NAME':<20} {'HOST':<6} {'GUEST':<6} {'TO-GUEST':>9} "
                 f"{'TO-HOST':>9} {'DROPS':>6}  BACKEND"]
        for port in result:
            lines.append(f"{port['device']:<17} {port['id']:>2} {port['name']:<20} "
                         f"{'open' if port['host_open'] else 'closed':<6} "
                         f"{'open' if port['guest_open'] else 'closed':<6} {port['to_guest_bytes']:>9} "
                         f"{port['to_host_bytes']:>9} {port['dropped_bytes']:>6}  {port['backend']}")
        return "\n".join(lines)
    if isinstance(result, str):
        return result
    if cmd == "stats" and isinstance(result, dict):
        return "\n".join(f"{key}: {value}" for key, value in result.items())
    return json.dumps(result)


def _torture(args) -> int:
    """`ctl PATH torture [SEED [EVENTS]]` (torture.py), run from this client."""
    import os
    import random as _random

    from microvmm.control.torture import DEFAULT_EVENTS, run_torture
    try:
        seed = int(args.ctl_args[0]) if args.ctl_args else _random.SystemRandom().randrange(1 << 32)
        events = int(args.ctl_args[1]) if len(args.ctl_args) > 1 else DEFAULT_EVENTS
    except ValueError:
        print("microvmm: error: torture takes [SEED [EVENTS]] (integers)", file=sys.stderr)
        return 2
    directory = os.path.dirname(os.path.abspath(args.path))
    try:
        with ControlClient(args.path, timeout=args.timeout) as client:
            summary = run_torture(client, seed, events, directory)
    except ControlConnectError as err:
        print(f"microvmm: error: {err} (torture seed {seed})", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"microvmm: error: {args.path}: {err} (torture seed {seed})", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"seed": summary.seed, "applied": summary.applied, "refused": summary.refused,
                          "id_budget": summary.id_budget, "log": summary.log}))
    else:
        print("\n".join(summary.log + [summary.text()]))
    return 0


def ctl_main(args) -> int:
    """`microvmm ctl`: 0 on a result, 1 on an error object, 2 when the socket is not there."""
    if args.ctl_command == "torture":
        return _torture(args)
    try:
        with ControlClient(args.path, timeout=args.timeout) as client:
            reply = client.request(args.ctl_command, *args.ctl_args)
    except ControlConnectError as err:
        print(f"microvmm: error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:  # socket.timeout is an OSError
        print(f"microvmm: error: {args.path}: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reply))
    elif "error" in reply:
        print(f"microvmm: error: {reply['error'].get('code')}: {reply['error'].get('message')}", file=sys.stderr)
    else:
        print(format_result(args.ctl_command, reply.get("result")))
    return 1 if "error" in reply else 0
