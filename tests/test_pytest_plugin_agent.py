"""The guest agent script (microvmm/guestbuild/guest/initramfs/sbin/microvmm-agent) and the
plugin's host side of its protocol, on this host: busybox sh runs the real
script with a pty standing in for the agent port and FIFOs for the output
ports (a fake sysfs names them). Fast; the same path runs in the real guest
in test_pytest_plugin.py."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import tty
from pathlib import Path

import pytest

from microvmm.testing.agent import AgentClient, CommandResult, encode_request, end_marker
from microvmm.testing.channels import PortChannel
from microvmm.testing.errors import AgentError

REPO = Path(__file__).resolve().parent.parent
INITRAMFS = REPO / "microvmm" / "guestbuild" / "guest" / "initramfs"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


class FakeGuest:
    """The agent script on this host, its ports wired to our ends."""

    def __init__(self, root: Path, ports: tuple[str, ...] = ("microvmm.agent", "microvmm.stdout",
                                                            "microvmm.stderr")):
        sysfs, dev = root / "sys", root / "dev"
        sysfs.mkdir()
        dev.mkdir()
        self.master, slave = pty.openpty()
        tty.setraw(slave)  # a port passes bytes as they are
        self._slave = slave
        self.channels: dict[str, PortChannel] = {}
        for index, name in enumerate(ports):
            (sysfs / f"vport0p{index}").mkdir()
            (sysfs / f"vport0p{index}" / "name").write_text(name + "\n")
            node = dev / f"vport0p{index}"
            if name == "microvmm.agent":
                node.symlink_to(os.ttyname(slave))
            else:
                os.mkfifo(node)
                fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
                self.channels[name] = PortChannel(name, fd, on_close=lambda fd=fd: os.close(fd))
        self.channels["microvmm.agent"] = PortChannel("microvmm.agent", self.master)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MICROVMM_LIB": str(INITRAMFS / "lib/microvmm"),
               "MICROVMM_VPORTS_SYSFS": str(sysfs), "MICROVMM_VPORTS_DEV": str(dev)}
        agent_dev = dev / f"vport0p{ports.index('microvmm.agent')}"
        self.proc = subprocess.Popen([BUSYBOX, "sh", str(INITRAMFS / "sbin/microvmm-agent"), str(agent_dev)],
                                     env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def client(self) -> AgentClient:
        return AgentClient(self.channels["microvmm.agent"], self.channels["microvmm.stdout"],
                           self.channels["microvmm.stderr"])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stderr.close()
        for channel in self.channels.values():
            channel.close()
        os.close(self._slave)
        os.close(self.master)


@pytest.fixture
def guest(tmp_path):
    if not os.access(BUSYBOX, os.X_OK):
        pytest.skip("no busybox on this host to run the guest's agent script")
    fake = FakeGuest(tmp_path)
    yield fake
    fake.close()


@pytest.fixture
def agent(guest) -> AgentClient:
    client = guest.client()
    client.wait_ready(10)
    return client


@pytest.mark.parametrize("command, expected", [
    ("echo hi", CommandResult(0, b"hi\n", b"")),
    ("printf 'no newline'", CommandResult(0, b"no newline", b"")),
    ("echo err >&2; exit 3", CommandResult(3, b"", b"err\n")),
    ("printf '\\000\\001\\n\\r\\036\\377'; printf '\\n\\n' >&2", CommandResult(0, b"\0\1\n\r\x1e\xff", b"\n\n")),
    ("", CommandResult(0, b"", b"")),
    ("echo 'two\nlines' \"$((6 * 7))\"", CommandResult(0, b"two\nlines 42\n", b"")),
])
def test_outputs_and_status_come_back_exact(agent, command, expected):
    assert agent.run(command, timeout=10) == expected


def test_large_output_and_many_commands_stay_in_step(agent):
    out = agent.run("i=0; while [ $i -lt 1000 ]; do echo 123456789; i=$((i + 1)); done", 20)
    assert out == CommandResult(0, b"123456789\n" * 1000, b"")
    for i in range(20):
        assert agent.run(f"echo {i}; echo e{i} >&2; exit {i}", 10) == (i, f"{i}\n".encode(), f"e{i}\n".encode())


def test_output_cannot_fake_the_end_marker(agent):
    # a marker with another nonce, and the marker's pieces, are just output
    fake = end_marker("0123456789abcdef")
    command = "printf '" + "".join(f"\\{byte:03o}" for byte in fake) + "MVMEND:'"
    assert agent.run(command, 10) == (0, fake + b"MVMEND:", b"")


def test_command_sees_neither_agent_port_nor_nonce(agent):
    status, out, err = agent.run('echo "[$nonce]"; echo x >&3', 10)
    assert out == b"[]\n"
    assert status != 0 and err  # fd 3 is closed in the command


def test_stdin_is_dev_null_and_syntax_errors_fail(agent):
    assert agent.run("cat; echo rc=$?", 10) == (0, b"rc=0\n", b"")
    status, out, err = agent.run("if then fi", 10)
    assert status == 2 and out == b"" and b"syntax error" in err
    assert agent.run("echo still here", 10).stdout == b"still here\n"


def test_bad_requests_are_refused_and_the_agent_goes_on(guest, agent):
    port = guest.channels["microvmm.agent"]
    port.write(b"x1 abc\necho no\0")
    assert port.read_line(10) == b"x1 error bad request id"
    port.write(b"7 no-nonce!\necho no\0")
    assert port.read_line(10) == b"7 error bad nonce"
    assert agent.run("echo ok", 10) == (0, b"ok\n", b"")


def test_out_of_step_replies_disable_the_client(guest, agent):
    # someone else's request on the port: its reply is not ours
    guest.channels["microvmm.agent"].write(encode_request(99, "abc", "true"))
    with pytest.raises(AgentError, match="reply '99 0' to request 1"):
        agent.run("echo 1", 10)
    with pytest.raises(AgentError, match="not usable"):
        agent.run("echo 2", 10)


def test_missing_output_port_is_reported_to_the_host(tmp_path):
    if not os.access(BUSYBOX, os.X_OK):
        pytest.skip("no busybox on this host")
    fake = FakeGuest(tmp_path, ports=("microvmm.agent", "microvmm.stderr"))
    try:
        assert fake.channels["microvmm.agent"].read_line(10) == b"error no virtio port named microvmm.stdout"
        assert fake.proc.wait(10) == 1
    finally:
        fake.close()


def test_request_encoding():
    assert encode_request(5, "ab12", "echo 'a b'\n") == b"5 ab12\necho 'a b'\n\0"
    with pytest.raises(ValueError):
        encode_request(1, "ab", "printf '\0'")
    with pytest.raises(ValueError):
        encode_request(1, "a b", "true")
