"""The host terminal as guest console: the Ctrl-A escape filter, and raw mode
on a real pty that is always restored exactly."""

from __future__ import annotations

import os
import termios

import pytest

from microvmm.host.terminal import ESCAPE_CHAR, ESCAPE_HELP, EscapeFilter, RawTerminal

CTRL_A = bytes([ESCAPE_CHAR])


# -- EscapeFilter --------------------------------------------------------------

def test_plain_text_passes_unchanged():
    assert EscapeFilter().feed(b"ls -l\r\x03\x1b[A") == (b"ls -l\r\x03\x1b[A", [])


@pytest.mark.parametrize("key", [b"x", b"X"])
def test_ctrl_a_x_quits(key):
    assert EscapeFilter().feed(b"abc" + CTRL_A + key + b"def") == (b"abcdef", ["quit"])


@pytest.mark.parametrize("key", [b"h", b"?"])
def test_ctrl_a_h_asks_for_help(key):
    assert EscapeFilter().feed(CTRL_A + key) == (b"", ["help"])
    assert "Ctrl-A x" in ESCAPE_HELP


def test_ctrl_a_ctrl_a_sends_one_literal_ctrl_a():
    assert EscapeFilter().feed(b"a" + CTRL_A + CTRL_A + b"b") == (b"a" + CTRL_A + b"b", [])


def test_ctrl_a_other_key_sends_both_bytes():
    assert EscapeFilter().feed(CTRL_A + b"c") == (CTRL_A + b"c", [])
    assert EscapeFilter().feed(CTRL_A + b"\x03") == (CTRL_A + b"\x03", [])


def test_escape_split_across_feeds():
    escape = EscapeFilter()
    assert escape.feed(b"abc" + CTRL_A) == (b"abc", [])  # held back, nothing decided yet
    assert escape.feed(b"x") == (b"", ["quit"])
    assert escape.feed(b"x") == (b"x", [])                # the escape was consumed
    assert escape.feed(CTRL_A) == (b"", [])
    assert escape.feed(CTRL_A) == (CTRL_A, [])
    assert escape.feed(CTRL_A) == (b"", [])
    assert escape.feed(b"q") == (CTRL_A + b"q", [])


def test_several_commands_in_one_feed():
    out, commands = EscapeFilter().feed(CTRL_A + b"h" + b"ok" + CTRL_A + b"x")
    assert (out, commands) == (b"ok", ["help", "quit"])


# -- RawTerminal on a real pty ----------------------------------------------------

@pytest.fixture
def pty_pair():
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def test_enter_sets_raw_and_restore_brings_back_the_exact_attributes(pty_pair):
    _, slave = pty_pair
    attrs = termios.tcgetattr(slave)
    attrs[3] |= termios.ECHO | termios.ICANON | termios.ISIG
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    original = termios.tcgetattr(slave)

    terminal = RawTerminal(slave)
    assert terminal.enter() is True
    raw = termios.tcgetattr(slave)
    assert not raw[3] & termios.ECHO
    assert not raw[3] & termios.ICANON
    assert not raw[3] & termios.ISIG        # Ctrl-C goes to the guest
    assert not raw[0] & termios.ICRNL
    assert not raw[1] & termios.OPOST       # bytes pass exactly
    assert raw[6][termios.VMIN] == 1

    terminal.restore()
    assert termios.tcgetattr(slave) == original


def test_restore_is_idempotent(pty_pair):
    _, slave = pty_pair
    original = termios.tcgetattr(slave)
    terminal = RawTerminal(slave)
    terminal.restore()                       # before enter(): nothing to do
    assert termios.tcgetattr(slave) == original
    terminal.enter()
    terminal.restore()
    assert termios.tcgetattr(slave) == original
    # The user changes the terminal afterwards: a second restore (atexit, a
    # signal handler) must not put back the old state over it.
    changed = termios.tcgetattr(slave)
    changed[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, changed)
    terminal.restore()
    assert termios.tcgetattr(slave) == changed


def test_cooked_output_keeps_newline_translation(pty_pair):
    master, slave = pty_pair
    with RawTerminal(slave, cooked_output=True):
        attrs = termios.tcgetattr(slave)
        assert not attrs[3] & termios.ECHO and not attrs[3] & termios.ICANON
        assert attrs[1] & termios.OPOST and attrs[1] & termios.ONLCR
        os.write(slave, b"a\nb")
        assert os.read(master, 100) == b"a\r\nb"


def test_raw_output_passes_newlines_as_is(pty_pair):
    master, slave = pty_pair
    original = termios.tcgetattr(slave)
    with RawTerminal(slave):
        os.write(slave, b"a\nb")
        assert os.read(master, 100) == b"a\nb"
        os.write(master, b"x\r")             # no echo, no line buffering, no CR->NL
        assert os.read(slave, 100) == b"x\r"
    assert termios.tcgetattr(slave) == original


def test_a_closed_terminal_does_not_break_restore():
    master, slave = os.openpty()
    terminal = RawTerminal(slave)
    assert terminal.enter()
    os.close(master)
    os.close(slave)
    terminal.restore()  # the fd is gone: no exception


def test_non_tty_is_left_alone():
    read_end, write_end = os.pipe()
    try:
        terminal = RawTerminal(read_end)
        assert terminal.enter() is False
        terminal.restore()
        with RawTerminal(write_end) as t:
            assert t.fd == write_end
    finally:
        os.close(read_end)
        os.close(write_end)
