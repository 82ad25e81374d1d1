"""ConsoleHistory: the guest's recent console lines for failure reports, and
the panic watch, fed in arbitrary chunks as the UART/virtio backends deliver."""

from __future__ import annotations

import threading

from microvmm.console_log import ConsoleHistory

PANIC = "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"


def test_lines_split_across_chunks():
    history = ConsoleHistory()
    for chunk in (b"Linux ver", b"sion 6.1\nCommand", b" line: quiet\n", b"\n", b"partial"):
        history.feed(chunk)
    assert history.lines() == ["Linux version 6.1", "Command line: quiet", "", "partial"]
    history.feed(b" prompt# ")
    assert history.lines()[-1] == "partial prompt# "


def test_byte_at_a_time():
    history = ConsoleHistory()
    for byte in b"one\r\ntwo\r\n":
        history.feed(bytes([byte]))
    assert history.lines() == ["one", "two"]


def test_crlf_including_a_split_pair():
    history = ConsoleHistory()
    history.feed(b"a\r\nb\r")
    history.feed(b"\nc\r\n")
    assert history.lines() == ["a", "b", "c"]
    # A lone \r inside a line (progress output) is kept; only the line end is trimmed.
    history.feed(b"10%\r20%\r\n")
    assert history.lines()[-1] == "10%\r20%"


def test_keeps_only_the_last_lines():
    history = ConsoleHistory(max_lines=5)
    history.feed(b"".join(b"line %d\n" % i for i in range(100)))
    assert history.lines() == [f"line {i}" for i in range(95, 100)]


def test_a_line_without_newline_does_not_grow_without_bound():
    history = ConsoleHistory(max_lines=10)
    chunk = b"x" * 1000
    for _ in range(2000):  # 2 MB, never a newline
        history.feed(chunk)
    lines = history.lines()
    assert sum(map(len, lines)) <= 11 * (4096 + len(chunk))
    assert len(lines) <= 11
    assert set("".join(lines)) == {"x"}
    # and the next real line still comes out as one line
    history.feed(b"\nafter\n")
    assert history.lines()[-1] == "after"


def test_invalid_utf8_is_replaced_not_raised():
    history = ConsoleHistory()
    history.feed(b"caf\xc3\xa9 \xff\xfe\n")
    assert history.lines() == ["caf\u00e9 \ufffd\ufffd"]


def test_panic_callback_fires_once_with_the_line():
    seen: list[str] = []
    history = ConsoleHistory(on_panic=seen.append)
    history.feed(b"[    1.234] Kernel pa")
    assert seen == [] and history.panic_line is None  # not until the line is complete
    history.feed(b"nic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n")
    expected = "[    1.234] " + PANIC
    assert seen == [expected]
    assert history.panic_line == expected
    history.feed(b"[    1.235] Kernel panic - not syncing: again\n")
    history.feed(b"---[ end Kernel panic - not syncing: VFS ]---\n")
    assert seen == [expected]
    assert history.panic_line == expected


def test_no_panic_for_ordinary_output():
    seen: list[str] = []
    history = ConsoleHistory(on_panic=seen.append)
    history.feed(b"panic=-1 reboot=k\nKernel command line: panic=-1\nKernel panic test skipped\n")
    assert seen == [] and history.panic_line is None


def test_concurrent_feeders_lose_no_lines():
    history = ConsoleHistory(max_lines=10000)

    def feed(tag: str) -> None:
        for i in range(500):
            history.feed(f"{tag}{i}\n".encode())

    threads = [threading.Thread(target=feed, args=(tag,)) for tag in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = history.lines()
    assert sorted(lines) == sorted(f"{tag}{i}" for tag in "abcd" for i in range(500))
