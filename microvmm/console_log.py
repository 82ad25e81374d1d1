"""The guest's recent console output, kept for failure reports, and watched for
the lines that mean the guest kernel is dying."""

from __future__ import annotations

import collections
import re
import threading
from typing import Callable

# What Linux prints when it panics; panic=-1 then reboots at once, so this line
# is what tells a panic reboot from a requested one.
PANIC_PATTERN = re.compile(rb"Kernel panic - not syncing")


class ConsoleHistory:
    """Last `max_lines` lines of console output (bytes in, str lines out)."""

    def __init__(self, max_lines: int = 40,
                 on_panic: Callable[[str], None] | None = None):
        self._lines: collections.deque[bytes] = collections.deque(maxlen=max_lines)
        self._partial = b""
        self._lock = threading.Lock()
        self._on_panic = on_panic
        self.panic_line: str | None = None

    def feed(self, data: bytes) -> None:
        with self._lock:
            text = self._partial + data
            *complete, self._partial = text.split(b"\n")
            if len(self._partial) > 4096:  # a line without end must not grow forever
                complete.append(self._partial)
                self._partial = b""
            for line in complete:
                line = line.rstrip(b"\r")
                self._lines.append(line)
                if self.panic_line is None and PANIC_PATTERN.search(line):
                    self.panic_line = line.decode(errors="replace").strip()
                    if self._on_panic:
                        self._on_panic(self.panic_line)

    def lines(self) -> list[str]:
        with self._lock:
            out = [line.decode(errors="replace") for line in self._lines]
            if self._partial:
                out.append(self._partial.decode(errors="replace"))
            return out
