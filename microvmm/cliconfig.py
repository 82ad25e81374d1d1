"""From `microvmm run`'s parsed arguments to a VmConfig.

Every check of the user's input happens here, before anything starts: a bad
value raises UsageError with one line naming it (the CLI exits 2). The
parser itself and the subcommands are in cli.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path

from microvmm.images import BUILD_HINT, default_images_dir

#: Without --cmdline; microvmm adds the console= (the kernel's log on a port
#: of its own, or console=ttyS0: vmm.plan_kernel_console).
DEFAULT_CMDLINE = "reboot=k panic=-1"
DEFAULT_MEM = "64M"

_SIZE_RE = re.compile(r"^(\d+)(?:([KMG])(i?B)?)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class UsageError(Exception):
    """Bad command-line input; the message names the offending value."""


def parse_size(text: str) -> int:
    """'64M', '64MiB', '64MB', '1G', '131072K' -> bytes (K/M/G are binary:
    1024-based, with or without iB/B); a bare number means MiB (like QEMU's -m).
    A B right after the number ('64B', '64iB') is refused, not read as MiB:
    sizes in bytes are far below any usable guest RAM."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        if re.match(r"^\d+B$", text.strip(), re.IGNORECASE):
            raise UsageError(f"--mem {text!r}: a size in bytes is too small for a guest; "
                             "give K, M or G (e.g. 64M, 64MiB, 1G)")
        raise UsageError(f"--mem {text!r}: expected a size such as 64M, 64MiB or 1G")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]


def config_from_args(args: argparse.Namespace):
    """The run's VmConfig from parsed arguments; every check of the user's
    input happens here, before anything starts (UsageError names the input)."""
    from microvmm.boot.layout import MemoryLayoutError, guest_ram_layout
    from microvmm.run.monitor import FailureLevel
    from microvmm.vmconfig import SerialConfig, VmConfig  # deferred: keeps --help fast

    images = default_images_dir()
    kernel = Path(args.kernel) if args.kernel else images / "vmlinux"
    if not args.kernel and not kernel.is_file():
        raise UsageError(f"no --kernel given and no default image at {kernel}: {BUILD_HINT}")
    if args.initrd == "none":
        initrd = None
    elif args.initrd:
        initrd = Path(args.initrd)
    else:
        # Your own kernel with our initramfs is the common case (shell, -- CMD).
        initrd = images / "initramfs.cpio"
        if not initrd.is_file():
            raise UsageError(f"no --initrd given and no default initramfs at {initrd}: "
                             f"{BUILD_HINT}, or pass --initrd PATH or --initrd none")
    system_map = Path(args.system_map) if args.system_map else None
    for label, path in (("--kernel", kernel), ("--initrd", initrd), ("--system-map", system_map)):
        if path is not None and not path.is_file():
            raise UsageError(f"{label} {path}: no such file")
    if args.cpus < 1 or args.cpus > 64:
        raise UsageError(f"--cpus {args.cpus}: must be between 1 and 64")
    if not 2 <= args.queue_size <= 32768 or args.queue_size & (args.queue_size - 1):
        raise UsageError(f"--queue-size {args.queue_size}: must be a power of two from 2 to 32768")
    for option in ("timeout", "boot_timeout", "idle_timeout"):
        value = getattr(args, option)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{option.replace('_', '-')} {value:g}: must be a positive number of seconds")
    if args.seccomp != "off":
        from microvmm.host.seccomp import supported
        usable, why = supported()
        if not usable:
            raise UsageError(f"--seccomp {args.seccomp}: not available here: {why}")
    if not (math.isfinite(args.profile_rate) and 1 <= args.profile_rate <= 10000):
        raise UsageError(f"--profile-rate {args.profile_rate:g}: must be between 1 and 10000")
    if args.expect is not None:
        try:
            re.compile(args.expect)
        except re.error as err:
            raise UsageError(f"--expect {args.expect!r}: not a valid regular expression: {err}") from None
    try:
        serial = SerialConfig.parse(args.serial)
    except ValueError as err:
        raise UsageError(str(err)) from None
    first_ports, devices = _ports_from_args(args)
    devices += _shares_from_args(args, devices)
    ports = _all_ports(first_ports, devices)
    if serial.kind == "stdio" and any(p.backend.value == "stdio" for p in ports):
        raise UsageError("--serial stdio and a stdio console port cannot share the terminal: "
                         "use --serial off or --serial file:PATH")
    if serial.kind == "socket" and any(p.path is not None and p.backend.value == "socket"
                                       and p.path == str(serial.path) for p in ports):
        raise UsageError(f"--serial {serial.text}: the socket path is a console port's too")
    if args.expect_port is not None and args.expect_port != "serial" and \
            args.expect_port not in {p.name for p in ports}:
        raise UsageError(f"--expect-port {args.expect_port!r}: no such port (use 'serial' or a --console name)")
    if args.command is not None and not args.command:
        raise UsageError("nothing after '--': give the command to run in the guest")
    if args.command is not None and any(p.name.startswith("microvmm.") for p in ports):
        raise UsageError("port names starting with 'microvmm.' are reserved for '-- CMD' runs")
    if any(p.name == "microvmm.kmsg" for p in ports):
        raise UsageError("port name 'microvmm.kmsg' is reserved for the kernel's log")
    initrd_modules = _modules_from_args(args, kernel, initrd, ports) if args.modules else ()
    added_files = _added_files_from_args(args) if args.add else ()
    if args.ktap and args.command is None:
        raise UsageError("--ktap reads the output of a guest command: add '-- CMD [ARGS...]'")
    mem_size = parse_size(args.mem)
    try:
        guest_ram_layout(mem_size)
    except MemoryLayoutError as err:
        raise UsageError(f"--mem {args.mem}: {err}") from None
    cmdline = args.cmdline if args.cmdline is not None else DEFAULT_CMDLINE
    if args.append:
        cmdline = f"{cmdline} {args.append}"
    if args.rootfs == "host":  # the default /init mounts it (microvmm/guestbuild/guest/initramfs/lib/microvmm/rootfs.sh)
        from microvmm.devices.virtio_9p import HOST_ROOT_TAG, ROOTFS_PARAM
        cmdline = f"{cmdline} {ROOTFS_PARAM}={HOST_ROOT_TAG}"
    _check_cmdline_length(cmdline, args)
    return VmConfig(
        kernel=kernel, initrd=initrd, cmdline=cmdline, default_console=args.cmdline is None,
        mem_size=mem_size,
        cpus=args.cpus, serial=serial, ports=first_ports, devices=devices, queue_size=args.queue_size,
        system_map=system_map,
        timeout=args.timeout, host_workarounds=not args.no_host_workarounds,
        command=args.command, boot_timeout=args.boot_timeout, idle_timeout=args.idle_timeout,
        fail_on=FailureLevel[args.fail_on.upper()], expect=args.expect, expect_port=args.expect_port,
        log=Path(args.log) if args.log else None, junit=Path(args.junit) if args.junit else None,
        json=Path(args.json) if args.json else None,
        profile=Path(args.profile) if args.profile else None, profile_rate=args.profile_rate,
        stats=args.stats, seccomp=args.seccomp, initrd_modules=initrd_modules, kaslr=args.kaslr,
        added_files=added_files, ktap=args.ktap,
        control=_control_from_args(args),
    )


