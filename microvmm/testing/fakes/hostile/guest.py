"""HostileGuest: the driver that lies about everything (register accesses,
config cycles, MSI-X, crafted descriptor chains and control messages, ring
scribbles, backend events)."""

from __future__ import annotations

import struct
from typing import Callable

from microvmm.memory import GuestMemoryError
from microvmm.testing.fakes.hostile.instruments import (
    CTRL, DESC, GAP, GuestGaveUp, PAGE, RAM_END, REGIONS, REG_QUEUE_NOTIFY, REG_QUEUE_PFN, REG_QUEUE_SEL,
    REG_STATUS, SLOT,
)
from microvmm.testing.fakes.hostile.rig import ConsoleRig
from microvmm.testing.fakes.virtio_driver import STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK
from microvmm.virtio.queue import DESC_SIZE, DescFlags
from microvmm.virtio_console.control import BAD_ID
from microvmm.virtio_console.device import CONTROL_TX_QUEUE, rx_queue_index


# ---------------------------------------------------------------------------
# Hostile operations


class HostileGuest:
    """Generates and performs hostile operations against a rig."""

    def __init__(self, rig: ConsoleRig):
        self.rig = rig
        self.c = rig.c
        self.ops: list[Callable[[], None]] = [
            self.op_config_cycle, self.op_config_cycle, self.op_bar0_access, self.op_bar0_access,
            self.op_bar0_access, self.op_msix_access, self.op_scribble, self.op_chain, self.op_chain,
            self.op_chain, self.op_control, self.op_control, self.op_legit_write, self.op_legit_rx,
            self.op_backend_event, self.op_backend_event, self.op_kick, self.op_run_loop,
            self.op_reset, self.op_emergency_write,
        ]

    def setup(self) -> None:
        """Start from a fresh, half-set-up or fully running device."""
        rig, c = self.rig, self.c
        stage = c.int(0, 3)
        rig.note(f"setup stage {stage}")
        if stage == 0:
            return
        if stage == 1:  # features and queues at driver-chosen (maybe bad) pages, no DRIVER_OK
            rig.restore_pci()
            rig.driver.negotiate(c.int(0, 2**32 - 1))
            for index in range(rig.num_queues):
                if c.chance(70):
                    rig.driver.io_write(REG_QUEUE_SEL, 2, index)
                    pfn = c.choice((c.int(0, RAM_END // PAGE), c.int(0, 2**32 - 1), 0))
                    rig.driver.io_write(REG_QUEUE_PFN, 4, pfn)
            return
        guest = rig.bring_up(multiport=c.chance(70), msix=c.chance(50), event_idx=c.chance(50),
                             indirect=c.chance(60))
        self.guest = guest
        if stage == 3:
            guest.wait(lambda: len(guest.opened) == (2 if guest.multiport else 1), rounds=8)

    def run(self, count: int) -> None:
        for _ in range(count):
            op = self.c.choice(self.ops)
            try:
                op()
            except GuestGaveUp:
                pass

    # -- register and config accesses ----------------------------------------------

    def op_config_cycle(self) -> None:
        """Config mechanism #1: any port offset, any size, addresses near our function."""
        rig, c = self.rig, self.c
        if c.chance(50):
            bus = c.choice((0, 0, 0, 1, 255))
            slot = c.choice((SLOT, SLOT, 0, c.int(0, 31)))
            func = c.choice((0, 0, 0, c.int(0, 7)))
            reg = c.choice((0x04, 0x06, 0x10, 0x14, 0x18, 0x3C, 0x34, rig.msix_cap, rig.msix_cap + 2,
                            rig.msix_cap + 4, c.int(0, 0xFF)))
            enable = 0x80000000 if c.chance(90) else 0
            address = enable | bus << 16 | slot << 11 | func << 8 | reg
            if c.chance(10):
                address = c.int(0, 2**32 - 1)
            rig.gbus.write(0, 4, address)
            rig.note(f"cf8 <- {address:#x}")
        size = c.choice((1, 2, 4))
        offset = c.int(0, 8 - size) if c.chance(30) else 4 + c.int(0, 4 - size)
        if c.chance(60):
            value = self.config_value(size)
            rig.note(f"cfg port {offset}/{size} <- {value:#x}")
            rig.gbus.write(offset, size, value)
        else:
            rig.gbus.read(offset, size)

    def config_value(self, size: int) -> int:
        c, rig = self.c, self.rig
        mask = (1 << 8 * size) - 1
        return c.choice((lambda: rig.value(size), lambda: mask, lambda: rig.bar0 & mask,
                         lambda: (rig.bar1 & mask), lambda: 0x7, lambda: 0x407, lambda: 0xC000 & mask,
                         lambda: 0x8000 & mask, lambda: 0x4000 & mask))()

    def op_bar0_access(self) -> None:
        """Legacy registers: every size at every offset, through the bus or straight in."""
        rig, c = self.rig, self.c
        size = c.choice((1, 2, 4))
        offset = c.choice((c.int(0, 0xFF), c.int(0, 31), REG_STATUS, REG_QUEUE_PFN, REG_QUEUE_SEL,
                           REG_QUEUE_NOTIFY, 19, 20, 22, 24, 28, 32))
        write = c.chance(65)
        if offset in (REG_STATUS,) and write and c.chance(70):
            size = 1
            value = c.choice((0, 1, 3, 7, 0x40, 0x47, 0x80, 0xFF, c.int(0, 255)))
        elif offset == REG_QUEUE_PFN and write and c.chance(70):
            size = 4
            value = c.choice((0, c.int(0, RAM_END // PAGE), GAP[0] // PAGE, RAM_END // PAGE - 1,
                              c.int(0, 2**32 - 1)))
        elif offset == REG_QUEUE_SEL and write and c.chance(70):
            size = 2
            value = c.choice((c.int(0, rig.num_queues + 2), 0xFFFF))
        elif offset == REG_QUEUE_NOTIFY and write and c.chance(70):
            size = 2
            value = c.choice((c.int(0, rig.num_queues + 2), 0xFFFF))
        else:
            value = rig.value(size)
        direct = c.chance(40)
        rig.note(f"bar0 {'write' if write else 'read'} {offset:#x}/{size}"
                 f"{f' <- {value:#x}' if write else ''}{' direct' if direct else ''}")
        if direct:
            if write:
                rig.entry("bar0_write", lambda: rig.transport.bar0_write(offset, size, value))
            else:
                rig.entry("bar0_read", lambda: rig.transport.bar0_read(offset, size))
        elif write:
            rig.gbus.io_write(rig.bar0 + offset, size, value)
        else:
            rig.gbus.io_read(rig.bar0 + offset, size)

    def op_msix_access(self) -> None:
        """MSI-X table/PBA: in range, out of range, misaligned, every size."""
        rig, c = self.rig, self.c
        msix = rig.transport.msix
        size = c.choice((1, 2, 4, 8, 4, 4))
        offset = c.choice((c.int(0, msix.table_size + 32), msix.pba_offset + c.int(-8, 24),
                           c.int(0, rig.bar1_size - 1), 16 * c.int(0, msix.num_vectors) + 12,
                           c.int(-64, -1), rig.bar1_size + c.int(0, 64), c.int(0, 2**32)))
        write = c.chance(70)
        value = rig.value(size)
        if write and offset % 16 == 12 and c.chance(50):
            value = c.choice((0, 1))
        rig.note(f"msix {'write' if write else 'read'} {offset:#x}/{size}{f' <- {value:#x}' if write else ''}")
        if c.chance(50) and 0 <= offset <= rig.bar1_size - size:
            if write:
                rig.gbus.mmio_write(rig.bar1 + offset, size, value)
            else:
                rig.gbus.mmio_read(rig.bar1 + offset, size)
        elif write:
            rig.entry("msix write", lambda: msix.write(offset, size, value))
        else:
            rig.entry("msix read", lambda: msix.read(offset, size))

    # -- guest memory ------------------------------------------------------------------

    def op_scribble(self) -> None:
        """The guest overwrites part of its RAM, rings included."""
        rig, c = self.rig, self.c
        queues = [q for q in rig.transport.queues if q.ready]
        if queues and c.chance(70):
            q = c.choice(queues)
            base = c.choice((q.desc_addr, q.avail_addr, q.used_addr))
            addr = base + c.int(0, 32)
        else:
            start, size = c.choice(REGIONS)
            addr = start + c.int(0, size - 1)
        length = c.int(1, 16)
        if not rig.memory.inside(addr, length):
            raise GuestGaveUp
        rig.note(f"scribble {addr:#x}+{length}")
        rig.memory.write(addr, c.bytes(length))

    def hostile_desc(self, table_entries: int, index: int) -> tuple[int, int, int, int]:
        rig, c = self.rig, self.c
        flags = c.choice((0, DescFlags.NEXT, DescFlags.WRITE, DescFlags.NEXT | DescFlags.WRITE,
                          DescFlags.INDIRECT, DescFlags.INDIRECT | DescFlags.NEXT,
                          DescFlags.INDIRECT | DescFlags.WRITE, c.int(0, 0xFFFF)))
        nxt = c.choice((index + 1, index, 0, c.int(0, table_entries - 1), table_entries,
                        c.int(0, 0xFFFF)))
        return rig.addr(), rig.length(), int(flags), nxt & 0xFFFF

    def write_table(self, table: int, entries: int, nested: bool) -> None:
        rig, c = self.rig, self.c
        for i in range(entries):
            addr, length, flags, nxt = self.hostile_desc(entries, i)
            if c.chance(50):  # a plausible buffer
                start, size = c.choice(REGIONS)
                addr, length = start + c.int(0, size - 64), c.int(0, 64)
                flags = c.choice((0, DescFlags.WRITE)) | (DescFlags.NEXT if i + 1 < entries else 0)
                nxt = i + 1
            if nested and c.chance(30):
                inner = self.place(16 * 2)
                self.write_table(inner, 2, nested=False)
                addr, length, flags = inner, 32, DescFlags.INDIRECT
            rig.memory.write(table + DESC_SIZE * i, DESC.pack(addr, length & 0xFFFFFFFF, flags, nxt))

    def place(self, size: int) -> int:
        """Somewhere in guest RAM to put guest-made structures."""
        c = self.c
        start, region_size = c.choice(REGIONS)
        return start + 16 * c.int(0, (region_size - size) // 16)

    def op_chain(self) -> None:
        """A crafted chain: loops, wild/wrapping addresses and lengths, nested
        indirect tables, wrong-direction or zero-length buffers; then an avail idx
        that may be absurd, and a kick."""
        rig, c = self.rig, self.c
        index = c.int(0, rig.num_queues - 1)
        queue = rig.transport.queues[index]
        if not queue.ready:
            raise GuestGaveUp
        size = queue.size
        head = c.choice((c.int(0, size - 1), c.int(0, size - 1), size, c.int(0, 0xFFFF)))
        count = c.int(1, 4)
        for i in range(count):
            slot = (head + i) % size if c.chance(70) else c.int(0, size - 1)
            addr, length, flags, nxt = self.hostile_desc(size, slot)
            style = c.int(0, 9)
            if style <= 2:  # a plausible buffer of the right or wrong direction
                start, region_size = c.choice(REGIONS)
                addr, length = start + c.int(0, region_size - 600), c.choice((0, 1, 8, 512))
            elif style <= 4:  # an indirect table, maybe with nested indirect entries
                entries = c.int(1, 6)
                table = self.place(DESC_SIZE * entries)
                self.write_table(table, entries, nested=c.chance(50))
                addr = table
                length = c.choice((DESC_SIZE * entries, DESC_SIZE * entries + c.int(1, 15), 0,
                                   DESC_SIZE * 2000, rig.length()))
                flags = DescFlags.INDIRECT | (DescFlags.NEXT if c.chance(15) else 0)
            rig.memory.write(queue.desc_addr + DESC_SIZE * slot, DESC.pack(addr, length & 0xFFFFFFFF, flags, nxt))
        avail_idx = rig.memory.read_u16(queue.avail_addr + 2)
        rig.memory.write_u16(queue.avail_addr + 4 + 2 * (avail_idx % size), head & 0xFFFF)
        new_idx = c.choice((avail_idx + 1, avail_idx + 1, avail_idx + c.int(2, size), avail_idx + size + 1,
                            avail_idx - 1, c.int(0, 0xFFFF), queue.last_avail_idx + 0x8000))
        rig.memory.write_u16(queue.avail_addr + 2, new_idx & 0xFFFF)
        rig.note(f"chain q{index} head {head} x{count} avail {avail_idx}->{new_idx & 0xFFFF}")
        self.kick(index)

    def kick(self, index: int) -> None:
        rig, c = self.rig, self.c
        if c.chance(50):
            rig.gbus.io_write(rig.bar0 + REG_QUEUE_NOTIFY, 2, index)
        else:
            rig.on_loop("ioeventfd kick", lambda: rig.transport.queue_notify(index))
        if c.chance(60):
            rig.settle()

    def op_kick(self) -> None:
        rig, c = self.rig, self.c
        index = c.choice((c.int(0, rig.num_queues - 1), rig.num_queues, c.int(0, 0xFFFF), -1))
        rig.note(f"kick {index}")
        if index < 0 or c.chance(50):
            rig.on_loop("ioeventfd kick", lambda: rig.transport.queue_notify(index))
            rig.settle()
        else:
            self.kick(index)

    def op_control(self) -> None:
        """A control message: bad port ids, unknown or host-only events, short or
        split buffers, wrong direction."""
        rig, c = self.rig, self.c
        queue = rig.transport.queues[CONTROL_TX_QUEUE]
        if not queue.ready:
            raise GuestGaveUp
        port = c.choice((0, 1, 2, 15, 16, BAD_ID, c.int(0, 2**32 - 1)))
        event = c.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, c.int(0, 0xFFFF)))
        value = c.choice((0, 1, 2, c.int(0, 0xFFFF)))
        message = CTRL.pack(port, event, value) + c.bytes(c.choice((0, 0, 4, 16)))
        cut = c.choice((len(message), len(message), c.int(0, 7), c.int(0, len(message))))
        message = message[:cut]
        split = c.int(0, len(message))
        flags_first = c.choice((0, 0, 0, DescFlags.WRITE))
        size = queue.size
        head = c.int(0, size - 1)
        second = (head + 1) % size
        buf = self.place(64)
        rig.memory.write(buf, message)
        parts = [(buf, split), (buf + split, len(message) - split)] if c.chance(40) else [(buf, len(message))]
        for i, (addr, length) in enumerate(parts):
            last = i == len(parts) - 1
            slot = head if i == 0 else second
            flags = (flags_first if i == 0 else 0) | (0 if last else DescFlags.NEXT)
            rig.memory.write(queue.desc_addr + DESC_SIZE * slot, DESC.pack(addr, length, flags, second))
        avail_idx = rig.memory.read_u16(queue.avail_addr + 2)
        rig.memory.write_u16(queue.avail_addr + 4 + 2 * (avail_idx % size), head)
        rig.memory.write_u16(queue.avail_addr + 2, (avail_idx + 1) & 0xFFFF)
        rig.note(f"control port={port:#x} event={event} value={value} len={len(message)} parts={len(parts)}")
        self.kick(CONTROL_TX_QUEUE)

    def op_legit_write(self) -> None:
        guest = getattr(self, "guest", None)
        if guest is None:
            raise GuestGaveUp
        port = self.c.int(0, 1 if guest.multiport else 0)
        try:
            guest.write(port, self.c.bytes(self.c.int(1, 40)))
            guest.pump()
        except (RuntimeError, KeyError, MemoryError, AssertionError, GuestMemoryError, struct.error) as exc:
            raise GuestGaveUp from exc  # the guest's own bookkeeping is wrecked; not the device's fault
        self.rig.note(f"legit write port {port}")

    def op_legit_rx(self) -> None:
        guest = getattr(self, "guest", None)
        if guest is None:
            raise GuestGaveUp
        port = self.c.int(0, 1 if guest.multiport else 0)
        try:
            ring = guest.rings[rx_queue_index(port)]
            if ring.free:
                ring.add(writable=[self.c.choice((0, 1, 16, 512))])  # zero-length is hostile
            guest.kick(rx_queue_index(port))
            guest.pump()
        except (RuntimeError, KeyError, MemoryError, AssertionError, GuestMemoryError, struct.error) as exc:
            raise GuestGaveUp from exc
        self.rig.note(f"legit rx port {port}")

    # -- host side and timing -------------------------------------------------------------

    def op_backend_event(self) -> None:
        rig, c = self.rig, self.c
        backend = c.choice(rig.backends)
        kind = c.int(0, 4)
        if kind == 0:
            data = c.bytes(c.int(1, 64))
            rig.on_loop("backend input", lambda: backend.feed(data))
        elif kind == 1:
            capacity = c.choice((None, 0, c.int(1, 32)))
            rig.on_loop("backend writable", lambda: backend.set_capacity(capacity))
        elif kind == 2:
            connected = c.chance(50)
            rig.on_loop("backend connection", lambda: backend.set_connected_now(connected))
        elif kind == 3:
            port = rig.backends.index(backend)
            cols, rows = c.int(0, 0xFFFF), c.int(0, 0xFFFF)
            rig.entry("resize", lambda: rig.device.resize(port, cols, rows))
        else:
            rig.entry("refresh_sizes", rig.device.refresh_sizes)
            rig.entry("intx_resample", rig.transport.intx_resample)
        rig.note(f"backend event {kind} on {backend.name}")
        if c.chance(50):
            rig.settle()

    def op_run_loop(self) -> None:
        rig = self.rig
        rig.note("run loop")
        if rig.manual:
            rig.loop.run(limit=self.c.int(0, 8))
        else:
            rig.settle()

    def op_reset(self) -> None:
        rig, c = self.rig, self.c
        rig.note("reset")
        rig.entry("reset", lambda: rig.transport.bar0_write(REG_STATUS, 1, 0))
        self.guest = None
        if c.chance(50):
            # half a bring-up after the reset
            rig.entry("status", lambda: rig.transport.bar0_write(REG_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER))
            rig.entry("queue", lambda: (rig.transport.bar0_write(REG_QUEUE_SEL, 2, c.int(0, rig.num_queues)),
                                        rig.transport.bar0_write(REG_QUEUE_PFN, 4, c.int(0, RAM_END // PAGE))))
            if c.chance(50):
                rig.entry("driver ok", lambda: rig.transport.bar0_write(
                    REG_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK))

    def op_emergency_write(self) -> None:
        rig, c = self.rig, self.c
        offset = c.choice((8, 8, c.int(0, 12)))
        size = c.choice((1, 4))
        value = rig.value(size)
        rig.note(f"device config write {offset}/{size} <- {value:#x}")
        rig.entry("write_config", lambda: rig.transport.bar0_write(rig.transport.config_offset + offset, size, value))
