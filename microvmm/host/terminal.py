"""The host terminal when it is the guest's console: raw mode that is always
restored, and the Ctrl-A escape that lets a user leave a guest that ignores
Ctrl-C (which goes to the guest)."""

from __future__ import annotations

import atexit
import os
import termios
import tty

ESCAPE_CHAR = 0x01  # Ctrl-A, as in QEMU and screen
ESCAPE_HELP = "Ctrl-A x: quit microvmm   Ctrl-A Ctrl-A: send Ctrl-A   Ctrl-A h: this help"


class RawTerminal:
    """Puts a tty fd in raw mode; `restore()` is idempotent and registered atexit.

    Callers also call `restore()` from their signal handlers, so a killed or
    interrupted VMM never leaves the user's shell without echo.
    """

    def __init__(self, fd: int, cooked_output: bool = False):
        self.fd = fd
        #: Keep output post-processing (\n -> \r\n) for a terminal the VMM's
        #: own messages share; off where bytes must pass exactly (ports).
        self.cooked_output = cooked_output
        self._saved: list | None = None

    def enter(self) -> bool:
        if not os.isatty(self.fd):
            return False
        self._saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd, termios.TCSANOW)
        if self.cooked_output:
            attrs = termios.tcgetattr(self.fd)
            attrs[1] |= termios.OPOST | termios.ONLCR
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        atexit.register(self.restore)
        return True

    def restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass  # the terminal went away: nothing left to restore

    def __enter__(self) -> "RawTerminal":
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


class EscapeFilter:
    """Splits keyboard input into bytes for the guest and escape commands."""

    def __init__(self) -> None:
        self._pending_escape = False

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        """Returns (bytes for the guest, commands) where commands are 'quit'/'help'."""
        if not self._pending_escape and ESCAPE_CHAR not in data:
            return data, []  # the common case: typed text, no escape
        out = bytearray()
        commands: list[str] = []
        for byte in data:
            if self._pending_escape:
                self._pending_escape = False
                if byte == ESCAPE_CHAR:
                    out.append(byte)
                elif byte in (ord("x"), ord("X")):
                    commands.append("quit")
                elif byte in (ord("h"), ord("?")):
                    commands.append("help")
                else:
                    out += bytes((ESCAPE_CHAR, byte))
            elif byte == ESCAPE_CHAR:
                self._pending_escape = True
            else:
                out.append(byte)
        return bytes(out), commands
