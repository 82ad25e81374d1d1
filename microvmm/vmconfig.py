"""What to run: the validated configuration the CLI hands to the VMM."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from microvmm.host.hostinfo import merge_cmdline
from microvmm.run.monitor import FailureLevel

if TYPE_CHECKING:
    from microvmm.devmgr.registry import DeviceRequest
    from microvmm.initramfs.guestfiles import AddedEntry
    from microvmm.initramfs.guestmodules import ModuleFile
    from microvmm.virtio_console.spec import PortSpec


# `-- CMD` runs: the command travels on the kernel command line (guest/README.md).
COMMAND_PARAM = "microvmm.cmd"
#: The longest command line x86 Linux keeps (COMMAND_LINE_SIZE 2048 with its
#: NUL); a bzImage's setup header may say less (checked when it is loaded).
KERNEL_CMDLINE_MAX = 2047


def command_parameter(argv: list[str]) -> str:
    """base64 of the shell-quoted command: no spaces or quotes on the command line."""
    import base64  # deferred: only `-- CMD` runs need them (issue 6)
    import shlex
    return base64.b64encode(shlex.join(argv).encode()).decode()


#: A `-- CMD` goes on the command line too only up to this length in all
#: (it always travels in the initramfs: run/command.COMMAND_FILE).
COMMAND_PARAM_CMDLINE_LIMIT = 1536


def kernel_cmdline(cmdline: str, additions: tuple[str, ...], command: list[str] | None, *,
                   kaslr: bool = False) -> str:
    """The command line the guest kernel gets: the user's, then the additions
    (the kernel's console, host workarounds) the user did not set, `nokaslr`
    unless `kaslr` (--kaslr), then a `-- CMD` run's command as microvmm.cmd=
    if the whole stays within COMMAND_PARAM_CMDLINE_LIMIT (the command of any
    length is in the initramfs)."""
    if not kaslr:
        # A randomized kernel runs at addresses System.map does not list:
        # symbolized RIPs and --profile would name the wrong functions.
        additions = (*additions, "nokaslr")
    merged = merge_cmdline(cmdline, additions)
    if command is not None:
        with_command = merge_cmdline(merged, (f"{COMMAND_PARAM}={command_parameter(command)}",))
        if len(with_command.encode()) <= COMMAND_PARAM_CMDLINE_LIMIT:
            return with_command
    return merged


def console_ports(first_ports: list["PortSpec"], devices: tuple["DeviceRequest", ...]) -> list["PortSpec"]:
    """Every console port of the run: the first device's, then each further
    virtio-console device's, in device order."""
    return list(first_ports) + [port for request in devices if request.kind == "virtio-console"
                                for port in request.options]


#: --serial's forms, as `microvmm run --help` and the error say them.
SERIAL_SYNTAX = "stdio, pty, file:PATH, tty:PATH, socket:PATH:server, socket:PATH:client or off"


@dataclass(frozen=True)
class SerialConfig:
    """Where COM1 goes: 'stdio', 'off', 'pty', or a backend with a path:
    'file', 'tty', 'socket' (with `socket_mode` 'server' or 'client')."""

    kind: str
    path: Path | None = None
    socket_mode: str | None = None

    @property
    def text(self) -> str:
        """As the user wrote it (for messages)."""
        parts = [self.kind] + ([str(self.path)] if self.path is not None else [])
        return ":".join(parts + ([self.socket_mode] if self.socket_mode else []))

    @classmethod
    def parse(cls, text: str) -> "SerialConfig":
        if text in ("stdio", "off", "pty"):
            return cls(text)
        kind, _, rest = text.partition(":")
        if kind in ("file", "tty") and rest:
            return cls(kind, Path(rest))
        if kind == "socket":
            path, _, mode = rest.rpartition(":")
            if path and mode in ("server", "client"):
                return cls(kind, Path(path), mode)
            raise ValueError(f"--serial {text!r}: a socket needs a path and ':server' or ':client', "
                             "e.g. socket:/tmp/serial.sock:server")
        raise ValueError(f"--serial {text!r}: expected {SERIAL_SYNTAX}")


@dataclass
class VmConfig:
    """Everything `microvmm run` was asked for, validated by the CLI."""

    kernel: Path
    initrd: Path | None
    cmdline: str
    #: True when microvmm chooses the kernel's console (no --cmdline): the
    #: VMM adds console= (run/kernel_log.plan_kernel_console).
    default_console: bool = False
    mem_size: int = 64 << 20
    cpus: int = 1
    serial: SerialConfig = field(default_factory=lambda: SerialConfig("stdio"))
    #: The first virtio-console's ports: --console and the first --device virtio-console.
    ports: list["PortSpec"] = field(default_factory=list)
    #: Further --device requests, each a PCI device of its own (a second
    #: virtio-console, virtio-rng, ...), in command-line order.
    devices: tuple["DeviceRequest", ...] = ()
    queue_size: int = 64
    system_map: Path | None = None
    timeout: float | None = None
    host_workarounds: bool = True
    #: `-- CMD ARGS`: run this in the guest and exit with its status.
    command: list[str] | None = None
    boot_timeout: float | None = None
    idle_timeout: float | None = None
    fail_on: FailureLevel = FailureLevel.OOPS
    expect: str | None = None
    expect_port: str | None = None
    log: Path | None = None
    junit: Path | None = None
    json: Path | None = None
    profile: Path | None = None
    profile_rate: float = 100.0
    stats: bool = False
    #: "off", or the seccomp filter action for disallowed system calls.
    seccomp: str = "off"
    #: `--modules`: kernel modules, in load order, appended to the initramfs
    #: as a second archive that the default /init loads first.
    initrd_modules: tuple["ModuleFile", ...] = ()
    #: `--kaslr`: keep the kernel's address randomization; otherwise `nokaslr`
    #: is added so System.map addresses (diagnostics, --profile) are the
    #: running kernel's.
    kaslr: bool = False
    #: `--add HOST[:GUEST]`: host files and directories for the guest's root,
    #: packed into an archive that follows the initramfs (and the modules').
    added_files: tuple["AddedEntry", ...] = ()
    #: `--ktap`: the command's stdout is KTAP/TAP; each test becomes a result.
    ktap: bool = False
    #: `--control PATH`: the control socket (microvmm/control/); its ports
    #: may be added and removed while the guest runs.
    control: str | None = None

    @property
    def all_ports(self) -> list["PortSpec"]:
        """The console ports of every virtio-console device."""
        return console_ports(self.ports, self.devices)
