"""pytest plugin: boot microvmm guests from tests and run commands in them.

Loaded through the `pytest11` entry point of the installed package. It adds

* options `--microvmm-kernel PATH`, `--microvmm-initrd PATH` (default: the
  default images, see `microvmm.cli.default_images_dir`), `--microvmm-arg ARG`
  (repeatable: extra `microvmm run` arguments for every VM) and
  `--microvmm-boot-timeout SECONDS`;
* the factory fixtures `microvm` (VMs live for one test), `microvm_module`
  and `microvm_session` (VMs live for the module / session; a second call
  with the same arguments returns the VM already booted):

      def test_driver(microvm):
          vm = microvm(ports=["data"], mem="64M")
          status, out, err = vm.run("cat /sys/class/virtio-ports/*/name")
          vm.port("data").write(b"ping\\n")
          vm.port("data").expect(rb"pong", timeout=30)

* the guest's console log (and microvmm's own output) as a report section of
  every failing test that used one of the fixtures.

A VM is a `microvmm run` child process. Its serial console goes to a log
file; the virtio-console ports `microvmm.agent`, `microvmm.stdout`,
`microvmm.stderr` and the test's own ports are unix socket servers this
plugin connects to. The default initramfs then starts an agent that runs the
commands sent on `microvmm.agent` (protocol: guest/README.md, "Running
commands"); a user's own initramfs can do the same.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pytest

logger = logging.getLogger(__name__)

AGENT_PORT = "microvmm.agent"
STDOUT_PORT = "microvmm.stdout"
STDERR_PORT = "microvmm.stderr"
AGENT_PROTOCOL = "1"
RESERVED_PORTS = frozenset({AGENT_PORT, STDOUT_PORT, STDERR_PORT, "microvmm.status"})

# A boot takes about a minute on an emulating KVM and well under a second on
# hardware KVM; the default bound only stops a hung boot.
DEFAULT_BOOT_TIMEOUT = 600.0
DEFAULT_COMMAND_TIMEOUT = 120.0
# A report section shows at most this much of the console log (the end of it).
REPORT_LOG_LIMIT = 64 * 1024
_PORT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class MicroVMError(Exception):
    """A VM could not be booted or used; the message carries the console's last lines."""


class MicroVMTimeout(MicroVMError, AssertionError):
    """Something expected from the guest did not come in time (a test failure, not an error)."""


class AgentError(MicroVMError):
    """The guest's agent refused a request or broke the protocol."""


def end_marker(nonce: str) -> bytes:
    """What the agent writes on both output ports after each command (guest/README.md)."""
    return b"\n\x1eMVMEND:" + nonce.encode() + b"\x1e\n"


def encode_request(request_id: int, nonce: str, command: str | bytes) -> bytes:
    """One request for the agent: `<id> <nonce>\n<command>\0` (guest/README.md)."""
    raw = command.encode() if isinstance(command, str) else command
    if b"\0" in raw:
        raise ValueError("a shell command cannot contain a NUL byte")
    if not re.fullmatch(r"[0-9A-Za-z]+", nonce):
        raise ValueError(f"bad nonce {nonce!r}")
    return f"{request_id} {nonce}\n".encode() + raw + b"\0"


class CommandResult(NamedTuple):
    """A command's exit status and its output, byte-exact (str when run with text=True)."""
    status: int
    stdout: bytes | str
    stderr: bytes | str


# --------------------------------------------------------------------------- host ends of ports


