"""The control socket server: a unix stream socket, its own thread.

Its own thread, not the event loop's: `dump` waits for every vCPU to answer,
and a client that reads its replies slowly must not hold up guest I/O. Device
changes still run on the event loop thread (the device posts them there and
waits: hotplug.py), where all of the device's work runs.

The socket is made 0600 in a private directory next to PATH, then renamed to
PATH, so that it is never reachable with wider permissions. close() stops
the thread, closes every connection and removes PATH.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import tempfile
import threading
from typing import Callable

from microvmm.control.protocol import (MAX_LINE, ErrorCode, RequestError, encode, error_reply,
                                       parse_request, request_id_of, result_reply)

logger = logging.getLogger(__name__)

MAX_CLIENTS = 16
#: A client that does not take its reply within this time is dropped.
SEND_TIMEOUT = 5.0


class ControlPathError(Exception):
    """PATH cannot be the control socket (exists and is not a stale socket...)."""


def check_control_path(path: str) -> None:
    """Refuse PATH if something is there other than a stale socket (which is removed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ControlPathError(f"--control {path}: directory {directory} does not exist") from None
        return
    except OSError as err:
        raise ControlPathError(f"--control {path}: {err.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlPathError(f"--control {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody listens
        return
    except OSError as err:
        raise ControlPathError(f"--control {path}: {err.strerror}") from None
    finally:
        probe.close()
    raise ControlPathError(f"--control {path}: another process listens on this socket")


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()


class ControlServer:
    """Serves `handle(line) -> (reply dict, after-callback or None)` to each client line."""

    def __init__(self, path: str, handle: Callable[[bytes], tuple[dict, Callable[[], None] | None]]):
        self.path = path
        self._handle = handle
        self._selector = selectors.DefaultSelector()
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._clients: dict[int, _Client] = {}
        self._stopping = False
        self._listener = self._bind(path)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="microvmm-control", daemon=True)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        private = tempfile.mkdtemp(prefix=".microvmm-control-", dir=os.path.dirname(os.path.abspath(path)))
        staging = os.path.join(private, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(staging)
            os.chmod(staging, 0o600)
            sock.listen(MAX_CLIENTS)
            os.rename(staging, path)
        except BaseException:
            sock.close()
            raise
        finally:
            if os.path.lexists(staging):
                os.unlink(staging)
            os.rmdir(private)
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, drop every client, remove the socket file; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        try:
            os.write(self._wakeup_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("control socket thread did not stop within %s s", timeout)
        if not self._thread.is_alive():
            self._release()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _release(self) -> None:
        for client in list(self._clients.values()):
            client.sock.close()
        self._clients.clear()
        self._listener.close()
        self._selector.close()
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)

    # ---- the thread -------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping:
            try:
                events = self._selector.select()
            except OSError as err:
                logger.error("control socket: %s", err)
                return
            for key, _ in events:
                if self._stopping:
                    return
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wakeup_r:
                    return
                else:
                    self._readable(self._clients.get(key.fd))

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            logger.warning("control socket: accept: %s", err.strerror)
            return
        if len(self._clients) >= MAX_CLIENTS:
            self._send(_Client(sock), error_reply(None, ErrorCode.FAILED.value,
                                                  f"too many control connections (at most {MAX_CLIENTS})"))
            sock.close()
            return
        sock.settimeout(SEND_TIMEOUT)
        client = _Client(sock)
        self._clients[sock.fileno()] = client
        self._selector.register(sock, selectors.EVENT_READ)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd in self._clients:
            del self._clients[fd]
            self._selector.unregister(client.sock)
        client.sock.close()

    def _send(self, client: _Client, reply: dict) -> bool:
        try:
            client.sock.sendall(encode(reply))
            return True
        except OSError:  # gone, or not reading its replies
            return False

    def _readable(self, client: _Client | None) -> None:
        if client is None:
            return
        try:
            data = client.sock.recv(MAX_LINE)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.buffer += data
        while True:
            end = client.buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(client.buffer[:end])
            del client.buffer[:end + 1]
            if len(line) > MAX_LINE:
                self._too_long(client)
                return
            if not self._answer(client, line):
                self._drop(client)
                return
        if len(client.buffer) > MAX_LINE:
            self._too_long(client)

    def _too_long(self, client: _Client) -> None:
        self._send(client, error_reply(None, ErrorCode.LINE_TOO_LONG.value,
                                       f"request line longer than {MAX_LINE} bytes; connection closed"))
        self._drop(client)

    def _answer(self, client: _Client, line: bytes) -> bool:
        if not line.strip():
            return True
        after = None
        try:
            reply, after = self._handle(line)
        except Exception as err:  # the server keeps serving whatever a command does
            logger.error("control socket: internal error: %s", err, exc_info=True)
            reply = error_reply(request_id_of(line), ErrorCode.INTERNAL.value, f"{type(err).__name__}: {err}")
        sent = self._send(client, reply)
        if after is not None:
            after()
        return sent


def line_handler(commands) -> Callable[[bytes], tuple[dict, Callable[[], None] | None]]:
    """ControlCommands as the server's line handler."""
    def handle(line: bytes) -> tuple[dict, Callable[[], None] | None]:
        try:
            request = parse_request(line)
        except RequestError as err:
            return error_reply(request_id_of(line), err.code, str(err)), None
        try:
            reply = commands.handle(request)
        except RequestError as err:
            return error_reply(request.id, err.code, str(err)), None
        return result_reply(request.id, reply.result), reply.after
    return handle
