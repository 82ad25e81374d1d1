"""No-loss soak at volume: 16 console ports streaming both ways at once, without KVM.

The harness of tests/test_soak.py (microvmm/testing/fakes/soak.py): the real
VirtioConsole, legacy PCI transport and EventLoop with 16 unix socket server
ports (ports 0, 5, 10 and 15 are '@' console ports), the fake Linux front-end
as the guest and one host peer thread that writes into and reads from every
port socket. Every port carries --mib MiB of seeded random data in each
direction at the same time; each side sha256-hashes what it sent and what it
received.

Figures (MB = 10^6 bytes):
  soak_mb_moved: bytes that arrived, all ports, both directions
  soak_seconds: wall time from bring-up to the last byte
  soak_mb_per_s: the two above divided
  soak_bytes_lost: bytes sent that did not arrive intact (count or sha256 differs); must be 0
  soak_console_drops: console-port output dropped by the device (stats()); must be 0, the readers keep up
Exits 1 when a byte was lost or dropped, 2 when the soak stalled.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import REPO, report  # noqa: F401  (REPO: puts the repository on sys.path)

from microvmm.testing.fakes.soak import SoakRig, SoakStuck

CONSOLES = (0, 5, 10, 15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=16, help="MiB per port per direction (default 16)")
    parser.add_argument("--ports", type=int, default=16, help="number of ports, 1..16 (default 16)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="microvmm-soak-") as tmp:
        rig = SoakRig(Path(tmp), args.mib << 20, ports=args.ports,
                      consoles=tuple(c for c in CONSOLES if c < args.ports), seed=args.seed)
        try:
            result = rig.run(args.timeout)
        except SoakStuck as stuck:
            print(f"soak stalled: {stuck}", file=sys.stderr)
            report("soak_bytes_lost", "stalled", "bytes")
            return 2
        finally:
            rig.close()
    report("soak_mb_moved", result.bytes_moved / 1e6, "MB")
    report("soak_seconds", result.seconds, "s")
    report("soak_mb_per_s", result.bytes_moved / 1e6 / result.seconds, "MB/s")
    report("soak_bytes_lost", str(result.bytes_lost), "bytes")
    report("soak_console_drops", str(result.console_drops), "bytes")
    for port in result.ports:
        for label, direction in (("g2h", port.guest_to_host), ("h2g", port.host_to_guest)):
            if not direction.intact:
                print(f"{port.name} {label}: sent {direction.sent_bytes} bytes sha256 {direction.sent_sha256}, "
                      f"received {direction.received_bytes} sha256 {direction.received_sha256}", file=sys.stderr)
    return 1 if result.bytes_lost or result.console_drops else 0


if __name__ == "__main__":
    sys.exit(main())
