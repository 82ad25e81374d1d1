"""The control socket's wire format.

A request is one line holding a JSON object:

    {"id": 7, "cmd": "resize", "args": ["term", 100, 30]}

`id` (optional, any JSON value) comes back in the reply; `args` (optional) is
a list of strings or numbers. A reply is one line:

    {"id": 7, "result": ...}
    {"id": 7, "error": {"code": "unknown-port", "message": "no port named 'term'"}}

A line longer than MAX_LINE bytes gets an error reply and the connection is
dropped (the rest of it cannot be told from the next request).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

MAX_LINE = 64 * 1024
ENCODING = "utf-8"


class ControlConnectError(Exception):
    """The control socket cannot be reached."""


class ControlReplyError(Exception):
    """The VM answered with an error object."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ErrorCode(str, enum.Enum):
    BAD_JSON = "bad-json"
    BAD_REQUEST = "bad-request"
    LINE_TOO_LONG = "line-too-long"
    UNKNOWN_COMMAND = "unknown-command"
    BAD_ARGUMENTS = "bad-arguments"
    UNKNOWN_PORT = "unknown-port"
    FAILED = "failed"
    INTERNAL = "internal"


class RequestError(Exception):
    """A request that gets an error reply; `code` is an ErrorCode value or a
    more specific word from the device (e.g. "no-multiport")."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Request:
    cmd: str
    args: list = field(default_factory=list)
    id: Any = None


def parse_request(line: bytes) -> Request:
    """One line (without its newline) -> a Request; RequestError if it is none."""
    try:
        value = json.loads(line.decode(ENCODING))
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(ErrorCode.BAD_JSON.value, f"not a JSON object: {err}") from None
    if not isinstance(value, dict):
        raise RequestError(ErrorCode.BAD_REQUEST.value, f"a request is a JSON object, not {type(value).__name__}")
    cmd = value.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError(ErrorCode.BAD_REQUEST.value, "the request has no \"cmd\" string")
    args = value.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, (str, int)) and not isinstance(a, bool)
                                             for a in args):
        raise RequestError(ErrorCode.BAD_REQUEST.value, "\"args\" must be a list of strings and integers")
    return Request(cmd, args, value.get("id"))


def request_id_of(line: bytes) -> Any:
    """The id of a request that failed to parse, if one can be read."""
    try:
        value = json.loads(line.decode(ENCODING))
    except (UnicodeDecodeError, ValueError):
        return None
    return value.get("id") if isinstance(value, dict) else None


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode(ENCODING) + b"\n"


def result_reply(request_id: Any, result: Any) -> dict:
    return {"id": request_id, "result": result}


def error_reply(request_id: Any, code: str, message: str) -> dict:
    return {"id": request_id, "error": {"code": code, "message": message}}