def _control_from_args(args: argparse.Namespace) -> str | None:
    if args.control is None:
        return None
    if args.seccomp != "off":
        raise UsageError(f"--control {args.control}: cannot be combined with --seccomp yet "
                         "(the control thread and added ports need system calls the filter refuses)")
    from microvmm.control.server import ControlPathError, check_control_path
    try:
        check_control_path(args.control)
    except ControlPathError as err:
        raise UsageError(str(err)) from None
    return args.control


def _check_cmdline_length(cmdline: str, args: argparse.Namespace) -> None:
    """The command line the kernel will get (with this host's workarounds and a
    `-- CMD`) must fit Linux's COMMAND_LINE_SIZE: refused here (exit 2, naming
    what makes it long), not later as a setup error or cut by the kernel."""
    from microvmm.host.hostinfo import detect_host_kind, host_quirks
    from microvmm.vmconfig import KERNEL_CMDLINE_MAX, kernel_cmdline
    quirks = host_quirks(*detect_host_kind(), enabled=not args.no_host_workarounds)
    full = kernel_cmdline(cmdline, quirks.cmdline_additions, args.command, kaslr=args.kaslr)
    length = len(full.encode())
    if length > KERNEL_CMDLINE_MAX:
        # (a `-- CMD` is on it only when it fits: it travels in the initramfs)
        parts = ["--cmdline/--append"] + (["the host workarounds"] if quirks.cmdline_additions else [])
        raise UsageError(f"the kernel command line would be {length} bytes ({', '.join(parts)}), "
                         f"more than Linux keeps ({KERNEL_CMDLINE_MAX}): shorten it")


