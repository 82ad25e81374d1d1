"""Package attributes that load from their submodule on first use (PEP 562).

A package lists which submodule defines each public name; importing the
package then costs nothing for the names a run never touches (start-up time,
issue 6), while `from package import name` and `package.name` work as usual.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, namespace: dict[str, Any],
                 exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`, whose `exports` map public name ->
    submodule (relative to the package). A loaded name is stored in the
    package's `namespace` (its globals()), so later lookups skip __getattr__."""

    def __getattr__(name: str) -> Any:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