class PortChannel:
    """The host end of one guest port: a reader thread collects what the guest
    sends; `expect` and `take_through` consume it, `write` sends to the guest.

    Works on any pollable fd (a connected unix socket; a pty master or pipe in
    tests). `check`, if given, is called while waiting and raises when waiting
    is pointless (the VM is gone).
    """

    def __init__(self, name: str, read_fd: int, write_fd: int | None = None,
                 check: Callable[[], None] | None = None, on_close: Callable[[], None] | None = None):
        self.name = name
        self._read_fd = read_fd
        self._write_fd = read_fd if write_fd is None else write_fd
        self._check = check
        self._on_close = on_close
        self._data = bytearray()
        self._cursor = 0            # expect() searches from here
        self._received = 0          # bytes ever received (the buffer is trimmed)
        self._cond = threading.Condition()
        self._stopping = False
        self.eof = False
        for fd in {self._read_fd, self._write_fd}:
            os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._pump, name=f"microvm-port-{name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stopping:
            try:
                readable, _, _ = select.select([self._read_fd], [], [], 0.2)
            except (OSError, ValueError):  # fd closed under us: we are closing
                break
            if not readable:
                continue
            try:
                chunk = os.read(self._read_fd, 65536)
            except BlockingIOError:
                continue
            except OSError:  # EIO from a pty master whose slave is gone: end of data
                chunk = b""
            with self._cond:
                if not chunk:
                    self.eof = True
                    self._cond.notify_all()
                    return
                self._data += chunk
                self._received += len(chunk)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    # -- reading

    @property
    def data(self) -> bytes:
        """Everything received and not yet consumed by take_through()."""
        with self._cond:
            return bytes(self._data)

    def _wait(self, found: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = found()
                if result is not None:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof:
                    tail = bytes(self._data[-500:])
                    why = "the port's host end was closed" if self.eof else f"nothing after {timeout:g} s"
                    raise MicroVMTimeout(f"port {self.name}: {why} waiting for {what}; "
                                         f"last bytes received: {tail!r}")
                self._cond.wait(min(remaining, 0.5))
                if self._check is not None:
                    self._cond.release()
                    try:
                        self._check()
                    finally:
                        self._cond.acquire()

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float = 60.0) -> re.Match:
        """Wait for `pattern` (a regex; str is matched as UTF-8) in what the guest sent
        after the previous match; return the match (over bytes)."""
        if isinstance(pattern, re.Pattern):
            regex = pattern if isinstance(pattern.pattern, bytes) else re.compile(
                pattern.pattern.encode(), pattern.flags & ~re.UNICODE)
        else:
            regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)

        def search() -> re.Match | None:
            match = regex.search(self._data, self._cursor)
            if match:
                self._cursor = match.end()
            return match
        return self._wait(search, timeout, f"{regex.pattern!r}")

    def take_through(self, marker: bytes, timeout: float) -> bytes:
        """Wait for `marker`; remove everything up to and including it from the
        buffer and return what came before it."""
        def search() -> bytes | None:
            index = self._data.find(marker)
            if index < 0:
                return None
            before = bytes(self._data[:index])
            del self._data[:index + len(marker)]
            self._cursor = max(0, self._cursor - index - len(marker))
            return before
        return self._wait(search, timeout, f"the end marker {marker!r}")

    def read_line(self, timeout: float) -> bytes:
        """The next whole line (without its newline), consumed."""
        return self.take_through(b"\n", timeout)

    # -- writing

    def write(self, data: bytes | str, timeout: float = 60.0) -> None:
        """Send all of `data` to the guest (the VMM passes it on once the guest reads)."""
        view = memoryview(data.encode() if isinstance(data, str) else data)
        deadline = time.monotonic() + timeout
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MicroVMTimeout(f"port {self.name}: could not send {len(view)} more bytes "
                                     f"within {timeout:g} s (the guest does not read)")
            _, writable, _ = select.select([], [self._write_fd], [], min(remaining, 0.5))
            if writable:
                try:
                    view = view[os.write(self._write_fd, view):]
                except BlockingIOError:
                    pass
            elif self._check is not None:
                self._check()

    def close(self) -> None:
        self._stopping = True
        self._thread.join(5)
        if self._on_close is not None:
            self._on_close()


