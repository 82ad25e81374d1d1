"""virtio-console device-model throughput without KVM.

The real VirtioConsole, legacy PCI transport, EventLoop (I/O thread) and a unix
stream socket port backend ("socket:data=PATH:server"), driven by the fake Linux
front-end of microvmm/testing/fakes/virtio_driver.py: the "guest" runs on this thread,
posts buffers, kicks through the PCI notify register and waits for the
device's INTx (an event here) before it reaps used buffers, like
virtio_console.c. The buffers are set up once (their content is not rewritten
per chain) so the figures are the device's cost plus a lean driver, not the
fake driver's allocator.

guest->host: the guest posts chains of one SIZE-byte buffer on the port's
transmit queue; a peer thread drains the socket. host->guest: the peer thread
writes SIZE-byte chunks; the guest keeps SIZE-byte receive buffers posted.
Baselines, same run, same kind of socket and the same peer thread: plain
os.write (guest->host) / os.read (host->guest) of SIZE-byte chunks.

Figures per SIZE in 64 B / 4 KiB / 64 KiB:
  console_g2h_<size>: MB/s   console_g2h_<size>_chains: chains/s   console_g2h_<size>_ratio_vs_oswrite
  console_h2g_<size>: MB/s   console_h2g_<size>_chains: chains/s   console_h2g_<size>_ratio_vs_osread
and console_g2h_4k_text_with_monitor (+ _ratio_vs_oswrite): 80-column text lines with
the VMM's RunMonitor on the device's output tap, as `microvmm run` wires it.
(MB = 10^6 bytes.) Target: g2h ratio >= 0.5 at 4 KiB.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import REPO, report  # noqa: F401  (REPO: puts the repository on sys.path)

from microvmm.eventloop import EventLoop
from microvmm.memory import GuestMemory
from microvmm.pci.bus import PciBus
from microvmm.run.monitor import RunMonitor
from microvmm.virtio_console.control import BAD_ID, ControlEvent
from microvmm.virtio_console.device import ConsoleFeature, VirtioConsole, rx_queue_index, tx_queue_index
from microvmm.virtio_console.spec import parse_port_spec
from microvmm.virtio.queue import DescFlags, UsedFlags
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from microvmm.testing.fakes.virtio_driver import (CONSOLE_CONTROL, EventIntx, FakeLegacyPciDriver, FakeMsiController,
                                      GuestAllocator)

RAM = 64 << 20
SLOT = 4
QUEUE_SIZE = 64  # microvmm run's default --queue-size
F_MULTIPORT = 1 << ConsoleFeature.MULTIPORT
CONTROL_RX, CONTROL_TX = 2, 3
CONTROL_BUFFER = 4096
WAIT_LIMIT = 10.0  # no interrupt for this long: the device is stuck, fail the benchmark

SIZES = {"64b": 64, "4k": 4096, "64k": 65536}


class BenchmarkStuck(RuntimeError):
    """The device stopped making progress."""


@dataclass
class Figure:
    seconds: float
    nbytes: int
    chains: int

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6

    @property
    def chains_per_s(self) -> float:
        return self.chains / self.seconds


class ConsoleRig:
    """One console device with a socket port, brought up the way Linux does it."""

    def __init__(self, workdir: Path, with_monitor: bool = False):
        self.path = str(workdir / "data.sock")
        self.loop = EventLoop()
        self.loop.start()
        self.device = VirtioConsole.from_specs([parse_port_spec(f"socket:data={self.path}:server")], self.loop,
                                               queue_size=QUEUE_SIZE, announce=io.StringIO())
        if with_monitor:  # as `microvmm run` wires it: every output byte also feeds the RunMonitor
            self.device.output_tap = RunMonitor().feed
        self.memory = GuestMemory([(0, RAM)])
        self.bus = PciBus()
        self.intx = EventIntx()
        self.transport = VirtioPciLegacy(self.device, self.memory, intx=self.intx, msi=FakeMsiController())
        self.bus.add_device(self.transport, SLOT)
        self.allocator = GuestAllocator(self.memory, 0x10000, RAM)
        self.driver = FakeLegacyPciDriver(self.bus, self.memory, self.allocator, device_id=0x1003)
        self.driver.enable()
        self.peer: socket.socket | None = None
        self._rx_posted = 0
        self._bring_up()

    # -- bring-up: multiport probe, control messages, port open -------------------
    def _bring_up(self) -> None:
        driver = self.driver
        driver.negotiate(F_MULTIPORT)
        for index in range(4):  # control rx/tx + port 0's rx/tx
            driver.setup_queue(index)
        for _ in range(8):
            driver.rings[CONTROL_RX].add(writable=[CONTROL_BUFFER])
        driver.driver_ok()
        self._send_control(BAD_ID, ControlEvent.DEVICE_READY, 1)
        self._control_until(lambda events: ControlEvent.DEVICE_ADD in events)
        self._send_control(0, ControlEvent.PORT_READY, 1)
        self._control_until(lambda events: ControlEvent.PORT_NAME in events)
        self.peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.peer.connect(self.path)
        self._control_until(lambda events: ControlEvent.PORT_OPEN in events)  # the host side is open
        self._send_control(0, ControlEvent.PORT_OPEN, 1)  # the guest opens /dev/vport0p0

    def _send_control(self, port: int, event: int, value: int) -> None:
        self.driver.rings[CONTROL_TX].add(readable=[CONSOLE_CONTROL.pack(port, event, value)])
        self.driver.kick(CONTROL_TX, force=True)

    def _control_until(self, done) -> None:
        seen: set[int] = set()
        deadline = time.monotonic() + WAIT_LIMIT
        while not done(seen):
            if time.monotonic() > deadline:
                raise BenchmarkStuck(f"control messages seen: {sorted(seen)}")
            self.intx.event.wait(0.05)
            self.intx.event.clear()
            self.driver.read_isr()
            for used in self.driver.rings[CONTROL_RX].get_used():
                seen.add(CONSOLE_CONTROL.unpack_from(used.data)[1])
                self.driver.rings[CONTROL_RX].add(writable=[CONTROL_BUFFER])
                self.driver.kick(CONTROL_RX)
            self.driver.rings[CONTROL_TX].get_used()

    # -- a lean data path: one fixed buffer per descriptor ----------------------------
    def _fixed_buffers(self, index: int, size: int, writable: bool, payload: bytes) -> None:
        ring = self.driver.rings[index]
        for desc in range(ring.size):
            addr = self.allocator.alloc(size, align=64)
            if payload:
                self.memory.write(addr, payload)
            ring.write_desc(ring.desc, desc, addr, size, DescFlags.WRITE if writable else 0, 0)

    def _reap(self, index: int) -> list[tuple[int, int]]:
        return self.driver.rings[index].reap_used_elems()

    def _kick(self, index: int) -> None:
        ring = self.driver.rings[index]
        if not ring.used_flags & UsedFlags.NO_NOTIFY:
            self.driver.io_write(16, 2, index)  # QUEUE_NOTIFY

    def _wait_interrupt(self) -> None:
        if not self.intx.event.wait(WAIT_LIMIT):
            raise BenchmarkStuck("no interrupt from the device")
        self.intx.event.clear()
        self.driver.read_isr()  # vp_interrupt: reading ISR acknowledges it

    def guest_to_host(self, size: int, chains: int, text: bool = False) -> Figure:
        index = tx_queue_index(0)
        ring = self.driver.rings[index]
        payload = (b"console line of guest output, about eighty characters long, like dmesg.....\n" * (size // 78 + 1))[:size] \
            if text else os.urandom(size)
        self._fixed_buffers(index, size, writable=False, payload=payload)
        total = size * chains
        drained = _Drainer(self.peer, total)
        free = list(range(ring.size))
        posted = completed = 0
        started = time.perf_counter()
        drained.start()
        while completed < chains:
            added = False
            while free and posted < chains:
                ring.publish(free.pop())
                posted += 1
                added = True
            if added:
                self._kick(index)
            self._wait_interrupt()
            for head, _ in self._reap(index):
                free.append(head)
                completed += 1
        drained.wait()
        elapsed = time.perf_counter() - started
        return Figure(elapsed, total, chains)

    def host_to_guest(self, size: int, chains: int) -> Figure:
        index = rx_queue_index(0)
        ring = self.driver.rings[index]
        total = size * chains
        if self._rx_posted != size:  # buffers stay posted from one measurement to the next
            assert self._rx_posted == 0, "one receive buffer size per rig"
            self._fixed_buffers(index, size, writable=True, payload=b"")
            for desc in range(ring.size):
                ring.publish(desc)
            self._rx_posted = size
            self._kick(index)
        feeder = _Feeder(self.peer, size, chains)
        received = used_chains = 0
        started = time.perf_counter()
        feeder.start()
        while received < total:
            self._wait_interrupt()
            reaped = self._reap(index)
            for head, length in reaped:
                received += length
                used_chains += 1
                ring.publish(head)
            if reaped:
                self._kick(index)
        elapsed = time.perf_counter() - started
        feeder.join()
        return Figure(elapsed, total, used_chains)

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.device.close()
        self.loop.close()


class _Drainer(threading.Thread):
    """The host-side reader: receives and discards `total` bytes."""

    def __init__(self, sock: socket.socket, total: int):
        super().__init__(name="bench-drain", daemon=True)
        self.sock = sock
        self.total = total
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        buffer = bytearray(1 << 20)
        got = 0
        try:
            while got < self.total:
                count = self.sock.recv_into(buffer)
                if not count:
                    raise BenchmarkStuck(f"socket closed after {got} of {self.total} bytes")
                got += count
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()

    def wait(self) -> None:
        if not self.done.wait(WAIT_LIMIT * 3):
            raise BenchmarkStuck("the reader did not get every byte")
        if self.error:
            raise self.error


class _Feeder(threading.Thread):
    """The host-side writer: sends `count` chunks of `size` bytes."""

    def __init__(self, sock: socket.socket, size: int, count: int):
        super().__init__(name="bench-feed", daemon=True)
        self.sock = sock
        self.chunk = os.urandom(size)
        self.count = count

    def run(self) -> None:
        for _ in range(self.count):
            self.sock.sendall(self.chunk)


def baseline_oswrite(size: int, chunks: int) -> Figure:
    """os.write of `size`-byte chunks into a unix stream socket drained by the same reader."""
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        total = size * chunks
        drained = _Drainer(reader, total)
        chunk = os.urandom(size)
        fd = writer.fileno()
        started = time.perf_counter()
        drained.start()
        for _ in range(chunks):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        drained.wait()
        return Figure(time.perf_counter() - started, total, chunks)
    finally:
        writer.close()
        reader.close()


def baseline_osread(size: int, chunks: int) -> Figure:
    """os.read of up to `size` bytes at a time from a unix stream socket fed by the same writer."""
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        total = size * chunks
        feeder = _Feeder(writer, size, chunks)
        fd = reader.fileno()
        received = reads = 0
        started = time.perf_counter()
        feeder.start()
        while received < total:
            received += len(os.read(fd, size))
            reads += 1
        elapsed = time.perf_counter() - started
        feeder.join()
        return Figure(elapsed, total, reads)
    finally:
        writer.close()
        reader.close()


def chains_for(size: int, seconds: float) -> int:
    """Roughly `seconds` of work at a pessimistic guess of the device's rate."""
    per_chain = 40e-6 + size / 150e6
    return max(QUEUE_SIZE * 4, int(seconds / per_chain))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="rough duration of each measurement")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for every figure (default 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="microvmm-bench-") as tmp:
        for label, size in SIZES.items():
            chains = chains_for(size, args.seconds)
            rig = ConsoleRig(Path(tmp))
            try:
                g2h = max((rig.guest_to_host(size, chains) for _ in range(args.repeat)), key=lambda f: f.mb_per_s)
            finally:
                rig.close()
            rig = ConsoleRig(Path(tmp))
            try:
                h2g = max((rig.host_to_guest(size, chains) for _ in range(args.repeat)), key=lambda f: f.mb_per_s)
            finally:
                rig.close()
            base_w = max((baseline_oswrite(size, chains) for _ in range(args.repeat)), key=lambda f: f.mb_per_s)
            base_r = max((baseline_osread(size, chains) for _ in range(args.repeat)), key=lambda f: f.mb_per_s)
            report(f"console_g2h_{label}", g2h.mb_per_s, "MB/s")
            report(f"console_g2h_{label}_chains", g2h.chains_per_s, "chains/s")
            report(f"oswrite_{label}", base_w.mb_per_s, "MB/s")
            report(f"console_g2h_{label}_ratio_vs_oswrite", g2h.mb_per_s / base_w.mb_per_s, "ratio")
            report(f"console_h2g_{label}", h2g.mb_per_s, "MB/s")
            report(f"console_h2g_{label}_chains", h2g.chains_per_s, "chains/s")
            report(f"osread_{label}", base_r.mb_per_s, "MB/s")
            report(f"console_h2g_{label}_ratio_vs_osread", h2g.mb_per_s / base_r.mb_per_s, "ratio")
            if label == "4k":
                # Text output with the VMM's RunMonitor on the output tap, as `microvmm run` has it.
                rig = ConsoleRig(Path(tmp), with_monitor=True)
                try:
                    tapped = max((rig.guest_to_host(size, chains, text=True) for _ in range(args.repeat)),
                                 key=lambda f: f.mb_per_s)
                finally:
                    rig.close()
                report(f"console_g2h_{label}_text_with_monitor", tapped.mb_per_s, "MB/s")
                report(f"console_g2h_{label}_text_with_monitor_ratio_vs_oswrite",
                       tapped.mb_per_s / base_w.mb_per_s, "ratio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
