"""Where the guest kernel's log goes (vmm.plan_kernel_console), the `-- CMD`
archive put in front of the initramfs, and the kernel's log read from its
printk ring buffer in guest RAM (diag/kernel_log.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from microvmm.boot.initrd import LoadedInitrd, command_archive, place_initrd, prepend_archive
from microvmm.diag.kernel_log import (DIRECT_MAP_BASE, KERNEL_IMAGE_BASE, KernelLogCursor, KernelLogError,
                                      console_records, log_symbols, read_kernel_log)
from microvmm.memory import GuestMemory
from microvmm.run.monitor import KERNEL_LOG_PORT, SERIAL_PORT
from microvmm.virtio_console.spec import parse_port_spec
from microvmm.vmconfig import VmConfig
from microvmm.vmm import plan_kernel_console

VIRTIO_MAP = "ffffffff811c7510 t virtcons_probe\nffffffff81000000 T _text\n"
SERIAL_ONLY_MAP = "ffffffff81000000 T _text\n"


def config(tmp_path: Path, system_map: str | None = VIRTIO_MAP, ports=(), cmdline="reboot=k panic=-1",
           default_console=True, command=None) -> VmConfig:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    if system_map is not None:
        (tmp_path / "System.map").write_text(system_map)
    return VmConfig(kernel=kernel, initrd=None, cmdline=cmdline, default_console=default_console,
                    ports=[parse_port_spec(p) for p in ports], command=command)


def test_the_default_guest_gets_a_log_port_after_the_user_consoles(tmp_path):
    plan = plan_kernel_console(config(tmp_path, ports=("@stdio:con", "pty:raw", "@pty:two")))
    assert plan.kmsg
    # hvc0 and hvc1 are the user's consoles; the log port is the next one
    assert plan.cmdline_additions == ("console=hvc2", "microvmm.console=hvc0")
    assert plan.sources.dedicated == KERNEL_LOG_PORT and not plan.sources.shared
    plain = plan_kernel_console(config(tmp_path))
    assert plain.cmdline_additions == ("console=hvc0", "microvmm.console=ttyS0")


def test_a_kernel_without_virtio_console_keeps_the_serial_console(tmp_path):
    plan = plan_kernel_console(config(tmp_path, system_map=SERIAL_ONLY_MAP, ports=("@pty:p0",)))
    assert not plan.kmsg and plan.cmdline_additions == ("console=ttyS0", "console=hvc0")
    assert plan.sources.dedicated is None and plan.sources.shared == {SERIAL_PORT, "p0"}
    assert "CONFIG_VIRTIO_CONSOLE" in plan.why
    # no System.map at all: the same, said honestly
    bare = tmp_path / "bare"
    bare.mkdir()
    assert not plan_kernel_console(config(bare, system_map=None)).kmsg


def test_a_users_console_choice_is_left_alone(tmp_path):
    for cfg in (config(tmp_path, cmdline="console=ttyS0 quiet", default_console=False),
                config(tmp_path, cmdline="reboot=k panic=-1 console=hvc0")):  # --append console=
        plan = plan_kernel_console(cfg)
        assert not plan.kmsg and plan.cmdline_additions == ()
        assert SERIAL_PORT in plan.sources.shared


def test_no_log_port_when_the_ports_are_all_taken(tmp_path):
    ports = tuple(f"pty:p{i}" for i in range(13))
    assert plan_kernel_console(config(tmp_path, ports=ports)).kmsg
    plan = plan_kernel_console(config(tmp_path, ports=ports, command=["true"]))  # + 3 command ports = 16
    assert not plan.kmsg and "no room" in plan.why


# --- the command archive -------------------------------------------------------

def test_command_archive_is_one_newc_file_and_a_trailer():
    script = b"echo hi\n" * 9000  # 72 KB: far beyond the kernel command line's 2 KB
    archive = command_archive("microvmm.cmd", script)
    assert archive[:6] == b"070701" and len(archive) % 4 == 0
    fields = [int(archive[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    mode, size, namesize = fields[1], fields[6], fields[11]
    assert (mode, size, namesize) == (0o100600, len(script), len(b"microvmm.cmd") + 1)
    name_end = 110 + namesize
    assert archive[110:name_end] == b"microvmm.cmd\0"
    data_start = name_end + (-name_end % 4)
    assert archive[data_start:data_start + size] == script
    assert b"TRAILER!!!\0" in archive[data_start + size:]


def test_archive_goes_in_front_of_an_initrd_where_the_boot_loader_expects_it():
    mem = GuestMemory([(0, 16 << 20)])
    try:
        size = 100_000
        addr = place_initrd(mem.end, size, 0x7FFF_FFFF, 0x200000)
        mem.write(addr, b"I" * size)
        archive = command_archive("microvmm.cmd", b"exit 3\n")
        combined = prepend_archive(mem, LoadedInitrd(addr, size), archive, 0x200000)
        assert combined.addr == place_initrd(mem.end, combined.size, 0x7FFF_FFFF, 0x200000)
        assert combined.addr + combined.size == addr + size
        assert mem.read(combined.addr, len(archive)) == archive
        assert mem.read(addr, 4) == b"IIII"
        with pytest.raises(Exception, match="do not fit"):
            prepend_archive(mem, LoadedInitrd(addr, size), archive, addr - 100)
        # an initrd still in bytes (a bzImage's) simply gets it in front
        assert prepend_archive(mem, b"IIII", archive, 0).endswith(b"IIII")
    finally:
        mem.close()


# --- the kernel's log from guest RAM -----------------------------------------------

def _fake_ring(mem: GuestMemory, records: list[tuple[int, int, int, bytes]], level_limit: int = 7,
               count_bits: int = 4, size_bits: int = 10) -> dict[str, int]:
    """A Linux 6.1 printk ring in guest RAM: (seq, ts_nsec, level, text) records."""
    ring, descs, infos, data, prb, printk = 0x10000, 0x11000, 0x12000, 0x14000, 0x15000, 0x15100
    text_lpos = 0
    for index, (seq, ts, level, text) in enumerate(records):
        begin = text_lpos
        block = struct.pack("<Q", index) + text
        block += b"\0" * (-len(block) % 8)
        mem.write(data + begin, block)
        text_lpos += len(block)
        mem.write(descs + 24 * index, struct.pack("<QQQ", (2 << 62) | index, begin, text_lpos))
        mem.write(infos + 88 * index, struct.pack("<QQHBBI", seq, ts, len(text), 0, level << 5, 0))
    # one reusable slot with garbage: skipped
    mem.write(descs + 24 * len(records), struct.pack("<QQQ", (3 << 62) | 99, 0, 8))
    head = max(len(records) - 1, 0)  # descriptor ids 0..n-1 (tail 0)
    mem.write(ring, struct.pack("<I4xQQQQQI4xQQQQ", count_bits, KERNEL_IMAGE_BASE + descs, KERNEL_IMAGE_BASE + infos,
                                head, 0, 0, size_bits, DIRECT_MAP_BASE + data, 0, 0, 0))
    mem.write(prb, struct.pack("<Q", KERNEL_IMAGE_BASE + ring))
    mem.write(printk, struct.pack("<I", level_limit))
    return {"prb": KERNEL_IMAGE_BASE + prb, "console_printk": KERNEL_IMAGE_BASE + printk}


def test_records_come_back_in_order_as_a_console_prints_them():
    mem = GuestMemory([(0, 1 << 20)])
    try:
        symbols = _fake_ring(mem, [(1, 2_500_000_000, 6, b"second"), (0, 1_000, 5, b"Linux version 6.1"),
                                   (2, 57_460_001_000, 0, b"Kernel panic - not syncing: x\nline two")])
        records = read_kernel_log(mem, symbols)
        assert [r.seq for r in records] == [0, 1, 2]
        assert records[0].console_text() == b"[    0.000001] Linux version 6.1\n"
        assert records[2].console_text() == (b"[   57.460001] Kernel panic - not syncing: x\n"
                                             b"[   57.460001] line two\n")
        quiet = _fake_ring(mem, [(0, 1, 6, b"info"), (1, 2, 0, b"emergency")], level_limit=4)
        assert [r.text for r in console_records(mem, quiet)] == [b"emergency"]
    finally:
        mem.close()


def test_a_hostile_ring_is_an_error_not_a_crash():
    mem = GuestMemory([(0, 1 << 20)])
    try:
        symbols = _fake_ring(mem, [(0, 1, 6, b"x")])
        mem.write(0x10000, struct.pack("<I4xQ", 4, DIRECT_MAP_BASE + (64 << 30)))  # descs outside RAM
        with pytest.raises(KernelLogError):
            read_kernel_log(mem, symbols)
        mem.write(0x15000, struct.pack("<Q", 0x1234))  # prb points nowhere sensible
        with pytest.raises(KernelLogError):
            read_kernel_log(mem, symbols)
        with pytest.raises(KernelLogError):
            read_kernel_log(mem, {"_text": KERNEL_IMAGE_BASE})
    finally:
        mem.close()


def test_log_symbols_are_read_from_system_map(tmp_path):
    path = tmp_path / "System.map"
    path.write_text("ffffffff81a34390 d prb\nffffffff81aa44a0 D console_printk\nffffffff81000000 T _text\n")
    assert log_symbols(path) == {"prb": 0xFFFFFFFF81A34390, "console_printk": 0xFFFFFFFF81AA44A0}
    with pytest.raises(KernelLogError):
        log_symbols(tmp_path / "missing")


def test_a_running_guest_s_newest_record_waits_until_finalized():
    mem = GuestMemory([(0, 1 << 20)])
    try:
        symbols = _fake_ring(mem, [(0, 1, 6, b"done"), (1, 2, 6, b"still growin")])
        mem.write(0x11000 + 24, struct.pack("<Q", (1 << 62) | 1))  # record 1: committed, not finalized
        assert [r.text for r in read_kernel_log(mem, symbols, finalized_only=True)] == [b"done"]
        assert [r.text for r in read_kernel_log(mem, symbols)] == [b"done", b"still growin"]
    finally:
        mem.close()


def test_the_cursor_reads_each_finalized_record_once():
    mem = GuestMemory([(0, 1 << 20)])
    try:
        symbols = _fake_ring(mem, [(0, 1, 6, b"one"), (1, 2, 6, b"two"), (2, 3, 6, b"three")])
        mem.write(0x11000 + 2 * 24, struct.pack("<Q", (1 << 62) | 2))  # "three": committed, still growing
        cursor = KernelLogCursor(mem, symbols)
        assert [r.text for r in cursor.new_records()] == [b"one", b"two"]
        assert cursor.new_records() == []  # nothing new, nothing again
        mem.write(0x11000 + 2 * 24, struct.pack("<Q", (2 << 62) | 2))  # finalized now
        assert [r.text for r in cursor.new_records()] == [b"three"]
        assert cursor.new_records() == []
    finally:
        mem.close()
