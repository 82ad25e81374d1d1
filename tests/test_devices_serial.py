"""The 16550A model, driven the way Linux's 8250 driver drives it."""

from __future__ import annotations

import threading

import pytest

from microvmm.devices.bus import PIO_ADDRESS_LIMIT, Bus
from microvmm.devices.serial import COM1_BASE, RX_FIFO_SIZE, UART_PORT_COUNT, Serial16550A

# Register offsets and bits as named in Linux's include/uapi/linux/serial_reg.h.
RX = TX = DLL = 0
IER = DLM = 1
IIR = FCR = EFR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI, IER_THRI, IER_RLSI, IER_MSI, IER_UUE = 0x01, 0x02, 0x04, 0x08, 0x40
IIR_NO_INT, IIR_ID = 0x01, 0x0F
IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_RX_TIMEOUT = 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFO_BITS, IIR_64BYTE = 0xC0, 0x20
FCR_ENABLE_FIFO, FCR_CLEAR_RCVR, FCR_CLEAR_XMIT, FCR7_64BYTE = 0x01, 0x02, 0x04, 0x20
FCR_TRIGGER_14 = 0xC0
LCR_DLAB, LCR_CONF_MODE_A, LCR_CONF_MODE_B, LCR_WLEN8 = 0x80, 0x80, 0xBF, 0x03
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80


