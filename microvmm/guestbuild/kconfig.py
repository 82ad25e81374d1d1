"""Kernel .config files: parse them, and check that a fragment's options stuck."""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from microvmm.guestbuild.errors import GuestBuildError


class ConfigMismatchError(GuestBuildError):
    """Options of the kernel config fragment did not end up in the final .config."""

    def __init__(self, mismatches: Sequence["ConfigMismatch"]) -> None:
        self.mismatches = list(mismatches)
        lines = "\n".join(f"  {m}" for m in self.mismatches)
        super().__init__(f"{len(self.mismatches)} option(s) of the fragment did not stick:\n{lines}")


@dataclasses.dataclass(frozen=True)
class ConfigMismatch:
    option: str
    wanted: str
    got: str | None  # None: absent from .config

    def __str__(self) -> str:
        got = "absent" if self.got is None else self.got
        return f"{self.option}: wanted {self.wanted}, got {got}"


_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_kconfig(text: str) -> dict[str, str]:
    """Map option -> value for a .config or fragment; '# X is not set' gives 'n'."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if match := _SET_RE.match(line):
            options[match.group(1)] = match.group(2)
        elif match := _UNSET_RE.match(line):
            options[match.group(1)] = "n"
    return options


def verify_config(fragment: Mapping[str, str], final: Mapping[str, str]) -> list[ConfigMismatch]:
    """Options of `fragment` whose value differs in `final` ('n' also matches an absent option)."""
    mismatches = []
    for option, wanted in fragment.items():
        got = final.get(option)
        if wanted == "n" and got in (None, "n"):
            continue
        if got != wanted:
            mismatches.append(ConfigMismatch(option, wanted, got))
    return mismatches
