#!/usr/bin/env python3
"""Long hostile-guest fuzz run over the same harness as tests/test_hostile_guest.py.

Each case is generated from one integer seed by a seeded random.Random (the
hand-rolled generator of microvmm/testing/fakes/hostile/, the same one the
hypothesis tests drive), executed synchronously against the real console
device, legacy PCI transport, PCI bus and MSI-X, and checked for the same
invariants. A failure therefore replays exactly:

    python3 fuzz/run_fuzz.py --replay SEED

Usage:
    python3 fuzz/run_fuzz.py [--cases N] [--seconds S] [--seed BASE] [--jobs J]

Prints `cases tried: N`, `failures: M`, the throughput and the first failing
case (lowest seed found) with its failure and replay command. Exit status 1 if
any case failed. Not part of the test suite (it runs for minutes).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from microvmm.testing.fakes.hostile import RandomChooser, run_case  # noqa: E402

#: A case taking longer than this is reported as a hang (an unbounded loop).
CASE_TIMEOUT_S = 20
CHUNK = 400
MAX_FAILURES_KEPT = 20


class CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CaseTimeout(f"case exceeded {CASE_TIMEOUT_S} s (hang?)")


def run_one(seed: int, max_ops: int) -> list[str]:
    """Failures of case `seed` (empty when it passed); never raises."""
    signal.alarm(CASE_TIMEOUT_S)
    try:
        return run_case(RandomChooser(seed), max_ops=max_ops).failures
    except CaseTimeout as exc:
        return [str(exc)]
    except Exception as exc:  # the harness itself broke: still a reportable case
        import traceback
        return [f"harness error: {exc!r}\n{traceback.format_exc()}"]
    finally:
        signal.alarm(0)


def run_chunk(args: tuple[int, int, int, float | None]) -> tuple[int, int, list[tuple[int, str]]]:
    """(cases run, cases failed, the first few failures) of seeds start..start+count-1.

    Stops early at `deadline` (time.time()): the pool queues every chunk up
    front, so the budget has to be enforced where the cases run."""
    start, count, max_ops, deadline = args
    failures: list[tuple[int, str]] = []
    failing = 0
    ran = 0
    for seed in range(start, start + count):
        if deadline is not None and time.time() >= deadline:
            break
        ran += 1
        problems = run_one(seed, max_ops)
        if problems:
            failing += 1
            if len(failures) < MAX_FAILURES_KEPT:
                failures.append((seed, "\n".join(problems)))
    return ran, failing, failures


def _init_worker() -> None:
    logging.disable(logging.CRITICAL)  # NEEDS_RESET warnings are expected by the million
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def replay(seed: int, max_ops: int) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    trace: list[str] = []
    result = run_case(RandomChooser(seed), max_ops=max_ops, trace=trace)
    print(f"seed {seed}: {len(trace)} steps")
    for step in trace:
        print("  " + step)
    if result.ok:
        print("PASS")
        return 0
    print("FAIL:")
    for failure in result.failures:
        print(failure)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1_000_000, help="number of cases (default 1000000)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this wall-time budget")
    parser.add_argument("--seed", type=int, default=0, help="first case seed (cases use SEED..SEED+N-1)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--max-ops", type=int, default=24, help="hostile operations per case, at most")
    parser.add_argument("--replay", type=int, metavar="SEED", help="run one case verbosely and exit")
    args = parser.parse_args(argv)

    if args.replay is not None:
        return replay(args.replay, args.max_ops)

    began = time.monotonic()
    deadline = None if args.seconds is None else time.time() + args.seconds
    end_seed = args.seed + args.cases

    def chunks():
        for start in range(args.seed, end_seed, CHUNK):
            yield start, min(CHUNK, end_seed - start), args.max_ops, deadline

    tried = 0
    failed: list[tuple[int, str]] = []
    failure_count = 0
    last_report = began
    print(f"hostile-guest fuzz: seeds {args.seed}..{end_seed - 1}, {args.jobs} jobs"
          + (f", budget {args.seconds:g} s" if args.seconds else ""), flush=True)
    context = multiprocessing.get_context("fork")
    with context.Pool(args.jobs, initializer=_init_worker) as pool:
        try:
            for count, failing, failures in pool.imap_unordered(run_chunk, chunks()):
                tried += count
                failure_count += failing
                failed.extend(failures)
                now = time.monotonic()
                if now - last_report >= 30:
                    last_report = now
                    print(f"  {tried} cases, {failure_count} failures, {tried / (now - began):.0f} cases/s",
                          flush=True)
        except KeyboardInterrupt:
            pool.terminate()
            print("interrupted", flush=True)
    elapsed = time.monotonic() - began
    print(f"cases tried: {tried}")
    print(f"failures: {failure_count}")
    print(f"elapsed: {elapsed:.1f} s, throughput: {tried / elapsed:.0f} cases/s with {args.jobs} jobs")
    if failed:
        seed, text = min(failed)
        print(f"first failing case: seed {seed}")
        print(text)
        print(f"replay: python3 fuzz/run_fuzz.py --replay {seed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