def _modules_from_args(args: argparse.Namespace, kernel: Path, initrd: Path | None, ports: list) -> tuple:
    """--modules DIR: the module files to append to the initramfs, in load order.

    The console modules are required when the guest must have virtio ports
    (console ports or `-- CMD`); otherwise those missing are left out."""
    from microvmm.initramfs.guestmodules import ModulesError, check_kernel_release, find_module_tree, resolve_modules
    if initrd is None:
        raise UsageError("--modules needs an initramfs to add them to (not --initrd none)")
    try:
        tree = find_module_tree(Path(args.modules))
        check_kernel_release(kernel, tree)
        modules, built_in = resolve_modules(tree, required=bool(ports) or args.command is not None)
    except ModulesError as err:
        raise UsageError(str(err)) from None
    logging.getLogger(__name__).info(
        "--modules: %s from %s added to the initramfs%s",
        ", ".join(m.name for m in modules) or "nothing", tree.path,
        f" ({', '.join(built_in)} built in)" if built_in else "")
    return tuple(modules)


#: Where the default guest's /init mounts file systems (microvmm/guestbuild/guest/initramfs/etc/fstab, devtmpfs).
DEFAULT_GUEST_MOUNTS = frozenset({"dev", "proc", "sys", "tmp", "run"})


def _added_files_from_args(args: argparse.Namespace) -> tuple:
    """--add HOST[:GUEST]...: every host path walked and checked now (exists,
    readable, a file, directory or symlink; GUEST absolute, no '..')."""
    from microvmm.initramfs.guestfiles import AddError, plan_added_files
    try:
        entries = plan_added_files(args.add)
    except AddError as err:
        raise UsageError(str(err)) from None
    log = logging.getLogger(__name__)
    log.info("--add: %d entries added to the guest's root", len(entries))
    if args.initrd is None:  # the default guest's /init mounts file systems over these
        for entry in entries:
            top = entry.path.split("/", 1)[0]
            if entry.option and top in DEFAULT_GUEST_MOUNTS:
                log.warning("%s: /%s will be hidden: the default guest mounts a file system on /%s "
                            "(put it elsewhere, e.g. /opt)", entry.option, entry.path, top)
                break
    return entries


def _all_ports(first_ports: list, devices: tuple) -> list:
    from microvmm.vmconfig import console_ports  # (vmconfig is imported already)
    return console_ports(first_ports, devices)


def _shares_from_args(args: argparse.Namespace, devices: tuple) -> tuple:
    """--share HOST_DIR[:TAG][:ro]: virtio-9p requests; tags unique among all shares."""
    if not args.share and not args.rootfs and not any(d.kind == "virtio-9p" for d in devices):
        return ()
    from microvmm.devices.virtio_9p import DEVICE_NAME, host_root_share, parse_share
    from microvmm.devmgr.registry import DeviceRequest
    if args.seccomp != "off":
        raise UsageError("--share/--rootfs/virtio-9p cannot be combined with --seccomp yet (the file "
                         "server's system calls are not in the filter)")
    shares = []
    if args.rootfs == "host":
        shares.append(DeviceRequest(DEVICE_NAME, host_root_share(), "--rootfs host"))
    for text in args.share:
        try:
            shares.append(DeviceRequest(DEVICE_NAME, parse_share(text), f"--share {text}"))
        except ValueError as err:
            raise UsageError(f"--share {text!r}: {err}") from None
    tags: set[str] = set()
    for request in [d for d in devices if d.kind == DEVICE_NAME] + shares:
        if request.options.tag in tags:
            raise UsageError(f"{request.text or request.kind}: tag {request.options.tag!r} is used "
                             f"twice (give each share its own TAG)")
        tags.add(request.options.tag)
    return tuple(shares)


def _ports_from_args(args: argparse.Namespace) -> tuple[list, tuple]:
    """The first virtio-console's ports (--console and the first --device
    virtio-console, checked together) and the further --device requests
    (each later virtio-console a device of its own, virtio-rng, ...)."""
    if not args.console and not args.device:
        return [], ()  # the port parser stays unimported: start-up time (issue 6)
    from microvmm.devmgr.registry import DeviceOptionError, DeviceRequest, parse_device_option
    from microvmm.virtio_console.spec import DEVICE_NAME, PortSpecError, parse_port_spec, validate_ports
    try:
        ports = [parse_port_spec(spec) for spec in args.console]
        devices: list[DeviceRequest] = []
        first_console = True
        for option in args.device:
            request = parse_device_option(option)
            if request.kind == DEVICE_NAME and first_console:
                ports.extend(request.options)
                first_console = False
            else:
                devices.append(request)
        if ports:
            validate_ports(ports)
        # Port names (/dev/virtio-ports/NAME), the terminal and socket paths
        # are shared by all consoles.
        everyone = ports + [p for d in devices if d.kind == DEVICE_NAME for p in d.options]
        if everyone:
            validate_ports(everyone, max_ports=None)
    except (PortSpecError, DeviceOptionError) as err:
        raise UsageError(str(err)) from None
    return ports, tuple(devices)