class Harness:
    """A UART on a port bus, with recorded IRQ line, output and rx_ready calls."""

    def __init__(self, **kwargs: bool) -> None:
        self.irq_changes: list[bool] = []
        self.out = bytearray()
        self.rx_ready_calls = 0
        self.uart = Serial16550A(irq_level=self.irq_changes.append,
                                 output=self.out.extend, rx_ready=self._rx_ready, **kwargs)
        self.bus = Bus("pio", PIO_ADDRESS_LIMIT)
        self.bus.register(COM1_BASE, UART_PORT_COUNT, self.uart, "com1")

    def _rx_ready(self) -> None:
        self.rx_ready_calls += 1

    def inb(self, reg: int) -> int:
        return self.bus.read(COM1_BASE + reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.bus.write(COM1_BASE + reg, 1, value)

    @property
    def irq(self) -> bool:
        return self.irq_changes[-1] if self.irq_changes else False


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- Linux 8250 probing, replayed ----------------------------------------

def linux_size_fifo(h: Harness) -> int:
    """drivers/tty/serial/8250/8250_port.c size_fifo(): count RX FIFO depth in loopback."""
    old_lcr = h.inb(LCR)
    h.outb(LCR, 0)
    old_fcr = h.inb(FCR)
    old_mcr = h.inb(MCR)
    h.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    h.outb(MCR, MCR_LOOP)
    h.outb(LCR, LCR_CONF_MODE_A)
    old_dl = h.inb(DLL) | h.inb(DLM) << 8
    h.outb(DLL, 1)
    h.outb(DLM, 0)
    h.outb(LCR, LCR_WLEN8)
    for count in range(256):
        h.outb(TX, count)
    count = 0
    while (h.inb(LSR) & LSR_DR) and count < 256:
        h.inb(RX)
        count += 1
    h.outb(FCR, old_fcr)
    h.outb(MCR, old_mcr)
    h.outb(LCR, LCR_CONF_MODE_A)
    h.outb(DLL, old_dl & 0xFF)
    h.outb(DLM, old_dl >> 8)
    h.outb(LCR, old_lcr)
    return count


def linux_autoconfig_16550a(h: Harness) -> str:
    """autoconfig_16550a() with CONFIG_SERIAL_8250_16550A_VARIANTS=y."""
    h.outb(LCR, LCR_CONF_MODE_A)
    if h.inb(EFR) == 0:
        return "16650-or-motorola"
    h.outb(LCR, LCR_CONF_MODE_B)
    if h.inb(EFR) == 0:
        return "EFRv2"
    h.outb(LCR, 0)
    status1 = h.inb(MCR)
    h.outb(LCR, 0xE0)
    status2 = h.inb(0x02)
    if not ((status2 ^ status1) & MCR_LOOP):
        h.outb(LCR, 0)
        h.outb(MCR, status1 ^ MCR_LOOP)
        h.outb(LCR, 0xE0)
        status2 = h.inb(0x02)
        h.outb(LCR, 0)
        h.outb(MCR, status1)
        if (status2 ^ status1) & MCR_LOOP:
            return "NS16550A"
    h.outb(LCR, 0)
    h.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    status1 = h.inb(IIR) & (IIR_64BYTE | IIR_FIFO_BITS)
    h.outb(FCR, FCR_ENABLE_FIFO)
    h.outb(LCR, LCR_CONF_MODE_A)
    h.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    status2 = h.inb(IIR) & (IIR_64BYTE | IIR_FIFO_BITS)
    h.outb(FCR, FCR_ENABLE_FIFO)
    h.outb(LCR, 0)
    if status1 == IIR_FIFO_BITS and status2 == IIR_64BYTE | IIR_FIFO_BITS:
        return "16750"
    iersave = h.inb(IER)
    h.outb(IER, iersave & ~IER_UUE)
    if not h.inb(IER) & IER_UUE:
        h.outb(IER, iersave | IER_UUE)
        if h.inb(IER) & IER_UUE:
            return "XScale"
    h.outb(IER, iersave)
    if linux_size_fifo(h) == 64:
        return "U6_16550A"
    return "16550A"


def linux_autoconfig(h: Harness, skip_test: bool = False) -> str:
    """autoconfig(): IER test, loopback test, FIFO identification."""
    scratch = h.inb(IER)
    h.outb(IER, 0)
    scratch2 = h.inb(IER) & 0x0F
    h.outb(IER, 0x0F)
    scratch3 = h.inb(IER) & 0x0F
    h.outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none (IER test failed)"
    save_mcr = h.inb(MCR)
    save_lcr = h.inb(LCR)
    if not skip_test:
        h.outb(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
        status1 = h.inb(MSR) & 0xF0
        h.outb(MCR, save_mcr)
        if status1 != MSR_DCD | MSR_CTS:
            return "none (loop test failed)"
    h.outb(LCR, LCR_CONF_MODE_B)
    h.outb(EFR, 0)
    h.outb(LCR, 0)
    h.outb(FCR, FCR_ENABLE_FIFO)
    fifo_bits = h.inb(IIR) >> 6
    if fifo_bits == 0:
        h.outb(SCR, 0xA5)
        kind = "16450" if h.inb(SCR) == 0xA5 else "8250"
    elif fifo_bits == 2:
        kind = "16550"
    elif fifo_bits == 3:
        kind = linux_autoconfig_16550a(h)
    else:
        kind = "unknown"
    h.outb(LCR, save_lcr)
    h.outb(MCR, save_mcr)
    # serial8250_clear_fifos, then a dummy RX read and IER cleared.
    h.outb(FCR, FCR_ENABLE_FIFO)
    h.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    h.outb(FCR, 0)
    h.inb(RX)
    h.outb(IER, 0)
    return kind


def test_linux_autoconfig_detects_16550a(h: Harness) -> None:
    assert linux_autoconfig(h) == "16550A"
    assert linux_autoconfig(h, skip_test=True) == "16550A"
    # Nothing of the loopback probing (256 bytes in size_fifo) leaked to the host.
    assert h.out == b""
    assert not h.irq


def test_size_fifo_counts_16(h: Harness) -> None:
    assert linux_size_fifo(h) == RX_FIFO_SIZE == 16


def test_unclaimed_com2_fails_linux_ier_test() -> None:
    # Sanity of the replay itself: an empty port (all-ones bus) is not detected.
    h = Harness()
    h.bus.unregister(COM1_BASE)
    assert linux_autoconfig(h) == "none (IER test failed)"


def test_linux_startup_thre_and_txen_tests_pass(h: Harness) -> None:
    """serial8250_do_startup(): the UART must re-assert THRE each time ETBEI is
    enabled while idle, else Linux flags UART_BUG_THRE / UART_BUG_TXEN."""
    linux_autoconfig(h)
    h.outb(FCR, FCR_ENABLE_FIFO)
    h.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    h.outb(FCR, 0)
    h.inb(LSR), h.inb(RX), h.inb(IIR), h.inb(MSR)
    assert h.inb(LSR) != 0xFF  # "LSR safety check"
    # THRE test
    assert h.inb(LSR) & LSR_THRE
    h.outb(IER, IER_THRI)
    iir1 = h.inb(IIR)
    h.outb(IER, 0)
    h.outb(IER, IER_THRI)
    iir = h.inb(IIR)
    h.outb(IER, 0)
    bug_thre = not (iir1 & IIR_NO_INT) and bool(iir & IIR_NO_INT)
    assert iir1 & IIR_ID == IIR_THRI and not bug_thre
    # TXEN test after MCR gets OUT2
    h.outb(LCR, LCR_WLEN8)
    h.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
    h.outb(IER, IER_THRI)
    lsr = h.inb(LSR)
    iir = h.inb(IIR)
    h.outb(IER, 0)
    assert not (lsr & LSR_TEMT and iir & IIR_NO_INT)


# -- registers --------------------------------------------------------------

def test_reset_state(h: Harness) -> None:
    assert h.inb(LSR) == LSR_THRE | LSR_TEMT
    assert h.inb(IIR) == IIR_NO_INT
    assert h.inb(IER) == 0
    assert h.inb(MSR) & 0xF0 == MSR_CTS | MSR_DSR | MSR_DCD
    assert h.irq_changes == []


def test_dlab_selects_divisor_latch(h: Harness) -> None:
    h.outb(IER, IER_RDI)
    h.outb(LCR, LCR_DLAB | LCR_WLEN8)
    h.outb(DLL, 0x01)
    h.outb(DLM, 0x02)
    assert h.inb(DLL) == 0x01 and h.inb(DLM) == 0x02
    h.outb(LCR, LCR_WLEN8)
    # IER untouched by the DLM write; DLL write did not transmit.
    assert h.inb(IER) == IER_RDI
    assert h.out == b""
    assert h.inb(LCR) == LCR_WLEN8
    h.outb(LCR, LCR_DLAB)
    assert h.inb(DLL) | h.inb(DLM) << 8 == 0x0201


def test_scratch_register(h: Harness) -> None:
    for v in (0xA5, 0x5A, 0x00):
        h.outb(SCR, v)
        assert h.inb(SCR) == v


def test_ier_and_mcr_reserved_bits_read_zero(h: Harness) -> None:
    h.outb(IER, 0xFF)
    assert h.inb(IER) == 0x0F
    h.outb(MCR, 0xFF)
    assert h.inb(MCR) == 0x1F


def test_iir_fifo_bits_follow_fcr(h: Harness) -> None:
    h.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    assert h.inb(IIR) == IIR_FIFO_BITS | IIR_NO_INT
    h.outb(FCR, 0)
    assert h.inb(IIR) == IIR_NO_INT


# -- transmit and the THRE interrupt --------------------------------------------

def test_thr_write_goes_to_output(h: Harness) -> None:
    for ch in b"hello\n":
        assert h.inb(LSR) & LSR_THRE
        h.outb(TX, ch)
    assert bytes(h.out) == b"hello\n"


def test_thre_interrupt_raised_when_etbei_enabled_with_empty_thr(h: Harness) -> None:
    h.outb(IER, IER_THRI)
    assert h.irq_changes == [True]
    assert h.inb(IIR) & IIR_ID == IIR_THRI


def test_thre_interrupt_cleared_by_reading_iir(h: Harness) -> None:
    h.outb(IER, IER_THRI)
    assert h.inb(IIR) & IIR_ID == IIR_THRI
    assert h.irq_changes == [True, False]
    assert h.inb(IIR) == IIR_NO_INT  # read-to-clear: not reported again
    # Rewriting IER with ETBEI still set is not a new "enable" event.
    h.outb(IER, IER_THRI)
    assert h.inb(IIR) == IIR_NO_INT
    assert h.irq_changes == [True, False]


def test_thre_interrupt_cleared_by_disabling_etbei(h: Harness) -> None:
    h.outb(IER, IER_THRI)
    h.outb(IER, 0)
    assert h.irq_changes == [True, False]
    assert h.inb(IIR) == IIR_NO_INT


def test_thr_write_clears_then_rearms_thre(h: Harness) -> None:
    """Linux's tx path: IRQ → read IIR (acks THRE) → write a FIFO load to THR →
    return; the next THRE interrupt must come when the transmitter empties,
    which in this model is immediately after the write."""
    h.outb(IER, IER_RDI | IER_THRI)
    assert h.inb(IIR) & IIR_ID == IIR_THRI
    assert h.irq_changes == [True, False]
    for ch in b"0123456789abcdef":
        h.outb(TX, ch)
    # One rising edge for the whole burst (level only reported on change).
    assert h.irq_changes == [True, False, True]
    assert h.inb(IIR) & IIR_ID == IIR_THRI
    # Driver has nothing left: __stop_tx clears ETBEI, line drops.
    h.outb(IER, IER_RDI)
    assert h.inb(IIR) == IIR_NO_INT
    assert h.irq_changes == [True, False, True, False]
    assert bytes(h.out) == b"0123456789abcdef"


def test_thr_write_without_etbei_raises_nothing(h: Harness) -> None:
    h.outb(TX, ord("x"))
    assert h.irq_changes == []
    assert h.inb(IIR) == IIR_NO_INT


# -- receive ------------------------------------------------------------------

def test_rx_sets_dr_and_interrupt(h: Harness) -> None:
    h.outb(FCR, FCR_ENABLE_FIFO)  # trigger level 1
    h.outb(IER, IER_RDI)
    assert not h.irq
    assert h.uart.enqueue_input(b"ab") == 2
    assert h.irq
    assert h.inb(LSR) & LSR_DR
    assert h.inb(IIR) & IIR_ID == IIR_RDI
    assert h.inb(RX) == ord("a")
    assert h.irq  # still data
    assert h.inb(RX) == ord("b")
    assert not h.irq
    assert not h.inb(LSR) & LSR_DR
    assert h.inb(IIR) & IIR_ID == IIR_NO_INT


def test_rx_below_trigger_reports_timeout_interrupt(h: Harness) -> None:
    h.outb(FCR, FCR_ENABLE_FIFO | FCR_TRIGGER_14)
    h.outb(IER, IER_RDI)
    h.uart.enqueue_input(b"x")
    assert h.irq
    assert h.inb(IIR) & IIR_ID == IIR_RX_TIMEOUT
    h.uart.enqueue_input(b"y" * 13)
    assert h.inb(IIR) & IIR_ID == IIR_RDI


def test_rx_without_erbfi_is_polled_only(h: Harness) -> None:
    h.uart.enqueue_input(b"z")
    assert h.irq_changes == []
    assert h.inb(LSR) & LSR_DR
    assert h.inb(RX) == ord("z")


def test_rx_has_priority_over_thre(h: Harness) -> None:
    h.outb(FCR, FCR_ENABLE_FIFO)
    h.outb(IER, IER_RDI | IER_THRI)
    h.uart.enqueue_input(b"k")
    assert h.inb(IIR) & IIR_ID == IIR_RDI
    # Reading IIR while RX is reported must not ack the THRE interrupt.
    h.inb(RX)
    assert h.inb(IIR) & IIR_ID == IIR_THRI
    assert h.inb(IIR) == IIR_FIFO_BITS | IIR_NO_INT


def test_rx_backpressure_never_drops(h: Harness) -> None:
    h.outb(FCR, FCR_ENABLE_FIFO)
    data = bytes(range(40))
    taken = h.uart.enqueue_input(data)
    assert taken == RX_FIFO_SIZE
    assert not h.uart.wants_input() and h.uart.rx_space() == 0
    assert h.uart.enqueue_input(data[taken:]) == 0
    assert h.rx_ready_calls == 0
    assert h.inb(RX) == 0
    assert h.rx_ready_calls == 1  # full → room again
    assert h.uart.rx_space() == 1
    received = [0]
    pos = taken
    while len(received) < len(data):
        pos += h.uart.enqueue_input(data[pos:])
        while h.inb(LSR) & LSR_DR:
            received.append(h.inb(RX))
    assert bytes(received) == data
    assert not h.inb(LSR) & LSR_OE


def test_fifo_disabled_holds_one_byte(h: Harness) -> None:
    assert h.uart.rx_space() == 1
    assert h.uart.enqueue_input(b"pq") == 1
    assert h.uart.rx_space() == 0


def test_fcr_clear_rcvr_empties_fifo(h: Harness) -> None:
    h.outb(FCR, FCR_ENABLE_FIFO)
    h.uart.enqueue_input(b"x" * RX_FIFO_SIZE)
    h.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR)
    assert not h.inb(LSR) & LSR_DR
    assert h.uart.rx_space() == RX_FIFO_SIZE
    assert h.rx_ready_calls == 1


def test_enqueue_input_is_thread_safe(h: Harness) -> None:
    h.outb(FCR, FCR_ENABLE_FIFO)
    payload = bytes(i % 251 for i in range(500))
    received = bytearray()

    def producer() -> None:
        pos = 0
        while pos < len(payload):
            pos += h.uart.enqueue_input(payload[pos:pos + 7])

    t = threading.Thread(target=producer)
    t.start()
    while len(received) < len(payload):
        if h.inb(LSR) & LSR_DR:
            received.append(h.inb(RX))
    t.join()
    assert bytes(received) == payload


# -- loopback and modem status ----------------------------------------------------

def test_loopback_routes_tx_to_rx_and_mirrors_modem_lines(h: Harness) -> None:
    h.outb(FCR, FCR_ENABLE_FIFO)
    h.outb(MCR, MCR_LOOP)
    h.inb(MSR)  # clear deltas from entering loopback
    h.outb(TX, 0x55)
    assert h.out == b""
    assert h.inb(LSR) & LSR_DR
    assert h.inb(RX) == 0x55
    h.outb(MCR, MCR_LOOP | MCR_DTR)
    assert h.inb(MSR) == MSR_DSR | MSR_DDSR
    h.outb(MCR, MCR_LOOP | MCR_RTS)
    assert h.inb(MSR) == MSR_CTS | MSR_DCTS | MSR_DDSR
    h.outb(MCR, MCR_LOOP | MCR_OUT1)
    assert h.inb(MSR) == MSR_RI | MSR_DCTS
    h.outb(MCR, MCR_LOOP | MCR_OUT2)
    assert h.inb(MSR) == MSR_DCD | MSR_TERI | MSR_DDCD
    assert h.inb(MSR) == MSR_DCD  # deltas cleared by the read
    # Host input is held off while in loopback, and resumes afterwards.
    assert h.uart.rx_space() == 0 and h.uart.enqueue_input(b"h") == 0
    h.outb(MCR, 0)
    assert h.uart.rx_space() == RX_FIFO_SIZE
    assert h.rx_ready_calls == 1


def test_loopback_overrun_sets_oe_and_line_status_interrupt(h: Harness) -> None:
    h.outb(FCR, FCR_ENABLE_FIFO)
    h.outb(MCR, MCR_LOOP)
    h.outb(IER, IER_RLSI | IER_RDI)
    for i in range(RX_FIFO_SIZE + 1):
        h.outb(TX, i)
    assert h.inb(IIR) & IIR_ID == IIR_RLSI
    assert h.inb(LSR) & LSR_OE
    assert not h.inb(LSR) & LSR_OE  # cleared by reading LSR
    assert h.inb(IIR) & IIR_ID == IIR_RDI


def test_modem_status_interrupt(h: Harness) -> None:
    h.outb(MCR, MCR_LOOP)
    h.inb(MSR)
    h.outb(IER, IER_MSI)
    assert not h.irq
    h.outb(MCR, MCR_LOOP | MCR_RTS)
    assert h.irq
    assert h.inb(IIR) & IIR_ID == IIR_MSI
    h.inb(MSR)
    assert not h.irq


def test_out2_gating_option() -> None:
    h = Harness(gate_irq_with_out2=True)
    h.outb(IER, IER_THRI)
    assert h.irq_changes == []
    h.outb(MCR, MCR_OUT2)
    assert h.irq_changes == [True]
    # Default model does not gate.
    h2 = Harness()
    h2.outb(IER, IER_THRI)
    assert h2.irq_changes == [True]


def test_wide_access_reads_register_in_low_byte(h: Harness) -> None:
    h.outb(SCR, 0x42)
    assert h.bus.read(COM1_BASE + SCR, 2) == 0xFF42
