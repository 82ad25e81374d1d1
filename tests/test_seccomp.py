"""microvmm.host.seccomp: the opt-in system call filter, installed in child processes
(a filter cannot be removed), checked by what the kernel then allows and refuses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from microvmm.host import seccomp
from microvmm.host.seccomp import ALLOWED_SYSCALLS, SYSCALL_NUMBERS, FilterAction, SeccompError, build_filter

REPO = Path(__file__).resolve().parent.parent
UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")

ok, why = seccomp.supported()
needs_seccomp = pytest.mark.skipif(not ok, reason=why or "seccomp unsupported")


def run_filtered(body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run Python code in a child; it prints one 'name: result' line per check."""
    code = textwrap.dedent("""
        import ctypes, errno, os, socket, sys, threading
        from microvmm.host import seccomp

        def check(name, function):
            try:
                function()
            except OSError as exc:
                print(f"{name}: {errno.errorcode.get(exc.errno, exc.errno)}", flush=True)
            else:
                print(f"{name}: ok", flush=True)
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def results(proc: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)


def test_syscall_numbers_match_the_kernel_headers():
    if not UNISTD_64.is_file():
        pytest.skip(f"{UNISTD_64} not installed (linux-libc-dev)")
    header = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD_64.read_text()))
    wrong = {name: (number, header.get(name)) for name, number in SYSCALL_NUMBERS.items()
             if header.get(name) != str(number)}
    assert not wrong, wrong


def test_allowed_list_excludes_the_dangerous_calls():
    assert ALLOWED_SYSCALLS <= SYSCALL_NUMBERS.keys()
    for name in ("execve", "execveat", "ptrace", "socket", "connect", "bind", "fork", "vfork", "kill",
                 "process_vm_writev", "mount", "chmod", "rename", "mkdir", "symlink", "link", "bpf",
                 "memfd_create", "prctl", "seccomp", "setuid", "chroot", "unshare", "setns", "open",
                 "openat", "clone", "clone3"):
        assert name not in ALLOWED_SYSCALLS, name


def test_build_filter_refuses_unknown_names_and_fits_bpf():
    with pytest.raises(SeccompError, match="frobnicate"):
        build_filter(["read", "frobnicate"])
    program = build_filter()
    assert 10 < len(program) < 4096
    assert program[-1] == (0x06, 0, 0, 0x00050000 | 1)  # default: RET ERRNO(EPERM)
    assert build_filter(action=FilterAction.KILL)[-1] == (0x06, 0, 0, 0x80000000)


@needs_seccomp
def test_after_install_allowed_calls_work_and_forbidden_ones_get_eperm(tmp_path):
    existing = tmp_path / "existing"
    existing.write_text("data")
    proc = run_filtered(f"""
        r, w = os.pipe()
        seccomp.install_filter()
        with open("/proc/self/status") as status:
            print("mode:", next(l.split()[1] for l in status if l.startswith("Seccomp:")), flush=True)
        check("pipe-io", lambda: (os.write(w, b"x"), os.read(r, 1)))
        check("read-existing", lambda: open({str(existing)!r}).read())
        check("getpid", os.getpid)
        def thread():
            t = threading.Thread(target=lambda: None); t.start(); t.join()
        check("thread", thread)
        check("socket-unix", lambda: socket.socket(socket.AF_UNIX))
        check("socket-inet", lambda: socket.socket(socket.AF_INET))
        check("open-new", lambda: open({str(tmp_path / "new")!r}, "w"))
        check("open-append", lambda: open({str(existing)!r}, "a"))
        check("execve", lambda: os.execv("/bin/true", ["true"]))
        check("fork", os.fork)
        libc = ctypes.CDLL(None, use_errno=True)
        def ptrace():
            if libc.syscall(101, 0, 0, 0, 0) != 0:  # PTRACE_TRACEME
                raise OSError(ctypes.get_errno(), "ptrace")
        check("ptrace", ptrace)
    """)
    assert proc.returncode == 0, proc.stderr
    got = results(proc)
    assert got["mode"] == "2"  # SECCOMP_MODE_FILTER
    for name in ("pipe-io", "read-existing", "getpid", "thread"):
        assert got[name] == "ok", (name, got)
    for name in ("socket-unix", "socket-inet", "open-new", "open-append", "execve", "fork", "ptrace"):
        assert got[name] == "EPERM", (name, got)
    assert not (tmp_path / "new").exists()
    assert existing.read_text() == "data"


@needs_seccomp
def test_without_the_filter_the_same_calls_succeed():
    """The control: the refusals above come from the filter, not from the sandbox."""
    proc = run_filtered("""
        check("socket-inet", lambda: socket.socket(socket.AF_INET))
        libc = ctypes.CDLL(None, use_errno=True)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if libc.syscall(101, 0, 0, 0, 0) == 0 else 1)
        print("ptrace-in-child:", "ok" if os.waitpid(pid, 0)[1] == 0 else "failed", flush=True)
    """)
    got = results(proc)
    assert got == {"socket-inet": "ok", "ptrace-in-child": "ok"}, proc.stderr


@needs_seccomp
def test_extra_allowed_and_write_open(tmp_path):
    proc = run_filtered(f"""
        seccomp.install_filter(extra_allowed=("socket", "connect"), allow_write_open=True)
        check("socket-unix", lambda: socket.socket(socket.AF_UNIX))
        check("open-new", lambda: open({str(tmp_path / "new")!r}, "w").write("x"))
        check("execve", lambda: os.execv("/bin/true", ["true"]))
    """)
    assert results(proc) == {"socket-unix": "ok", "open-new": "ok", "execve": "EPERM"}, proc.stderr
    assert (tmp_path / "new").read_text() == "x"


@needs_seccomp
def test_kill_mode_kills_the_process_on_a_forbidden_call():
    proc = run_filtered("""
        seccomp.install_filter(action=seccomp.FilterAction.KILL)
        print("installed: ok", flush=True)
        socket.socket(socket.AF_INET)
        print("survived: yes", flush=True)
    """)
    assert proc.returncode == -signal.SIGSYS, (proc.returncode, proc.stderr)
    assert results(proc) == {"installed": "ok"}


@needs_seccomp
def test_filter_covers_threads_started_before_install():
    """TSYNC: the I/O and vCPU threads already run when the filter goes in."""
    proc = run_filtered("""
        import time
        go, done = threading.Event(), threading.Event()
        def worker():
            go.wait()
            check("socket-from-old-thread", lambda: socket.socket(socket.AF_INET))
            done.set()
        threading.Thread(target=worker).start()
        seccomp.install_filter()
        go.set(); done.wait(10)
    """)
    assert results(proc) == {"socket-from-old-thread": "EPERM"}, proc.stderr


# ------------------------------------------------------------------ a real VMM under the filter

VMM_UNDER_FILTER = """
import sys
from microvmm import vmm
from microvmm.host import seccomp
action = seccomp.FilterAction(sys.argv.pop(1))
original_wait = vmm.Vmm._wait
def filtered_wait(self):
    # where the lead's --seccomp wiring goes: setup done, vCPUs started
    seccomp.install_filter(action=action)
    print("microvmm-test: seccomp filter installed", file=sys.stderr, flush=True)
    original_wait(self)
