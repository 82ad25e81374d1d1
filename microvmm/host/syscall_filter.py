"""--seccomp for a run: which syscalls its options still need once the VM runs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microvmm.vmconfig import VmConfig

logger = logging.getLogger(__name__)


class SyscallFilterError(Exception):
    """The filter could not be installed (the message names --seccomp)."""


def install_run_filter(config: "VmConfig") -> None:
    """Install the opt-in syscall filter on every thread of the process."""
    from microvmm.host.seccomp import FilterAction, SeccompError, install_filter
    # A socket client (a port or the serial console) reconnects.
    client = config.serial.socket_mode == "client" or any(
        p.backend.value == "socket" and p.socket_mode is not None and p.socket_mode.value == "client"
        for p in config.all_ports)
    try:
        # Result and profile files are created only when the VM has stopped.
        install_filter(extra_allowed=("socket", "connect") if client else (),
                       action=FilterAction(config.seccomp),
                       allow_write_open=bool(config.json or config.junit or config.profile))
    except SeccompError as err:
        raise SyscallFilterError(f"--seccomp: {err}") from err
    logger.info("seccomp filter installed (%s)", config.seccomp)
