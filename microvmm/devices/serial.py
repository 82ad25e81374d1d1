"""A 16550A UART (8250 family) as Linux's 8250 driver sees it.

Model choices, and why:
- The transmitter is infinitely fast: a THR write goes to `output` at once, so
  LSR.THRE/TEMT always read 1. Writing THR clears a pending THRE interrupt and,
  because the holding register is immediately empty again, re-arms it while
  IER.ETBEI is set — that is the "transmitter went empty" event a real UART
  raises one character time later, and the 8250 tty path needs it to send the
  rest of a buffer that did not fit in one FIFO load.
- The THRE interrupt is edge-like inside the UART: it becomes pending when
  ETBEI is enabled while THR is empty (Linux's startup THRE/TXEN tests and
  __start_tx rely on that) or when THR empties, and it is cleared by reading IIR
  while THRE is the reported source, by writing THR, or by clearing ETBEI.
- RX: a bounded 16-byte FIFO (1 byte with FIFOs disabled). The size is part of
  the hardware identity: Linux's size_fifo() probe counts it in loopback and
  would take 64 for a different UART type. Host input is never dropped:
  `enqueue_input` accepts only what fits and returns how much; `wants_input`,
  `rx_space` and the optional `rx_ready` callback give the VMM backpressure.
- "Received data available" is reported as soon as DR is set and ERBFI is on:
  as the FIFO-trigger interrupt (IIR 0x4) at or above the trigger level and as
  the character-timeout interrupt (IIR 0xC) below it, since there are no timers.
- Modem lines outside loopback read CTS|DSR|DCD (a connected null-modem cable),
  so a tty without CLOCAL does not wait for carrier.
- The IRQ output is the UART's INTR pin (any enabled source pending). PCs gate
  it with MCR.OUT2; QEMU, kvmtool and Firecracker do not, and neither does this
  model unless `gate_irq_with_out2=True`.

Callbacks (`irq_level`, `output`, `rx_ready`) are invoked with the UART's lock
held, which keeps IRQ level changes and output bytes in guest order across
vCPU threads; they must not call back into the UART.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from typing import Callable

logger = logging.getLogger(__name__)

COM1_BASE = 0x3F8
COM1_IRQ = 4
COM2_BASE = 0x2F8
COM2_IRQ = 3
#: Number of I/O ports a UART decodes.
UART_PORT_COUNT = 8

#: Hardware RX FIFO depth of a 16550A.
RX_FIFO_SIZE = 16


class Reg(enum.IntEnum):
    """Register offsets from the UART base."""

    RBR_THR_DLL = 0  # RBR (read), THR (write), DLL when LCR.DLAB
    IER_DLM = 1  # IER, DLM when LCR.DLAB
    IIR_FCR = 2  # IIR (read), FCR (write)
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


class Ier(enum.IntFlag):
    ERBFI = 0x01  # received data available
    ETBEI = 0x02  # transmit holding register empty
    ELSI = 0x04  # receiver line status
    EDSSI = 0x08  # modem status
    ALL = 0x0F  # a 16550A implements only these bits


class Iir(enum.IntEnum):
    """Interrupt identification codes (bits 0-3), highest priority first."""

    LINE_STATUS = 0x06
    RX_DATA = 0x04
    RX_TIMEOUT = 0x0C
    THR_EMPTY = 0x02
    MODEM_STATUS = 0x00
    NO_INTERRUPT = 0x01


IIR_FIFO_ENABLED = 0xC0


class Fcr(enum.IntFlag):
    ENABLE_FIFO = 0x01
    CLEAR_RX = 0x02
    CLEAR_TX = 0x04
    TRIGGER_MASK = 0xC0


#: RX trigger level per FCR bits 7:6.
RX_TRIGGER_LEVELS = (1, 4, 8, 14)


class Lcr(enum.IntFlag):
    DLAB = 0x80


class Mcr(enum.IntFlag):
    DTR = 0x01
    RTS = 0x02
    OUT1 = 0x04
    OUT2 = 0x08
    LOOP = 0x10
    ALL = 0x1F  # bits 5-7 read 0 on a 16550A


class Lsr(enum.IntFlag):
    DR = 0x01
    OE = 0x02
    PE = 0x04
    FE = 0x08
    BI = 0x10
    THRE = 0x20
    TEMT = 0x40
    ERROR_BITS = 0x1E


class Msr(enum.IntFlag):
    DCTS = 0x01
    DDSR = 0x02
    TERI = 0x04
    DDCD = 0x08
    CTS = 0x10
    DSR = 0x20
    RI = 0x40
    DCD = 0x80
    DELTAS = 0x0F


#: Modem status inputs when not in loopback: a connected peer.
EXTERNAL_MODEM_STATUS = Msr.CTS | Msr.DSR | Msr.DCD

# Plain-int copies of the flags used on the access path: IntFlag arithmetic
# allocates enum objects and costs microseconds per register access.
_FCR_CLEAR_RX = int(Fcr.CLEAR_RX)
_FCR_ENABLE_FIFO = int(Fcr.ENABLE_FIFO)
_FCR_TRIGGER_MASK = int(Fcr.TRIGGER_MASK)
_IER_ALL = int(Ier.ALL)
_IER_EDSSI = int(Ier.EDSSI)
_IER_ELSI = int(Ier.ELSI)
_IER_ERBFI = int(Ier.ERBFI)
_IER_ETBEI = int(Ier.ETBEI)
_LCR_DLAB = int(Lcr.DLAB)
_LSR_DR = int(Lsr.DR)
_LSR_OE = int(Lsr.OE)
_LSR_TEMT = int(Lsr.TEMT)
_LSR_THRE = int(Lsr.THRE)
_MCR_ALL = int(Mcr.ALL)
_MCR_DTR = int(Mcr.DTR)
_MCR_LOOP = int(Mcr.LOOP)
_MCR_OUT1 = int(Mcr.OUT1)
_MCR_OUT2 = int(Mcr.OUT2)
_MCR_RTS = int(Mcr.RTS)
_MSR_CTS = int(Msr.CTS)
_MSR_DCD = int(Msr.DCD)
_MSR_DCTS = int(Msr.DCTS)
_MSR_DDCD = int(Msr.DDCD)
_MSR_DDSR = int(Msr.DDSR)
_MSR_DSR = int(Msr.DSR)
_MSR_RI = int(Msr.RI)
_MSR_TERI = int(Msr.TERI)
_EXTERNAL_MODEM_STATUS = int(EXTERNAL_MODEM_STATUS)

# Precomputed one-byte bytes objects: the per-THR-write output path allocates nothing.
_SINGLE_BYTES = tuple(bytes((i,)) for i in range(256))


class Serial16550A:
    """A 16550A UART; register it on the port bus at e.g. COM1_BASE, length 8."""

    def __init__(self, irq_level: Callable[[bool], None], output: Callable[[bytes], None],
                 rx_ready: Callable[[], None] | None = None,
                 gate_irq_with_out2: bool = False) -> None:
        self._irq_level = irq_level
        self._output = output
        self._rx_ready = rx_ready
        self._gate_with_out2 = gate_irq_with_out2
        self._lock = threading.Lock()

        self._ier = 0
        self._lcr = 0x03  # 8N1
        self._mcr = 0
        self._fcr = 0  # FIFO enable and trigger bits as last written
        self._lsr_errors = 0  # sticky LSR error bits, cleared by reading LSR
        self._msr_deltas = 0
        self._scr = 0
        self._divisor = 0x000C  # 9600 baud at 1.8432 MHz
        self._rx: deque[int] = deque()
        self._thr_interrupt = False
        self._irq_asserted = False

    # -- host side (I/O thread) -------------------------------------------

    def rx_space(self) -> int:
        """Bytes `enqueue_input` would accept now (0 in loopback mode)."""
        with self._lock:
            return self._host_room()

    def wants_input(self) -> bool:
        """True when the VMM should read host input for this UART."""
        return self.rx_space() > 0

    def enqueue_input(self, data: bytes) -> int:
        """Queue host bytes for the guest; returns how many were accepted.

        Bytes that do not fit are not taken: the caller keeps them and retries
        after `rx_ready` fires (or `wants_input()` turns true). In loopback mode
        the receiver is disconnected from the outside, so nothing is accepted
        until the guest leaves loopback (Linux's FIFO-size probe runs there).
        """
        with self._lock:
            accepted = data[:self._host_room()]
            if accepted:
                self._rx.extend(accepted)
                self._update_irq()
            return len(accepted)

    # -- guest side (vCPU threads) ----------------------------------------

    def read(self, offset: int, size: int) -> int:
        # Multi-byte accesses to 8-bit registers: only the addressed register
        # answers; the upper bytes read as an idle bus would.
        with self._lock:
            room_before = self._host_room()
            value = self._read_reg(offset)
            if room_before == 0 and self._host_room() > 0:
                self._notify_rx_ready()
        if size > 1:
            value |= ((1 << (size * 8)) - 1) & ~0xFF
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            room_before = self._host_room()
            self._write_reg(offset, value & 0xFF)
            if room_before == 0 and self._host_room() > 0:
                self._notify_rx_ready()

    # -- register model (lock held) ---------------------------------------

    def _host_room(self) -> int:
        if self._mcr & _MCR_LOOP:
            return 0
        return self._rx_capacity() - len(self._rx)

    def _rx_capacity(self) -> int:
        return RX_FIFO_SIZE if self._fcr & _FCR_ENABLE_FIFO else 1

    def _dlab(self) -> bool:
        return bool(self._lcr & _LCR_DLAB)

    def _read_reg(self, offset: int) -> int:
        if offset == Reg.RBR_THR_DLL:
            if self._dlab():
                return self._divisor & 0xFF
            return self._read_rbr()
        if offset == Reg.IER_DLM:
            if self._dlab():
                return self._divisor >> 8
            return self._ier
        if offset == Reg.IIR_FCR:
            return self._read_iir()
        if offset == Reg.LCR:
            return self._lcr
        if offset == Reg.MCR:
            return self._mcr
        if offset == Reg.LSR:
            value = self._lsr()
            if self._lsr_errors:
                self._lsr_errors = 0
                self._update_irq()
            return value
        if offset == Reg.MSR:
            value = self._modem_status() | self._msr_deltas
            if self._msr_deltas:
                self._msr_deltas = 0
                self._update_irq()
            return value
        if offset == Reg.SCR:
            return self._scr
        return 0xFF  # past the 8 registers (straddling access): idle bus

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == Reg.RBR_THR_DLL:
            if self._dlab():
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif offset == Reg.IER_DLM:
            if self._dlab():
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif offset == Reg.IIR_FCR:
            self._write_fcr(value)
        elif offset == Reg.LCR:
            self._lcr = value
        elif offset == Reg.MCR:
            self._write_mcr(value)
        elif offset == Reg.SCR:
            self._scr = value
        # LSR and MSR writes are factory-test features; ignored.

    def _read_rbr(self) -> int:
        if not self._rx:
            return 0
        value = self._rx.popleft()
        self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        if self._mcr & _MCR_LOOP:
            # Loopback: the transmitter feeds the receiver, nothing leaves the UART.
            if len(self._rx) < self._rx_capacity():
                self._rx.append(value)
            else:
                self._lsr_errors |= _LSR_OE
        else:
            self._output(_SINGLE_BYTES[value])
        # THR is empty again at once: the empty event re-arms the interrupt.
        self._thr_interrupt = bool(self._ier & _IER_ETBEI)
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        old = self._ier
        self._ier = value & _IER_ALL
        if self._ier & _IER_ETBEI:
            if not old & _IER_ETBEI:
                # Enabling ETBEI while THR is empty (always, here) fires it.
                self._thr_interrupt = True
        else:
            self._thr_interrupt = False
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        clear_rx = bool(value & _FCR_CLEAR_RX)
        if (value ^ self._fcr) & _FCR_ENABLE_FIFO:
            clear_rx = True  # toggling FIFO mode resets the FIFOs
        self._fcr = value & (_FCR_ENABLE_FIFO | _FCR_TRIGGER_MASK)
        if clear_rx:
            self._rx.clear()
        # CLEAR_TX: the transmit FIFO is always empty here.
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        before = self._modem_status()
        self._mcr = value & _MCR_ALL
        after = self._modem_status()
        changed = before ^ after
        deltas = 0
        if changed & _MSR_CTS:
            deltas |= _MSR_DCTS
        if changed & _MSR_DSR:
            deltas |= _MSR_DDSR
        if changed & _MSR_DCD:
            deltas |= _MSR_DDCD
        if before & _MSR_RI and not after & _MSR_RI:
            deltas |= _MSR_TERI  # trailing edge of RI only
        self._msr_deltas |= deltas
        self._update_irq()

    def _modem_status(self) -> int:
        if not self._mcr & _MCR_LOOP:
            return _EXTERNAL_MODEM_STATUS
        # Loopback wiring: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
        mcr = self._mcr
        status = 0
        if mcr & _MCR_DTR:
            status |= _MSR_DSR
        if mcr & _MCR_RTS:
            status |= _MSR_CTS
        if mcr & _MCR_OUT1:
            status |= _MSR_RI
        if mcr & _MCR_OUT2:
            status |= _MSR_DCD
        return status

    def _lsr(self) -> int:
        value = _LSR_THRE | _LSR_TEMT | self._lsr_errors
        if self._rx:
            value |= _LSR_DR
        return int(value)

    def _pending_interrupt(self) -> Iir:
        ier = self._ier
        if ier & _IER_ELSI and self._lsr_errors:
            return Iir.LINE_STATUS
        if ier & _IER_ERBFI and self._rx:
            if self._fcr & _FCR_ENABLE_FIFO:
                trigger = RX_TRIGGER_LEVELS[(self._fcr & _FCR_TRIGGER_MASK) >> 6]
                if len(self._rx) < trigger:
                    return Iir.RX_TIMEOUT
            return Iir.RX_DATA
        if self._thr_interrupt:
            return Iir.THR_EMPTY
        if ier & _IER_EDSSI and self._msr_deltas:
            return Iir.MODEM_STATUS
        return Iir.NO_INTERRUPT

    def _read_iir(self) -> int:
        source = self._pending_interrupt()
        value = int(source)
        if self._fcr & _FCR_ENABLE_FIFO:
            value |= IIR_FIFO_ENABLED
        if source is Iir.THR_EMPTY:
            # Reading IIR while THRE is the reported source acknowledges it.
            self._thr_interrupt = False
            self._update_irq()
        return value

    def _update_irq(self) -> None:
        level = self._pending_interrupt() is not Iir.NO_INTERRUPT
        if self._gate_with_out2 and not self._mcr & _MCR_OUT2:
            level = False
        if level != self._irq_asserted:
            self._irq_asserted = level
            self._irq_level(level)

    def _notify_rx_ready(self) -> None:
        if self._rx_ready is not None:
            self._rx_ready()