class AgentClient:
    """Runs commands through the guest agent (guest/sbin/microvmm-agent)."""

    def __init__(self, agent: PortChannel, stdout: PortChannel, stderr: PortChannel):
        self.agent = agent
        self.stdout = stdout
        self.stderr = stderr
        self._next_id = 1
        self._lock = threading.Lock()
        self.broken: str | None = None  # why no further command can be run

    def wait_ready(self, timeout: float) -> None:
        line = self._next_line(timeout, "the agent's ready line")
        if line.startswith("error "):
            raise AgentError(f"guest agent: {line[6:]}")
        if line != f"ready {AGENT_PROTOCOL}":
            raise AgentError(f"guest agent: expected 'ready {AGENT_PROTOCOL}', got {line!r}")

    def _next_line(self, timeout: float, what: str) -> str:
        try:
            return self.agent.read_line(timeout).decode(errors="replace").rstrip("\r")
        except MicroVMTimeout as err:
            raise MicroVMTimeout(f"no {what}: {err}") from None

    def run(self, command: str, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> CommandResult:
        with self._lock:
            if self.broken:
                raise AgentError(f"the guest agent is not usable: {self.broken}")
            request_id, self._next_id = self._next_id, self._next_id + 1
            nonce = secrets.token_hex(8)
            deadline = time.monotonic() + timeout
            self.agent.write(encode_request(request_id, nonce, command), timeout)
            try:
                while True:
                    line = self._next_line(max(0.0, deadline - time.monotonic()),
                                           f"reply to command {command!r} within {timeout:g} s")
                    if line == f"ready {AGENT_PROTOCOL}":
                        continue  # an announcement after a reconnection, not our reply
                    break
                reply_id, _, rest = line.partition(" ")
                if reply_id != str(request_id):
                    raise AgentError(f"guest agent: reply {line!r} to request {request_id}")
                if rest.startswith("error "):
                    raise AgentError(f"guest agent refused {command!r}: {rest[6:]}")
                if not rest.isdigit():
                    raise AgentError(f"guest agent: bad reply {line!r}")
                marker = end_marker(nonce)
                stdout = self.stdout.take_through(marker, max(1.0, deadline - time.monotonic()))
                stderr = self.stderr.take_through(marker, max(1.0, deadline - time.monotonic()))
            except MicroVMTimeout as err:
                # The command may still run; its output would be taken for the next one's.
                self.broken = f"command {command!r} did not finish within {timeout:g} s"
                raise MicroVMTimeout(str(err)) from None
            except AgentError as err:
                self.broken = str(err)
                raise
            return CommandResult(int(rest), stdout, stderr)

    def send_poweroff(self) -> None:
        """Ask the guest to power off; no reply comes (the VM ends)."""
        with self._lock:
            request_id, self._next_id = self._next_id, self._next_id + 1
            self.broken = "the VM is powering off"
            # /sbin/poweroff itself (sync, poweroff -f), not the applet, which
            # signals PID 1 and has it exec /sbin/poweroff: one process less.
            self.agent.write(encode_request(request_id, secrets.token_hex(8), "exec /sbin/poweroff"), 10)


# --------------------------------------------------------------------------- the VM


@dataclass(frozen=True)
class VmSpec:
    """Everything that makes two VMs interchangeable (the factories' cache key)."""
    kernel: Path
    initrd: Path | None
    ports: tuple[str, ...] = ()
    mem: str = "64M"
    cmdline_append: str = ""
    extra_args: tuple[str, ...] = ()


def kvm_unusable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    return None


class MicroVM:
    """A booted guest: `run` commands, talk to its `port`s, read its console `log`."""

    def __init__(self, spec: VmSpec, log_dir: Path, name: str = "vm"):
        self.spec = spec
        self.name = name
        self.log_path = log_dir / f"{name}-console.log"
        self.vmm_log_path = log_dir / f"{name}-microvmm.log"
        # Socket paths must fit sun_path (108 bytes): a short directory of our own.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="microvm-"))
        self._ports: dict[str, PortChannel] = {}
        self._sockets: list[socket.socket] = []
        self._agent: AgentClient | None = None
        self._guest_paths: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.closed = False

    # -- boot

    def command_line(self) -> list[str]:
        spec = self.spec
        args = [sys.executable, "-m", "microvmm", "run", "--kernel", str(spec.kernel),
                "--initrd", str(spec.initrd) if spec.initrd else "none",
                "--mem", spec.mem, "--serial", f"file:{self.log_path}"]
        for name, path in self._socket_paths().items():
            args += ["--console", f"socket:{name}={path}:server"]
        if spec.cmdline_append:
            args += ["--append", spec.cmdline_append]
        return args + list(spec.extra_args)

    def _socket_paths(self) -> dict[str, Path]:
        names = [AGENT_PORT, STDOUT_PORT, STDERR_PORT, *self.spec.ports]
        return {name: self._socket_dir / f"{index}.sock" for index, name in enumerate(names)}

    def boot(self, timeout: float = DEFAULT_BOOT_TIMEOUT) -> "MicroVM":
        for name in self.spec.ports:
            if not _PORT_NAME_RE.fullmatch(name) or name in RESERVED_PORTS:
                raise MicroVMError(f"bad port name {name!r}: letters, digits, '_.-', not one of "
                                   f"{sorted(RESERVED_PORTS)}")
        for path, what in ((self.spec.kernel, "kernel"), (self.spec.initrd, "initrd")):
            if path is not None and not path.is_file():
                raise MicroVMError(f"{what} {path} does not exist (`make images` builds the default "
                                   f"guest; or pass --microvmm-{what})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = self.command_line()
        logger.info("booting %s: %s", self.name, " ".join(args))
        with open(self.vmm_log_path, "wb") as vmm_log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=vmm_log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            for name, path in self._socket_paths().items():
                self._ports[name] = self._connect(name, path, deadline)
            self._agent = AgentClient(self._ports[AGENT_PORT], self._ports[STDOUT_PORT],
                                      self._ports[STDERR_PORT])
            try:
                self._agent.wait_ready(max(0.0, deadline - time.monotonic()))
            except MicroVMTimeout as err:
                raise MicroVMTimeout(f"{self.name} did not boot to its agent within {timeout:g} s "
                                     f"({err})\n{self.diagnostics()}") from None
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def _connect(self, name: str, path: Path, deadline: float) -> PortChannel:
        while True:
            self.check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise MicroVMTimeout(f"{self.name}: socket port {name} ({path}) not there in time\n"
                                         f"{self.diagnostics()}") from None
                time.sleep(0.05)
                continue
            self._sockets.append(sock)
            return PortChannel(name, sock.fileno(), check=self.check_alive,
                               on_close=lambda: _close_socket(sock))

    # -- state

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.exit_code = self.proc.returncode
            raise MicroVMError(f"{self.name}: microvmm exited with status {self.exit_code}\n"
                               f"{self.diagnostics()}")

    @property
    def log(self) -> str:
        """The serial console's output so far."""
        return _read_text(self.log_path)

    @property
    def vmm_output(self) -> str:
        """microvmm's own stdout/stderr (start-up notes, its summary, reports)."""
        return _read_text(self.vmm_log_path)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def diagnostics(self, lines: int = 30) -> str:
        console = "\n".join(self.log.splitlines()[-lines:])
        return (f"--- last console lines ({self.log_path}):\n{console}\n"
                f"--- microvmm output ({self.vmm_log_path}):\n{self.vmm_output[-3000:]}")

    @property
    def healthy(self) -> bool:
        return self.alive and not self.closed and self._agent is not None and not self._agent.broken

    # -- use

    def run(self, command: str, timeout: float = DEFAULT_COMMAND_TIMEOUT, text: bool = False) -> CommandResult:
        """Run a shell command in the guest (sh -c, stdin /dev/null); wait for it.

        Returns (status, stdout, stderr), the output byte-exact (decoded as
        UTF-8 with text=True). After a timeout the VM runs no more commands
        (the command may still be running in the guest).
        """
        if self._agent is None or self.closed:
            raise MicroVMError(f"{self.name} is not running")
        result = self._agent.run(command, timeout)
        if text:
            return CommandResult(result.status, result.stdout.decode(errors="replace"),
                                 result.stderr.decode(errors="replace"))
        return result

    def port(self, name: str) -> PortChannel:
        """The host end of the port `name` given in `ports=[...]`."""
        if name not in self.spec.ports:
            raise KeyError(f"{self.name} has no port {name!r} (its ports: {list(self.spec.ports)})")
        return self._ports[name]

    def vport(self, name: str) -> str:
        """The guest's device for the port `name`, e.g. '/dev/vport0p3'."""
        if name not in self._guest_paths:
            status, out, err = self.run(
                f"for d in /sys/class/virtio-ports/*; do "
                f"[ \"$(cat $d/name)\" = '{name}' ] && echo /dev/${{d##*/}}; done; true", text=True)
            path = out.strip()
            if status != 0 or not re.fullmatch(r"/dev/vport\d+p\d+", path):
                raise MicroVMError(f"{self.name}: the guest has no port named {name!r} ({out!r} {err!r})")
            self._guest_paths[name] = path
        return self._guest_paths[name]

    # -- end

    def poweroff(self, timeout: float = 120.0) -> int:
        """Power the guest off through its agent and wait for microvmm to end."""
        if self.alive and self._agent is not None and not self.closed:
            self._agent.send_poweroff()
            try:
                self.exit_code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise MicroVMTimeout(f"{self.name} did not power off within {timeout:g} s\n"
                                     f"{self.diagnostics()}") from None
        self.close()
        return self.exit_code

    def close(self, graceful: bool = True) -> None:
        """End the VM (power off when graceful and possible, else signals) and
        release everything: no process, socket or socket file stays behind."""
        if self.closed:
            return
        try:
            if graceful and self.alive and self._agent is not None and not self._agent.broken:
                try:
                    self._agent.send_poweroff()
                    self.exit_code = self.proc.wait(60)
                except (MicroVMError, OSError, subprocess.TimeoutExpired) as err:
                    logger.warning("%s: no clean power-off (%s); killing microvmm", self.name, err)
            self._kill()
        finally:
            self.closed = True
            for channel in self._ports.values():
                channel.close()
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.exit_code = self.proc.wait()
        # microvmm's session: nothing of it may outlive it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "MicroVM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running" if self.alive else "stopped"
        return f"<MicroVM {self.name} {state} ports={list(self.spec.ports)}>"


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- fixtures


@dataclass
class MicroVMFactory:
    """`factory(ports=..., mem=..., cmdline_append=..., extra_args=..., boot_timeout=...)`
    boots a VM (or returns the one it already booted with the same arguments)."""
    kernel: Path
    initrd: Path | None
    default_args: tuple[str, ...]
    boot_timeout: float
    log_dir: Path
    vms: list[MicroVM] = field(default_factory=list)
    _cache: dict[VmSpec, MicroVM] = field(default_factory=dict)

    def __call__(self, ports: list[str] | tuple[str, ...] = (), mem: str = "64M", cmdline_append: str = "",
                 extra_args: list[str] | tuple[str, ...] = (), boot_timeout: float | None = None) -> MicroVM:
        reason = kvm_unusable_reason()
        if reason:
            pytest.skip(reason)
        spec = VmSpec(self.kernel, self.initrd, tuple(ports), mem, cmdline_append,
                      self.default_args + tuple(extra_args))
        cached = self._cache.get(spec)
        if cached is not None and cached.healthy:
            return cached
        if cached is not None:
            cached.close(graceful=False)
        vm = MicroVM(spec, self.log_dir, name=f"vm{len(self.vms) + 1}")
        self.vms.append(vm)
        vm.boot(self.boot_timeout if boot_timeout is None else boot_timeout)
        self._cache[spec] = vm
        return vm

    def close_all(self) -> None:
        errors = []
        for vm in self.vms:
            try:
                vm.close()
            except Exception as err:  # close every VM before reporting
                errors.append(err)
        self._cache.clear()
        if errors:
            raise errors[0]


_ACTIVE_FACTORIES = pytest.StashKey[dict[str, MicroVMFactory]]()
_LOG_STARTS = pytest.StashKey[dict[int, int]]()
FIXTURE_NAMES = ("microvm", "microvm_module", "microvm_session")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("microvmm", "microvmm guests (the microvm fixtures)")
    group.addoption("--microvmm-kernel", metavar="PATH",
                    help="kernel to boot (bzImage or vmlinux; default: vmlinux of the default images)")
    group.addoption("--microvmm-initrd", metavar="PATH",
                    help="initramfs (default: initramfs.cpio of the default images; 'none' for none)")
    group.addoption("--microvmm-arg", metavar="ARG", action="append", default=[],
                    help="extra `microvmm run` argument for every VM (repeatable), "
                         "e.g. --microvmm-arg=--cpus=2")
    group.addoption("--microvmm-boot-timeout", metavar="SECONDS", type=float, default=DEFAULT_BOOT_TIMEOUT,
                    help=f"seconds a guest may take to boot to its agent (default {DEFAULT_BOOT_TIMEOUT:g})")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ACTIVE_FACTORIES] = {}


def _make_factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MicroVMFactory:
    from microvmm.cli import default_images_dir
    config = request.config
    images = default_images_dir()
    kernel = Path(config.getoption("microvmm_kernel") or images / "vmlinux")
    initrd_option = config.getoption("microvmm_initrd")
    initrd = (None if initrd_option == "none"
              else Path(initrd_option) if initrd_option else images / "initramfs.cpio")
    return MicroVMFactory(kernel=kernel, initrd=initrd,
                          default_args=tuple(config.getoption("microvmm_arg")),
                          boot_timeout=config.getoption("microvmm_boot_timeout"),
                          log_dir=tmp_path_factory.mktemp("microvm", numbered=True))


def _factory_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                     name: str) -> Iterator[MicroVMFactory]:
    factory = _make_factory(request, tmp_path_factory)
    active = request.config.stash[_ACTIVE_FACTORIES]
    active[name] = factory
    try:
        yield factory
    finally:
        try:
            factory.close_all()
        finally:
            active.pop(name, None)


