"""A minimal i8042 keyboard controller: enough for Linux's keyboard reset.

Linux's `reboot=k` path (the default on x86 when ACPI/EFI reboot is not
available) polls the status port until the input buffer is empty, then writes
0xFE ("pulse output line 0", wired to the CPU reset) to the command port. That
is how a guest's `reboot -f` ends the VM: the model calls `reset_requested` on
every reset pulse (Linux pulses up to ten times before the VMM has stopped the
vCPUs), so the callback must be idempotent. It is called without the device lock.
Writing the output port (command 0xD1) with bit 0 clear resets the same way.

No keyboard or mouse is attached and no IRQ is wired; a few controller commands
an i8042 driver may issue get plausible replies so a probing guest sees a
healthy, empty controller instead of timeouts.

Register at I8042_BASE with length I8042_PORT_COUNT (0x60-0x64; 0x61-0x63 are
the PIT/speaker ports that KVM's in-kernel PIT handles before they reach
userspace, and this model reads them as an idle bus).
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import Callable

logger = logging.getLogger(__name__)

I8042_BASE = 0x60
I8042_PORT_COUNT = 5
DATA_OFFSET = 0  # port 0x60
COMMAND_OFFSET = 4  # port 0x64 (status on read, command on write)


class Status(enum.IntFlag):
    OUTPUT_FULL = 0x01  # a byte waits in the output buffer (port 0x60)
    INPUT_FULL = 0x02  # never set: commands are consumed at once
    SYSTEM = 0x04  # self-test passed
    COMMAND = 0x08  # last write went to the command port
    UNLOCKED = 0x10  # keyboard not inhibited


class Command(enum.IntEnum):
    READ_CONFIG = 0x20
    WRITE_CONFIG = 0x60
    DISABLE_AUX = 0xA7
    ENABLE_AUX = 0xA8
    TEST_AUX = 0xA9
    SELF_TEST = 0xAA
    TEST_KBD = 0xAB
    DISABLE_KBD = 0xAD
    ENABLE_KBD = 0xAE
    READ_OUTPUT_PORT = 0xD0
    WRITE_OUTPUT_PORT = 0xD1
    PULSE_RESET = 0xFE


SELF_TEST_PASSED = 0x55
INTERFACE_TEST_PASSED = 0x00
#: Output port bit 0 drives the CPU reset line (active low); bit 1 is A20.
OUTPUT_PORT_RESET_DEASSERTED = 0x01
DEFAULT_OUTPUT_PORT = 0x03
#: Config byte: system flag set, keyboard/aux interrupts off, translation on.
DEFAULT_CONFIG = 0x44


class I8042:
    """The keyboard controller at ports 0x60/0x64."""

    def __init__(self, reset_requested: Callable[[], None]) -> None:
        self._reset_requested = reset_requested
        self._lock = threading.Lock()
        self._config = DEFAULT_CONFIG
        self._output_port = DEFAULT_OUTPUT_PORT
        self._output_buffer: int | None = None
        self._last_was_command = False
        self._pending_data_command: Command | None = None

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA_OFFSET:
                value = self._output_buffer if self._output_buffer is not None else 0
                self._output_buffer = None
                return value
            if offset == COMMAND_OFFSET:
                return self._status()
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        reset = False
        with self._lock:
            if offset == COMMAND_OFFSET:
                self._last_was_command = True
                reset = self._command(value)
            elif offset == DATA_OFFSET:
                self._last_was_command = False
                reset = self._data(value)
        if reset:
            # Outside the lock: the VMM may tear things down from here.
            logger.info("i8042: guest pulsed the reset line")
            self._reset_requested()

    def _status(self) -> int:
        status = Status.SYSTEM | Status.UNLOCKED
        if self._output_buffer is not None:
            status |= Status.OUTPUT_FULL
        if self._last_was_command:
            status |= Status.COMMAND
        return int(status)

    def _command(self, value: int) -> bool:
        """Run a controller command; True when it resets the machine."""
        self._pending_data_command = None
        if value == Command.PULSE_RESET:
            return True
        if value == Command.READ_CONFIG:
            self._output_buffer = self._config
        elif value == Command.WRITE_CONFIG:
            self._pending_data_command = Command.WRITE_CONFIG
        elif value == Command.SELF_TEST:
            self._output_buffer = SELF_TEST_PASSED
        elif value in (Command.TEST_KBD, Command.TEST_AUX):
            self._output_buffer = INTERFACE_TEST_PASSED
        elif value == Command.READ_OUTPUT_PORT:
            self._output_buffer = self._output_port
        elif value == Command.WRITE_OUTPUT_PORT:
            self._pending_data_command = Command.WRITE_OUTPUT_PORT
        else:
            # Enable/disable ports and anything else: nothing attached, so harmless.
            logger.debug("i8042: command %#x accepted and ignored", value)
        return False

    def _data(self, value: int) -> bool:
        """Handle a data-port write; True when it resets the machine."""
        pending, self._pending_data_command = self._pending_data_command, None
        if pending == Command.WRITE_CONFIG:
            self._config = value
        elif pending == Command.WRITE_OUTPUT_PORT:
            self._output_port = value
            return not value & OUTPUT_PORT_RESET_DEASSERTED
        # Otherwise a byte for the (absent) keyboard: dropped.
        return False
