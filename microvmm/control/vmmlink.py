"""The running VMM as the control socket's target, and the server's start.

vmm.py calls `start_control(vmm)` once its devices exist; the server's
close goes to the VMM's closers (it runs before the devices close).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from microvmm.control.commands import ControlCommands
from microvmm.control.server import ControlServer, line_handler

if TYPE_CHECKING:
    from microvmm.vmm import Vmm

logger = logging.getLogger(__name__)


class VmmControlTarget:
    def __init__(self, vmm: "Vmm"):
        self._vmm = vmm

    def consoles(self) -> list[tuple[str, Any]]:
        devices = self._vmm.devices
        if devices is None:
            return []
        return [(running.name, running.device) for running in devices.of_kind("virtio-console")]

    def open_backend(self, spec: Any) -> Any:
        from microvmm.virtio_console.backends import create_backend
        return create_backend(spec, sys.stderr)

    def dump(self) -> str:
        return self._vmm.diagnostics.where()

    def stats(self) -> dict:
        vmm = self._vmm
        return {"uptime_s": round(time.monotonic() - vmm.start_time, 3),
                "vcpus": len(vmm.runners), "exits": vmm.exit_statistics(),
                # port ids are never reused (hotplug.py): what add-port has left
                "consoles": [{"device": name, "capacity": console.capacity, "ids_used": len(console.ports)}
                             for name, console in self.consoles()]}

    def stop(self) -> None:
        from microvmm.vcpu_runner import StopReason, VcpuStop
        self._vmm._request_stop(VcpuStop(StopReason.SHUTDOWN, "control socket: stop", fatal=False))


def start_control(vmm: "Vmm", path: str) -> ControlServer:
    server = ControlServer(path, line_handler(ControlCommands(VmmControlTarget(vmm))))
    vmm._closers.append(server.close)
    server.start()
    logger.info("control socket at %s", path)
    return server