@pytest.fixture
def microvm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroVMFactory]:
    """Factory of VMs that are powered off at the end of the test."""
    yield from _factory_fixture(request, tmp_path_factory, "microvm")


@pytest.fixture(scope="module")
def microvm_module(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroVMFactory]:
    """Factory of VMs shared by a module's tests (same arguments, same VM)."""
    yield from _factory_fixture(request, tmp_path_factory, "microvm_module")


@pytest.fixture(scope="session")
def microvm_session(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroVMFactory]:
    """Factory of VMs shared by the whole session (same arguments, same VM)."""
    yield from _factory_fixture(request, tmp_path_factory, "microvm_session")


# --------------------------------------------------------------------------- console logs in reports


def _vms_of(item: pytest.Item) -> list[MicroVM]:
    active = item.config.stash.get(_ACTIVE_FACTORIES, {})
    vms: list[MicroVM] = []
    for name in FIXTURE_NAMES:
        if name in getattr(item, "fixturenames", ()) and name in active:
            vms.extend(active[name].vms)
    return vms


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    # Where each already running VM's log stands: a shared VM's report shows
    # what this test added, not the whole session's console.
    item.stash[_LOG_STARTS] = {id(vm): vm.log_size() for vm in _vms_of(item)}
    yield


def console_report_sections(item: pytest.Item) -> list[tuple[str, str]]:
    """(title, text) of the console log of every VM the test used (from where the test began)."""
    starts = item.stash.get(_LOG_STARTS, {})
    sections = []
    for vm in _vms_of(item):
        start = starts.get(id(vm), 0)
        try:
            with open(vm.log_path, "rb") as log:
                log.seek(start)
                data = log.read()
        except OSError:
            data = b""
        if start and not data:
            continue  # a shared VM this test did not make say anything
        if len(data) > REPORT_LOG_LIMIT:
            data = b"[... earlier output cut ...]\n" + data[-REPORT_LOG_LIMIT:]
        text = data.decode(errors="replace")
        where = " since the test began" if start else ""
        sections.append((f"microvm console log {vm.name}{where} ({vm.log_path})", text))
        if not vm.alive and vm.vmm_output:
            sections.append((f"microvm microvmm output {vm.name} ({vm.vmm_log_path})",
                             vm.vmm_output[-REPORT_LOG_LIMIT:]))
    return sections


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.extend(console_report_sections(item))
