"""The user's console ports' host ends (--console, --device), opened while
nothing runs yet so that a failure ends the VMM before the guest starts."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from microvmm.virtio_console.backends import PortBackend
    from microvmm.virtio_console.spec import PortSpec


def open_port_backends(specs: Sequence["PortSpec"], on_escape: Callable[[list[str]], None],
                       on_open: Callable[["PortBackend"], None]) -> list[tuple["PortSpec", "PortBackend"]]:
    """(spec, backend) per port; `on_open(backend)` for each as it opens (the
    caller closes them at the end, also after a later one failed). A stdio
    port's input passes the Ctrl-A escape filter: `on_escape(commands)`.
    Raises virtio_console.BackendError."""
    from microvmm.host.terminal import EscapeFilter  # deferred: termios, only with console ports
    from microvmm.virtio_console import create_backend
    escape = EscapeFilter()

    def stdio_filter(data: bytes) -> bytes:
        data, commands = escape.feed(data)
        if commands:
            on_escape(commands)
        return data

    ports = []
    for spec in specs:
        backend = create_backend(spec, sys.stderr, stdio_filter)
        on_open(backend)
        ports.append((spec, backend))
    return ports
