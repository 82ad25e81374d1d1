"""`microvmm check-config`: does a kernel .config have what booting under
microvmm needs? Lists each missing option with the reason it matters."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Requirement:
    option: str
    why: str
    required: bool = True  # False: recommended
    #: The run option that needs it ("--share"); such options are reported
    #: as "for --share", never as required for booting.
    feature: str = ""


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("CONFIG_64BIT", "microvmm enters the kernel through the 64-bit boot protocol"),
    Requirement("CONFIG_PRINTK", "no kernel messages otherwise: failures could not be reported"),
    Requirement("CONFIG_TTY", "consoles (serial and hvc) are ttys"),
    Requirement("CONFIG_SERIAL_8250", "the COM1 UART microvmm emulates"),
    Requirement("CONFIG_SERIAL_8250_CONSOLE", "console=ttyS0: early boot logs on the serial line"),
    Requirement("CONFIG_X86_MPPARSE", "without ACPI the IOAPIC and PCI interrupt routing come from "
                                      "microvmm's MP table"),
    Requirement("CONFIG_PCI", "the virtio-console is a PCI function"),
    Requirement("CONFIG_VIRTIO_PCI", "virtio over PCI"),
    Requirement("CONFIG_VIRTIO_PCI_LEGACY", "microvmm's virtio transport is the legacy one"),
    Requirement("CONFIG_VIRTIO_CONSOLE", "the virtio-console driver (hvc and /dev/vport*)"),
    Requirement("CONFIG_HVC_DRIVER", "console ports (@) become /dev/hvcN"),
    Requirement("CONFIG_BLK_DEV_INITRD", "--initrd: the initramfs is the root filesystem"),
    Requirement("CONFIG_BINFMT_ELF", "init and every command are ELF binaries"),
    Requirement("CONFIG_BINFMT_SCRIPT", "the default /init is a shell script"),
    Requirement("CONFIG_DEVTMPFS", "/dev/vport*, /dev/hvc* appear without udev"),
    Requirement("CONFIG_PROC_FS", "the guest command agent and shells read /proc"),
    Requirement("CONFIG_SYSFS", "ports are found by name under /sys/class/virtio-ports"),
    Requirement("CONFIG_UNIX98_PTYS", "a shell with job control needs /dev/pts", required=False),
    Requirement("CONFIG_PCI_MSI", "MSI-X interrupts (else the console uses INTx)", required=False),
    Requirement("CONFIG_DEVTMPFS_MOUNT", "/dev mounted before init runs", required=False),
    Requirement("CONFIG_MAGIC_SYSRQ", "sysrq over hvc (^O) and /proc/sysrq-trigger", required=False),
    Requirement("CONFIG_KVM_GUEST", "paravirtual clock and faster timers under KVM", required=False),
    Requirement("CONFIG_NET_9P", "9P, the protocol of the virtio-9p device", False, "--share"),
    Requirement("CONFIG_NET_9P_VIRTIO", "9P's virtio transport (the share's device)", False, "--share"),
    Requirement("CONFIG_9P_FS", "the 9p filesystem the guest mounts a share with", False, "--share"),
    Requirement("CONFIG_OVERLAY_FS", "the tmpfs overlay over the host's read-only /", False,
                "--rootfs host"),
)

_LINE = re.compile(r"^(CONFIG_\w+)=(.*)$")


class ConfigFileError(Exception):
    """The .config could not be read."""


def parse_config(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match:
            values[match.group(1)] = match.group(2)
    return values


def check(values: dict[str, str]) -> list[Requirement]:
    """The requirements not met (an option must be =y; =m cannot load without modules)."""
    return [req for req in REQUIREMENTS if values.get(req.option) != "y"]


def check_config_file(path: str | Path) -> tuple[list[Requirement], dict[str, str]]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as err:
        raise ConfigFileError(f"cannot read {path}: {err.strerror}") from err
    values = parse_config(text)
    if not values:
        raise ConfigFileError(f"{path}: no CONFIG_ lines (not a kernel .config?)")
    return check(values), values


def report(path: str | Path) -> tuple[str, int]:
    """Human-readable verdict and exit status (0 ok, 1 something required missing)."""
    missing, values = check_config_file(path)
    lines = []
    for req in missing:
        state = values.get(req.option)
        now = "=m (modules cannot be loaded from microvmm's initramfs)" if state == "m" else "is not set"
        kind = f"for {req.feature}" if req.feature else "missing" if req.required else "recommended"
        lines.append(f"{kind}: {req.option} {now}: {req.why}")
    required_missing = [req for req in missing if req.required]
    ok = len(REQUIREMENTS) - len(missing)
    lines.append(f"{path}: {ok}/{len(REQUIREMENTS)} options set; "
                 + ("boots under microvmm" if not required_missing
                    else f"{len(required_missing)} required option(s) missing"))
    return "\n".join(lines), (1 if required_missing else 0)
