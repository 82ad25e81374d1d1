"""Files a run creates for its user (--log, --serial file:): taken away again
when setup fails before anything was written to them, so that a typo leaves
no empty file behind; a file that existed before is never touched."""

from __future__ import annotations

import os


class CreatedFiles:
    def __init__(self) -> None:
        self._paths: list[str] = []

    def note(self, path: "str | os.PathLike[str]") -> None:
        """Call before creating `path`: remembered only if it does not exist yet."""
        if not os.path.lexists(path):
            self._paths.append(os.fspath(path))

    def remove_empty(self) -> None:
        for path in self._paths:
            try:
                if os.stat(path, follow_symlinks=False).st_size == 0:
                    os.unlink(path)
            except OSError:
                pass
        self._paths.clear()
