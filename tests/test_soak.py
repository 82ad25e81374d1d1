"""No-loss soak: 16 ports (4 of them '@' console ports) streaming both ways at once.

The real device, transport and I/O thread under the fake guest driver with
unix socket peers (see microvmm/testing/fakes/soak.py). Every byte sent on every port
in either direction must arrive exactly once and in order (equal count and
sha256), the device's counters must agree, and no console port may drop
output while its reader keeps up. `pytest -s` prints the volume and duration.
"""

from __future__ import annotations

from microvmm.testing.fakes.soak import SoakRig

#: Beyond a console port's 1 MiB host buffer, so a reader that fell behind would show drops.
PER_DIRECTION = 4 << 20
PORTS = 16
CONSOLES = (0, 5, 10, 15)
TIMEOUT = 25.0


def test_sixteen_ports_both_ways_lose_nothing(tmp_path):
    rig = SoakRig(tmp_path, PER_DIRECTION, ports=PORTS, consoles=CONSOLES, seed=20261125)
    try:
        result = rig.run(TIMEOUT)
    finally:
        rig.close()

    assert len(result.ports) == PORTS
    assert sum(port.console for port in result.ports) == len(CONSOLES)
    for port in result.ports:
        for label, direction in (("guest->host", port.guest_to_host), ("host->guest", port.host_to_guest)):
            assert direction.sent_bytes == PER_DIRECTION, f"{port.name} {label}: sender stopped early"
            assert direction.received_bytes == direction.sent_bytes, \
                f"{port.name} {label}: {direction.received_bytes} of {direction.sent_bytes} bytes arrived"
            assert direction.received_sha256 == direction.sent_sha256, \
                f"{port.name} {label}: bytes altered, reordered or duplicated (sha256 differs)"
        # The device's own accounting agrees with what the peers saw.
        assert port.stats.to_host_bytes == PER_DIRECTION, port.stats
        assert port.stats.to_guest_bytes == PER_DIRECTION, port.stats
        assert port.stats.buffered_bytes == 0, port.stats
        assert port.stats.dropped_bytes == 0, f"{port.name} dropped output although its reader kept up"
    assert result.bytes_lost == 0
    assert result.console_drops == 0
    assert result.bytes_moved == 2 * PORTS * PER_DIRECTION
    print(f"\nsoak: {result.bytes_moved / 1e6:.1f} MB moved over {PORTS} ports, both directions, "
          f"in {result.seconds:.2f} s ({result.bytes_moved / 1e6 / result.seconds:.1f} MB/s)")
