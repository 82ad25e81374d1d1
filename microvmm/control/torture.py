"""`microvmm ctl PATH torture [SEED [EVENTS]]`: a seeded, reproducible schedule
of host-side port events sent to a running VM through its control socket.

This is the host half of issue 12's torture mode: ports hot-plugged and
removed, host ends opened and closed, consoles resized and bytes sent, in an
order that depends only on the seed and on how many port ids the device has
left (read from `ports` first). The same seed against the same VM
configuration replays the same events. The guest-side workload that checks
data, and failing on guest kernel reports, are not here yet: run the VM with
`--fail-on warn` to end it on a kernel WARNING/Oops while this runs.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from microvmm.control.protocol import ControlReplyError
from microvmm.virtio_console.spec import MAX_PORTS

DEFAULT_EVENTS = 200
_SEND_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789\n"


@dataclass(frozen=True)
class TortureEvent:
    step: int
    cmd: str
    args: tuple

    def __str__(self) -> str:
        return f"{self.step:5d} {self.cmd} {' '.join(map(str, self.args))}"


@dataclass
class TortureSummary:
    seed: int
    id_budget: int
    applied: int = 0
    refused: dict = field(default_factory=dict)  # error code -> count
    log: list = field(default_factory=list)       # "event -> outcome" lines
    seconds: float = 0.0

    def text(self) -> str:
        refused = ", ".join(f"{code} {count}" for code, count in sorted(self.refused.items())) or "none"
        return (f"torture: seed {self.seed}: {self.applied} events applied, refused: {refused}; "
                f"{self.id_budget} port ids available; {self.seconds:.1f} s")


def schedule(seed: int, events: int, id_budget: int, directory: str) -> list[TortureEvent]:
    """The events for `seed`: a function of its arguments only."""
    rng = random.Random(seed)
    live: list[tuple[str, bool]] = []  # (name, console)
    added = 0
    out: list[TortureEvent] = []
    for step in range(events):
        choices = ["send"] * 3 + ["open", "close", "resize", "remove-port"] if live else []
        if added < id_budget:
            choices += ["add-port"] * 2
        if not choices:
            break
        cmd = rng.choice(choices)
        if cmd == "add-port":
            console = rng.random() < 0.3
            name = f"t{seed % 100000}-{added}"
            spec = ("@" if console else "") + f"file:{name}={directory}/{name}.out"
            live.append((name, console))
            added += 1
            out.append(TortureEvent(step, cmd, (spec,)))
            continue
        name, console = rng.choice(live)
        if cmd == "remove-port":
            live.remove((name, console))
            out.append(TortureEvent(step, cmd, (name,)))
        elif cmd == "resize":
            out.append(TortureEvent(step, cmd, (name, rng.randint(0, 300), rng.randint(0, 120))))
        elif cmd == "send":
            text = "".join(rng.choice(_SEND_ALPHABET) for _ in range(rng.randint(1, 64)))
            out.append(TortureEvent(step, cmd, (name, text)))
        else:
            out.append(TortureEvent(step, cmd, (name,)))
    return out


def id_budget_of(ports: list[dict], device: str = "virtio-console0") -> int:
    """Port ids the first console has left when `stats` does not say (ids are
    never reused: hotplug.py); removed ports are not listed, so this may be high."""
    ids = [p["id"] for p in ports if p.get("device") == device]
    return MAX_PORTS - (max(ids) + 1 if ids else 0)


def run_torture(client, seed: int, events: int, directory: str, pause: float = 0.0) -> TortureSummary:
    """Send the schedule; refused events (e.g. resize of a serial port) are counted."""
    started = time.monotonic()
    consoles = client.call("stats").get("consoles")
    if consoles:
        budget = consoles[0]["capacity"] - consoles[0]["ids_used"]
    else:
        budget = id_budget_of(client.call("ports"))
    summary = TortureSummary(seed, budget)
    for event in schedule(seed, events, budget, directory):
        try:
            client.call(event.cmd, *event.args)
            outcome = "ok"
            summary.applied += 1
        except ControlReplyError as err:
            outcome = err.code
            summary.refused[err.code] = summary.refused.get(err.code, 0) + 1
        summary.log.append(f"{event} -> {outcome}")
        if pause:
            time.sleep(pause)
    summary.seconds = time.monotonic() - started
    return summary
