"""KTAP / TAP results of a guest command (`microvmm run --ktap`): one result
per test for --junit and --json.

Reads what kselftest and KUnit print (Documentation/dev-tools/ktap.rst) and
plain TAP 13/14:

- version lines (`KTAP version 1`, `TAP version 13`), plans (`1..N`, with an
  optional `# SKIP reason`), result lines (`ok N name`, `not ok N name`,
  directives `# SKIP`, `# TODO`, `# XFAIL`), `Bail out!`, diagnostics;
- nested subtests: a subtest's lines are indented (4 spaces in KTAP) or, as
  kselftest's runner prints a test program's own TAP, prefixed with `# `; a
  `# Subtest: NAME` line names it; its result is the parent's next result
  line at the outer level;
- the kernel's timestamp prefix (`[    1.234567] `, KUnit results read from
  the kernel log) is dropped.

The input is untrusted and noisy (kernel messages interleaved, output cut off
by a crash): anything that is not a TAP line is a diagnostic of the test
running, never an error, and never closes a subtest; only a TAP line at an
outer level does. When the output ends early (a panic, a timeout, a command
that stopped) the test that was running and the tests the plan still owes
become failures carrying the console's last lines.

A parser of our own: tap.py (tappy) reads TAP 13 with YAML blocks but no
KTAP version lines and no nesting (indented lines are not results to it), and
pytap13 strips indentation (subtests merge with their parents); neither reads
kselftest's `# ` nesting. kunit.py's parser lives in the kernel tree, not on PyPI.
"""

from __future__ import annotations

import collections
import enum
import re
from dataclasses import dataclass, field
from typing import Iterable

#: Diagnostic lines kept per test for its failure text (the latest ones).
MAX_OUTPUT_LINES = 100
#: Longer lines are cut (a line without end must not grow without bound).
MAX_LINE_CHARS = 1000
#: Collected lines are parsed up to this size; a line grows no further.
_MAX_PARTIAL = 64 * 1024

_KERNEL_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])?\s?")
_VERSION = re.compile(r"^K?TAP version \d+\s*$")
_PLAN = re.compile(r"^1\.\.(\d+)\s*(?:#\s*(.*))?$")
_RESULT = re.compile(r"^(not ok|ok)(?:\s+(\d+))?\b\s*(?:-\s+)?(.*)$")
_SUBTEST = re.compile(r"^#\s*Subtest:\s*(.*?)\s*$")
_BAIL_OUT = re.compile(r"^Bail out!\s*(.*)$")
_DIRECTIVE = re.compile(r"^(SKIP|TODO|XFAIL)\S*\s*(.*)$", re.IGNORECASE)
#: kselftest's runner prefixes a test program's own output with '# '.
_HASH_NESTING = re.compile(r"^((?:[ \t]*# )+)(?=[ \t]*K?TAP version \d+\s*$)")


class CaseStatus(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    #: A `# TODO` test: a known failure, not counted as one (its message says how it went).
    TODO = "todo"


@dataclass
class KtapCase:
    """One test: `path` names it from its outermost parent down."""

    path: tuple[str, ...]
    status: CaseStatus
    number: int | None = None
    message: str = ""
    #: Diagnostic lines printed while it ran (at most MAX_OUTPUT_LINES, the latest).
    output: list[str] = field(default_factory=list)
    #: Seconds from the previous result at its level (or its level's start) to its own.
    time_s: float | None = None

    @property
    def name(self) -> str:
        return " / ".join(self.path)

    def as_json(self) -> dict:
        return {"name": self.name, "path": list(self.path), "number": self.number,
                "status": self.status.value, "message": self.message,
                "time_s": None if self.time_s is None else round(self.time_s, 3), "output": self.output}


@dataclass
class KtapReport:
    cases: list[KtapCase]
    #: Whether any KTAP/TAP line was seen at all.
    found: bool
    #: The run's exit status before --ktap judged it (judge_outcome).
    command_exit: int | None = None

    @property
    def failed(self) -> list[KtapCase]:
        return [case for case in self.cases if case.status is CaseStatus.FAIL]

    def counts(self) -> dict[str, int]:
        counter = collections.Counter(case.status.value for case in self.cases)
        return {status.value: counter.get(status.value, 0) for status in CaseStatus}


@dataclass
class _Level:
    """One (sub)test document being read: its line prefix and what it has said."""

    prefix: str
    started_at: float
    name: str | None = None
    plan: int | None = None
    results: int = 0
    last_number: int = 0
    last_at: float = 0.0
    bailed: str | None = None
    #: Finished cases inside this level, paths relative to it.
    cases: list[KtapCase] = field(default_factory=list)
    #: A closed subtest level waiting for this level's next result line (its own result).
    pending: "_Level | None" = None
    output: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_OUTPUT_LINES))

    def __post_init__(self) -> None:
        self.last_at = self.started_at