vmm.Vmm._wait = filtered_wait
from microvmm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@needs_seccomp
@pytest.mark.parametrize("action", [FilterAction.ERRNO, FilterAction.KILL], ids=lambda a: a.value)
def test_real_vmm_runs_and_stops_cleanly_under_the_filter(tmp_path, action):
    """KILL makes any call missing from the list fatal (SIGSYS): the list is complete
    for booting, console ports, a socket peer, a SIGUSR1 report and a signal stop."""
    from tests.e2e_support import IMAGES, require_images, require_kvm
    import socket
    require_kvm()
    require_images()
    sock = tmp_path / "s.sock"
    log = tmp_path / "f.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", VMM_UNDER_FILTER, action.value, "run", "--kernel", str(IMAGES / "vmlinux"),
         "--initrd", str(IMAGES / "initramfs.cpio"), "--serial", "stdio", "--timeout", "120",
         "--console", f"socket:s={sock}:server", "--console", "pty:p", "--console", f"file:f={log}"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        output = bytearray()  # stderr: the VMM's messages and, with --serial stdio, the kernel's log

        def read_output() -> None:
            while chunk := proc.stderr.read1(65536):
                output.extend(chunk)
        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
        # the guest boots under the filter until its first kernel log output (~10 s here)
        deadline = time.monotonic() + 120
        while b"Linux version" not in output and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, output.decode(errors="replace")
        assert b"Linux version" in output, "no kernel log from the guest under the filter"
        # a socket peer comes and goes (accept4, recv, close), a vCPU report (SIGUSR1)
        peer = socket.socket(socket.AF_UNIX)
        peer.connect(str(sock))
        peer.sendall(b"hello")
        time.sleep(0.5)
        peer.close()
        os.kill(proc.pid, signal.SIGUSR1)
        # the report comes from the VMM's own threads: wait for it rather than
        # a fixed time (under QEMU TCG, in the real-KVM lane, 2 s was too short)
        deadline = time.monotonic() + 60
        while b"vCPU 0: RIP" not in output and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
        reader.join(5)
        err = bytes(output)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    err = err.decode(errors="replace")
    assert "seccomp filter installed" in err
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "Operation not permitted" not in err, err[-3000:]
    assert re.search(r"vCPU 0: RIP 0x[0-9a-f]+", err), err[-3000:]  # the SIGUSR1 report, with capstone
    assert not sock.exists(), "the socket file was not removed under the filter"
