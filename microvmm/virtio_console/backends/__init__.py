"""Host-side ends of console ports: stdio, tty, pty, file and unix sockets.

Contract (what the device relies on):

* A backend opens its resources in its constructor, so configuration errors
  (missing tty, absent socket server, existing non-socket file) surface as a
  `BackendError` naming the path before the VM starts.
* `attach(loop, listener)` starts event-driven operation on the I/O thread.
  From then on every backend method is called on the loop thread only, and the
  backend calls the listener on the loop thread only.
* Nothing blocks. `write(data)` returns how many bytes the sink took: possibly
  fewer, or 0 when it would block or no peer is connected. The caller keeps the
  rest; a backend never drops data it was given but did not count as written.
* `write_vectored(buffers)` is `write` of the buffers' concatenation in one
  call (writev / sendmsg where the sink allows it): same return value and the
  same promise about what was not counted. At most `MAX_IOV` buffers per call.
* `read(max_bytes)` returns available input, or b"" when there is none right
  now (end of input is handled inside the backend: it stops watching the fd).
* Readiness is interest-based rather than fd-based, because a backend's fd
  changes when a socket peer comes and goes: the device says
  `set_read_interest(True)` when the guest has receive buffers and
  `set_write_interest(True)` while it has unwritten data; the backend watches
  whichever fd is current and calls `listener.backend_readable()` /
  `backend_writable()`.
* `connected` says whether someone is at the other end (socket peer present,
  pty slave opened by a reader; stdio/tty/file always). Changes are reported by
  `listener.backend_connection_changed(connected)`, deferred through the loop so
  the listener is never re-entered from inside a backend call.
* Terminal backends report their size (`terminal_size()`); a pty also notices
  size changes made on its slave side and reports `backend_resized(size)`.
* `restore()` puts terminals back as they were (termios, blocking mode). It is
  idempotent, registered with atexit, and safe to call from a signal handler
  path; `close()` restores too, and never raises.
* An fd that fails in a way no peer causes (EBADF: closed under the VMM by a
  bug elsewhere) is logged once as an error and never used again, since its
  number may already belong to another file: the port stays disconnected
  (`fault` says why) and keeps the guest's output; a socket port drops only
  that connection and accepts or reconnects as usual.

The pty backend announces its slave path as ACRN does, "virt-console backend
redirected to /dev/pts/N", on stderr (the stream is a parameter): stdout may
carry a stdio port's data and the announcement must not be mixed into it.
"""

from __future__ import annotations

from typing import Callable, TextIO

from microvmm.virtio_console.backends.base import (DEFAULT_MONITOR_INTERVAL, DEFAULT_RECONNECT_INTERVAL, MAX_IOV,
                                                   BackendError, BackendListener, PortBackend, TerminalSize,
                                                   read_terminal_size)
from microvmm.virtio_console.backends.fd import (CallbackBackend, CaptureBackend, FdSinkBackend, FileBackend,
                                                 PtyBackend, StdioBackend, TtyBackend)
from microvmm.virtio_console.backends.sockets import SocketClientBackend, SocketServerBackend
from microvmm.virtio_console.spec import BackendKind, PortSpec, SocketMode

__all__ = [
    "DEFAULT_MONITOR_INTERVAL", "DEFAULT_RECONNECT_INTERVAL", "MAX_IOV", "BackendError", "BackendListener",
    "CallbackBackend", "CaptureBackend", "FdSinkBackend", "FileBackend", "PortBackend", "PtyBackend",
    "SocketClientBackend", "SocketServerBackend", "StdioBackend", "TerminalSize", "TtyBackend",
    "create_backend", "read_terminal_size",
]


def create_backend(spec: PortSpec, announce: TextIO | None = None,
                   input_filter: Callable[[bytes], bytes] | None = None) -> PortBackend:
    """Open the backend a port spec names (raises BackendError)."""
    kind = spec.backend
    if kind is BackendKind.STDIO:
        return StdioBackend(spec.name, input_filter=input_filter)
    if kind is BackendKind.PTY:
        return PtyBackend(spec.name, announce=announce)
    assert spec.path is not None  # the spec parser guarantees it
    if kind is BackendKind.TTY:
        return TtyBackend(spec.name, spec.path)
    if kind is BackendKind.FILE:
        return FileBackend(spec.name, spec.path)
    if spec.socket_mode is SocketMode.SERVER:
        return SocketServerBackend(spec.name, spec.path)
    return SocketClientBackend(spec.name, spec.path)