class KtapParser:
    """Streaming: feed_line() each line as it comes, finish() at the end."""

    def __init__(self) -> None:
        self._stack: list[_Level] = [_Level("", 0.0)]
        self._found = False
        self._last_at = 0.0

    def feed_line(self, line: str, at: float | None = None) -> None:
        if at is None:
            at = self._last_at
        self._last_at = at
        line = _KERNEL_TIMESTAMP.sub("", line.rstrip("\r\n"), count=1)[:MAX_LINE_CHARS]
        depth = max(i for i, level in enumerate(self._stack) if line.startswith(level.prefix))
        content = line[len(self._stack[depth].prefix):]
        hashed = _HASH_NESTING.match(content)
        extra = hashed.group(1) if hashed else content[:len(content) - len(content.lstrip(" \t"))]
        rest = content[len(extra):]
        kind = _classify(rest)
        if kind is None:
            # Not a TAP line: output of the test running at the deepest open level.
            self._stack[-1].output.append(line)
            return
        self._found = True
        while len(self._stack) > depth + 1:
            self._close_top()
        level = self._stack[-1]
        if extra:
            level = _Level(level.prefix + extra, at)
            self._stack.append(level)
        if kind == "version":
            return
        if kind == "subtest":
            name = _SUBTEST.match(rest).group(1)
            if level.results == 0 and level.plan is None and level.name is None:
                level.name = name
            else:  # not where a subtest starts: what it says is output
                level.output.append(line)
            return
        if kind == "plan":
            # ('1..0 # SKIP why': nothing to run; the parent's result line says SKIP)
            level.plan = int(_PLAN.match(rest).group(1))
            return
        if kind == "bail":
            reason = _BAIL_OUT.match(rest).group(1) or "no reason given"
            level.bailed = reason
            level.cases.append(KtapCase(("Bail out!",), CaseStatus.FAIL, None, f"Bail out! {reason}",
                                        list(level.output), at - level.last_at))
            level.output.clear()
            return
        self._result(level, rest, at)

    def _close_top(self) -> None:
        """A subtest level ends (its parent's next TAP line came): it waits for its result."""
        child = self._stack.pop()
        parent = self._stack[-1]
        if parent.pending is not None:  # two subtests without a result line between them
            self._unreported(parent, parent.pending, "its result line is missing")
        parent.pending = child

    def _result(self, level: _Level, rest: str, at: float) -> None:
        match = _RESULT.match(rest)
        ok = match.group(1) == "ok"
        number = int(match.group(2)) if match.group(2) else level.last_number + 1
        description, directive, reason = _split_directive(match.group(3))
        child = level.pending
        level.pending = None
        name = description or (child.name if child is not None and child.name else f"test {number}")
        status = CaseStatus.PASS if ok else CaseStatus.FAIL
        message = ""
        if directive == "SKIP":
            status, message = CaseStatus.SKIP, reason or "skipped"
        elif directive == "TODO":
            status = CaseStatus.TODO
            message = f"TODO{': ' + reason if reason else ''} ({'passed' if ok else 'failed, as expected'})"
        elif directive == "XFAIL":
            message = f"XFAIL{': ' + reason if reason else ''}"
        elif not ok:
            message = f"not ok {number} {name}"
        if child is not None:
            level.cases.extend(_under(name, self._finish_level(child, "")))
        level.cases.append(KtapCase((name,), status, number, message, list(level.output), at - level.last_at))
        level.output.clear()
        level.results += 1
        level.last_number = number
        level.last_at = at

    def _unreported(self, level: _Level, child: _Level, why: str, tail: Iterable[str] = ()) -> None:
        """A subtest whose own result never came: a failure, its cases kept."""
        number = level.last_number + 1
        name = child.name or f"test {number}"
        cases = self._finish_level(child, why, tail)
        level.cases.extend(_under(name, cases))
        level.cases.append(KtapCase((name,), CaseStatus.FAIL, number, f"no result: {why}",
                                    [*child.output, *level.output, *tail], None))
        level.output.clear()
        level.results += 1
        level.last_number = number

    def _finish_level(self, level: _Level, why: str, tail: Iterable[str] = ()) -> list[KtapCase]:
        """A level's cases, with a failure for the tests its plan still owes."""
        if level.pending is not None:
            self._unreported(level, level.pending, why or "its result line is missing", tail)
        cases = level.cases
        if level.plan is not None and level.bailed is None:
            if level.results < level.plan:
                first, last = level.results + 1, level.plan
                what = f"test {first}" if first == last else f"tests {first}-{last}"
                cases.append(KtapCase((f"{what} (no result)",), CaseStatus.FAIL, first,
                                      f"planned 1..{level.plan}, {level.results} reported"
                                      f"{': ' + why if why else ''}",
                                      [*level.output, *tail], None))
            elif level.results > level.plan:
                cases.append(KtapCase(("plan",), CaseStatus.FAIL, None,
                                      f"planned 1..{level.plan}, {level.results} reported", [], None))
        return cases

    def finish(self, tail: Iterable[str] = (), why: str = "the output ended") -> KtapReport:
        """Everything read, as cases. `tail` (the console's last lines) and
        `why` (how the run ended) go into the failures of unfinished tests."""
        tail = list(tail)
        while len(self._stack) > 1:
            child = self._stack.pop()
            parent = self._stack[-1]
            if parent.pending is not None:
                self._unreported(parent, parent.pending, "its result line is missing")
            self._unreported(parent, child, f"{why} while it ran", tail)
        root = self._stack[0]
        cases = self._finish_level(root, why, tail)
        if not self._found:
            cases.append(KtapCase(("ktap",), CaseStatus.FAIL, None,
                                  f"no KTAP/TAP output from the command ({why})", tail, None))
        self._stack = [_Level("", 0.0)]
        return KtapReport(cases, self._found)


