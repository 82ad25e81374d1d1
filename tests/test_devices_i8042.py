"""i8042: the keyboard-controller reset path Linux's reboot=k uses."""

from __future__ import annotations

from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
from microvmm.devices.i8042 import I8042, I8042_BASE, I8042_PORT_COUNT

STATUS_OBF, STATUS_IBF = 0x01, 0x02


def make() -> tuple[Bus, list[str]]:
    resets: list[str] = []
    bus = Bus("pio", PIO_ADDRESS_LIMIT)
    bus.register(I8042_BASE, I8042_PORT_COUNT, I8042(lambda: resets.append("reset")), "i8042")
    return bus, resets


def test_linux_reboot_k_sequence_requests_reset() -> None:
    bus, resets = make()
    # arch/x86/kernel/reboot.c: kb_wait() polls 0x64 until the input buffer is
    # empty, then outb(0xfe, 0x64) pulses the reset line.
    for _ in range(10):
        polls = 0
        while bus.read(0x64, 1) & STATUS_IBF:
            polls += 1
            assert polls < 0x10000
        bus.write(0x64, 1, 0xFE)
        if resets:
            break
    assert resets == ["reset"]


def test_status_idle_and_other_commands_harmless() -> None:
    bus, resets = make()
    status = bus.read(0x64, 1)
    assert status & (STATUS_OBF | STATUS_IBF) == 0
    for cmd in (0xAD, 0xAE, 0xA7, 0xA8, 0xF0, 0x00):
        bus.write(0x64, 1, cmd)
    bus.write(0x60, 1, 0xFF)  # a byte for the absent keyboard
    assert resets == []
    assert bus.read(0x64, 1) & (STATUS_OBF | STATUS_IBF) == 0


def test_self_test_and_config_byte() -> None:
    bus, _ = make()
    bus.write(0x64, 1, 0xAA)
    assert bus.read(0x64, 1) & STATUS_OBF
    assert bus.read(0x60, 1) == 0x55
    assert not bus.read(0x64, 1) & STATUS_OBF
    bus.write(0x64, 1, 0x60)
    bus.write(0x60, 1, 0x65)
    bus.write(0x64, 1, 0x20)
    assert bus.read(0x60, 1) == 0x65


def test_output_port_write_with_reset_bit_low_resets() -> None:
    bus, resets = make()
    bus.write(0x64, 1, 0xD1)
    bus.write(0x60, 1, 0x03)  # reset line stays deasserted
    assert resets == []
    bus.write(0x64, 1, 0xD1)
    bus.write(0x60, 1, 0x02)
    assert resets == ["reset"]
