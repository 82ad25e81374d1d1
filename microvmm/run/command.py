"""`-- CMD` runs: the command travels as the file /microvmm.cmd of a small cpio
archive put before the initramfs (and, when it fits, base64 on the kernel
command line: vmconfig.kernel_cmdline); its output and status come back on
three named console ports (guest/README.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from microvmm.guest_contract import COMMAND_STATUS_PORT, COMMAND_STDERR_PORT, COMMAND_STDOUT_PORT  # noqa: F401

if TYPE_CHECKING:
    from microvmm.virtio_console.backends import CaptureBackend

COMMAND_FILE = "microvmm.cmd"


def command_script(argv: list[str]) -> bytes:
    """The command as the guest's shell runs it: shell-quoted, one line."""
    import shlex  # deferred: only `-- CMD` runs need it (issue 6)
    return (shlex.join(argv) + "\n").encode()


def parse_command_status(data: bytes) -> int | None:
    """The status port's text as an exit status (0-255), or None if it is no number."""
    text = data.decode(errors="replace").strip()
    return int(text) & 0xFF if text.isdigit() else None


def command_ports(stdout_fd: int, stderr_fd: int) -> tuple[list, "CaptureBackend"]:
    """The ports a `-- CMD` run talks through (guest/README.md): the command's
    stdout and stderr to these fds, its status captured. Returns the
    (PortSpec, backend) pairs and the status port's backend."""
    from microvmm.virtio_console.backends import CaptureBackend, FdSinkBackend
    from microvmm.virtio_console.spec import BackendKind, PortSpec

    def spec(name: str) -> PortSpec:
        return PortSpec(console=False, backend=BackendKind.FILE, name=name, path=None)
    status = CaptureBackend(COMMAND_STATUS_PORT)
    return [(spec(COMMAND_STDOUT_PORT), FdSinkBackend(COMMAND_STDOUT_PORT, stdout_fd)),
            (spec(COMMAND_STDERR_PORT), FdSinkBackend(COMMAND_STDERR_PORT, stderr_fd)),
            (spec(COMMAND_STATUS_PORT), status)], status