def _classify(rest: str) -> str | None:
    if rest.startswith(("ok", "not ok")) and _RESULT.match(rest):
        return "result"
    if _PLAN.match(rest):
        return "plan"
    if _VERSION.match(rest):
        return "version"
    if rest.startswith("#") and _SUBTEST.match(rest):
        return "subtest"
    if rest.startswith("Bail out!"):
        return "bail"
    return None


def _split_directive(text: str) -> tuple[str, str | None, str]:
    """'name # SKIP why' -> ('name', 'SKIP', 'why'); '\\#' in a name is a '#'."""
    parts = re.split(r"(?<!\\)#", text, maxsplit=1)
    description = parts[0].strip().replace("\\#", "#")
    if len(parts) == 2:
        directive = _DIRECTIVE.match(parts[1].strip())
        if directive:
            return description, directive.group(1).upper(), directive.group(2).strip()
    return description, None, ""


def _under(name: str, cases: list[KtapCase]) -> list[KtapCase]:
    for case in cases:
        case.path = (name, *case.path)
    return cases


def parse_ktap(text: str, tail: Iterable[str] = (), why: str = "the output ended") -> KtapReport:
    """Parse a whole output at once."""
    parser = KtapParser()
    for line in text.splitlines():
        parser.feed_line(line)
    return parser.finish(tail, why)


class KtapCollector:
    """The command's output bytes as they come (any chunking) -> KtapParser,
    with the time each chunk arrived (seconds since the run started: a
    RunMonitor tap)."""

    def __init__(self) -> None:
        self.parser = KtapParser()
        self._partial = b""
        self._last_at = 0.0

    def feed(self, data: bytes, at: float = 0.0) -> None:
        *lines, rest = (self._partial + bytes(data)).split(b"\n")
        if len(rest) > _MAX_PARTIAL:
            lines.append(rest)
            rest = b""
        self._partial = rest
        self._last_at = at
        for line in lines:
            self.parser.feed_line(line.decode(errors="replace"), at)

    def finish(self, tail: Iterable[str] = (), why: str = "the output ended") -> KtapReport:
        if self._partial:
            self.parser.feed_line(self._partial.decode(errors="replace"), self._last_at)
            self._partial = b""
        return self.parser.finish(tail, why)


def judge_outcome(collector: KtapCollector, outcome, tail: Iterable[str]):
    """(the KTAP report, the run's outcome as --ktap sees it).

    The command's own status stays the run's status; but a command that
    exited 0 while its KTAP output shows a failed test (a `not ok`, a
    `Bail out!`, a plan not met, no TAP at all) fails the run with status 1,
    as kselftest's runner does. `outcome` is the VMM's VmOutcome (exit_code,
    summary, report); the KTAP counts are added to its report."""
    import dataclasses
    report = collector.finish(tail, outcome.summary)
    report.command_exit = int(outcome.exit_code)
    counts = report.counts()
    failed = report.failed
    line = (f"KTAP: {len(report.cases)} tests: {counts['pass']} passed, {counts['fail']} failed, "
            f"{counts['skip']} skipped, {counts['todo']} todo")
    if failed:
        names = ", ".join(case.name for case in failed[:5]) + (", ..." if len(failed) > 5 else "")
        line += f" (failed: {names})"
    changes = {"report": f"{outcome.report}\n{line}" if outcome.report else line}
    if outcome.exit_code == 0 and failed:
        changes.update(exit_code=1, summary=f"{outcome.summary}, but {len(failed)} KTAP test(s) failed")
    return report, dataclasses.replace(outcome, **changes)
