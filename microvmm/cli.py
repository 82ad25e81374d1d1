"""`microvmm` command line: parse and validate everything, then hand a VmConfig
to the VMM. Bad input gets one error line and exit status 2 before anything
starts."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import re
import sys
from pathlib import Path
from typing import NoReturn

from microvmm.run.exitcodes import HELP_TEXT, ExitCode
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


def package_version() -> str:
    """microvmm's version (microvmm/version.py; imported when asked for)."""
    from microvmm.version import package_version as version
    return version()


RUN_EXAMPLES = """usage with a guest command: microvmm run [options] -- CMD [ARGS...]
  runs CMD in the guest (default initramfs, or one following guest/README.md),
  streams its stdout/stderr to ours, and exits with its status.

examples:
  microvmm run                                    boot the default guest (microvmm images path)
  microvmm run --kernel bzImage --console @pty:p0 the guest console on a new pty
  microvmm run --kernel vmlinux --initrd initramfs.cpio --mem 128M --cpus 2
  microvmm run --serial file:boot.log --append 'initcall_debug'
  microvmm run --console @stdio:con --console socket:ctl=/tmp/ctl.sock:server
  microvmm run --device virtio-console,@pty:p0,file:log=/tmp/guest.log
  microvmm run --device virtio-console,pty:a --device virtio-console,pty:b --device virtio-rng
  microvmm run --timeout 300 -- uname -a              run a command, exit with its status
  microvmm run --expect 'init reached' --boot-timeout 120 --junit boot.xml   boot smoke test

interactive console: Ctrl-A x quits, Ctrl-A h shows help; Ctrl-C goes to the guest.
SIGUSR1 (kill -USR1 PID) prints where every vCPU is: symbolized RIP, CR2, CR3, registers.
"""


class _VersionAction(argparse.Action):
    """--version: the package metadata is looked up only when asked (start-up time)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"microvmm {package_version()}")
        parser.exit(0)


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse's own errors (bad int, unknown choice) as one line too, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"microvmm: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="microvmm", description="A KVM micro-VMM with an integrated virtio-console.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv for debug)")
    parser.add_argument("--version", action=_VersionAction,
                        help="print microvmm's version and exit")
    commands = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="boot a Linux guest", description="Boot a Linux guest.",
        epilog=RUN_EXAMPLES + "\n" + HELP_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--kernel", metavar="PATH",
                     help="bzImage or ELF vmlinux (default: vmlinux of `microvmm images path`), "
                          "e.g. --kernel arch/x86/boot/bzImage")
    run.add_argument("--initrd", metavar="PATH",
                     help="initramfs (default: initramfs.cpio of `microvmm images path`, the busybox guest; "
                          "'none' for no initramfs), e.g. --initrd initramfs.cpio.gz")
    run.add_argument("--cmdline", metavar="STR",
                     help=f"kernel command line (default: {DEFAULT_CMDLINE!r} and a console= "
                          "microvmm chooses: the kernel log on a port of its own), "
                          "e.g. --cmdline 'console=hvc0 reboot=k'")
    run.add_argument("--append", metavar="STR", default="",
                     help="add to the command line, e.g. --append 'initcall_debug'")
    run.add_argument("--mem", metavar="SIZE", default=DEFAULT_MEM,
                     help=f"guest RAM (default {DEFAULT_MEM}): K, M or G, 1024-based, optional iB/B "
                          "(64M = 64MiB = 64MB); a bare number is MiB, e.g. --mem 256M")
    run.add_argument("--cpus", metavar="N", type=int, default=1,
                     help="number of vCPUs, one host thread each (default 1), e.g. --cpus 2")
    run.add_argument("--serial", metavar="BACKEND", default="stdio",
                     help="where the COM1 UART goes: stdio (default), pty, file:PATH, tty:PATH, "
                          "socket:PATH:server|client or off, e.g. --serial file:boot.log")
    run.add_argument("--console", metavar="SPEC", action="append", default=[],
                     help="a virtio-console port, ACRN syntax "
                          "[@]stdio|tty|pty|file|socket:NAME[=PATH][:server|client]; "
                          "repeat for more ports, e.g. --console @pty:p0")
    run.add_argument("--device", metavar="NAME[,OPTIONS]", action="append", default=[],
                     help="a PCI device: virtio-console,SPEC[,SPEC...] (ACRN syntax; the first "
                          "one shares its device with --console, each further one is a device "
                          "of its own) or virtio-rng[,max-bytes=N,period=MS]; repeatable, e.g. "
                          "--device virtio-console,@stdio:con,pty:p1 --device virtio-rng")
    run.add_argument("--share", metavar="HOST_DIR[:TAG][:ro]", action="append", default=[],
                     help="share a host directory over virtio-9p (9P2000.L); the default guest "
                          "mounts it at /mnt/TAG (TAG: the directory's name unless given; ro: "
                          "every write fails with EROFS); repeatable, e.g. --share .:src:ro")
    run.add_argument("--rootfs", choices=("host",),
                     help="host: the host's / (read-only over virtio-9p, under a tmpfs overlay) is "
                          "the root that '-- CMD' and the shell run in, so host programs run in the "
                          "guest (the default initramfs; a kernel with 9p and overlayfs built in), "
                          "e.g. --rootfs host -- python3 -c 'print(1)'")
    run.add_argument("--queue-size", metavar="N", type=int, default=64,
                     help="virtqueue size of the console (default 64), e.g. --queue-size 128")
    run.add_argument("--modules", metavar="DIR",
                     help="your kernel's modules (its lib/modules/VERSION, or the INSTALL_MOD_PATH "
                          "root holding it): the ones the virtio console needs (virtio_pci, "
                          "virtio_console and their dependencies, from modules.dep) are added to "
                          "the default initramfs and loaded before its init, "
                          "e.g. --modules /tmp/mods/lib/modules/6.1.0-57-amd64")
    run.add_argument("--add", metavar="HOST[:GUEST]", action="append", default=[],
                     help="put a host file or directory into the guest's root at boot (modes and "
                          "symlinks kept; GUEST defaults to /NAME, a trailing '/' means into that "
                          "directory); repeat for more, e.g. --add ./hello:/bin/hello --add selftests/")
    run.add_argument("--ktap", action="store_true",
                     help="read the '-- CMD' output as KTAP/TAP (kselftest, KUnit): one result per "
                          "test in --junit/--json; a failed test turns the command's status 0 into 1, "
                          "e.g. --ktap --junit results.xml -- ./run_kselftest.sh")
    run.add_argument("--kaslr", action="store_true",
                     help="keep the kernel's address randomization (default: 'nokaslr' is added so "
                          "that System.map addresses in diagnostics and --profile are right)")
    run.add_argument("--system-map", metavar="PATH",
                     help="System.map for symbolized diagnostics (default: beside the kernel), "
                          "e.g. --system-map linux/System.map")
    run.add_argument("--timeout", metavar="SECONDS", type=float,
                     help="kill the VM after this long and exit 124, e.g. --timeout 300")
    run.add_argument("--boot-timeout", metavar="SECONDS", type=float,
                     help="fail (124) if the guest has not reached init by then, e.g. --boot-timeout 120")
    run.add_argument("--idle-timeout", metavar="SECONDS", type=float,
                     help="fail (124) after this long without console output, e.g. --idle-timeout 60")
    run.add_argument("--fail-on", choices=("panic", "oops", "warn"), default="oops",
                     help="lowest kernel report that fails the run (default oops: panics, "
                          "Oopses, BUG: and sanitizer reports; warn adds WARNING:), e.g. --fail-on warn")
    run.add_argument("--expect", metavar="REGEX",
                     help="succeed (0) as soon as console output matches, e.g. --expect 'login:'")
    run.add_argument("--expect-port", metavar="NAME",
                     help="where --expect looks: 'serial' or a console port name (default: everywhere), "
                          "e.g. --expect-port serial")
    run.add_argument("--log", metavar="FILE",
                     help="append all console output, each line tagged with time and port, e.g. --log run.log")
    run.add_argument("--junit", metavar="FILE", help="write a JUnit XML result, e.g. --junit boot.xml")
    run.add_argument("--json", metavar="FILE", help="write a JSON result, e.g. --json boot.json")
    run.add_argument("--profile", metavar="FILE",
                     help="sample every vCPU's RIP while the guest runs and write a report (top "
                          "functions, boot phases) to FILE and flame-graph input to FILE.folded, "
                          "e.g. --profile boot.prof")
    run.add_argument("--profile-rate", metavar="HZ", type=float, default=100.0,
                     help="samples per second per vCPU for --profile (default 100), e.g. --profile-rate 500")
    run.add_argument("--stats", action="store_true",
                     help="print vCPU exits by reason and device accesses at exit")
    run.add_argument("--seccomp", choices=("off", "errno", "kill", "log"), default="off",
                     help="after setup, limit the VMM to the system calls it needs; others fail "
                          "with EPERM (errno), kill it (kill) or are logged (log). Default off, "
                          "e.g. --seccomp errno")
    run.add_argument("--no-host-workarounds", action="store_true",
                     help="on an emulating KVM host, do not apply the boot workarounds")
    run.add_argument("--control", metavar="PATH",
                     help="listen on a unix socket for commands to the running VM (add and remove "
                          "console ports, open/close, resize...; see `microvmm ctl`), "
                          "e.g. --control /tmp/vm.ctl")
    ctl = commands.add_parser(
        "ctl", help="send a command to a running VM's --control socket",
        description="Send one command to a `microvmm run --control PATH` VM and print the answer. "
                    "Exit 0 on success, 1 when the VM answers with an error, 2 when the socket "
                    "cannot be reached.",
        epilog="commands: ports | add-port SPEC [DEVICE] | remove-port NAME | open NAME | close NAME |"
               " resize NAME COLS ROWS | send NAME DATA | stats | dump | stop | help\n"
               "example: microvmm ctl /tmp/vm.ctl add-port socket:data=/tmp/data.sock:server",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ctl.add_argument("--json", action="store_true", help="print the reply as JSON")
    ctl.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                     help="how long to wait for the answer (default 10)")
    ctl.add_argument("path", metavar="PATH", help="the VM's --control socket")
    ctl.add_argument("ctl_command", metavar="COMMAND", help="ports, add-port, remove-port, ...")
    ctl.add_argument("ctl_args", metavar="ARG", nargs=argparse.REMAINDER, help="the command's arguments")
    commands.add_parser("check-host", help="report what kind of KVM this host has and whether "
                                             "/dev/kvm is usable (exit 1 if not)")
    config = commands.add_parser(
        "check-config", help="list the options a kernel .config lacks to boot under microvmm",
        description="Check a kernel .config: each missing option with why it matters. "
                    "Exit 0 when every required option is set, 1 otherwise.",
        epilog="example: microvmm check-config ~/linux/.config")
    config.add_argument("config", metavar="PATH", help="a kernel .config, e.g. ~/linux/.config")
    images = commands.add_parser(
        "images", help="build the default guest images, or print where they are",
        description="build: build the default guest kernel and initramfs into the user's image cache "
                    "($MICROVMM_IMAGES, else ~/.cache/microvmm/images; Debian packages are installed "
                    "when missing, as root). path: print the directory `microvmm run` takes them from.")
    images.add_argument("action", choices=("build", "path"), nargs="?", default="path",
                        help="build or path (default: path)")
    images.add_argument("--force", action="store_true", help="build: rebuild even when cached")

    return parser


def _config_from_args(args: argparse.Namespace):
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


@contextlib.contextmanager
def _collector_paused(freeze: bool):
    """Start-up imports and builds tens of thousands of objects that live as
    long as the process (modules, classes, functions) and makes hardly any
    garbage: the cyclic collector would only trace them over and over. It is
    off until the VMM takes over (issue 6: time to the first KVM_RUN).

    With `freeze` (main() is the process's entry point) what start-up built
    is then frozen (gc.freeze): turned back on, the collector would otherwise
    trace all of it at once in its first pass (~2 ms, just before the guest
    starts), and every later full pass of the running VMM would too.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            if freeze:
                gc.freeze()
            gc.enable()


def main(argv: list[str] | None = None) -> int:
    # main() without arguments is the `microvmm` command itself: its start-up
    # objects live as long as the process.
    with _collector_paused(freeze=argv is None):
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        # Everything after the first '--' is the guest command, verbatim.
        command = None
        if "--" in argv:
            split = argv.index("--")
            argv, command = argv[:split], argv[split + 1:]
        args = parser.parse_args(argv)
        args.command = command
        if command is not None and args.command_name != "run":
            parser.error("'-- CMD' only goes with 'run'")
        logging.basicConfig(
            level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
            format="microvmm: %(levelname)s: %(message)s" if args.verbose else "microvmm: %(message)s",
            stream=sys.stderr)
        if args.command_name == "check-config":
            from microvmm.diag.kconfig_check import ConfigFileError, report
            try:
                text, status = report(args.config)
            except ConfigFileError as err:
                print(f"microvmm: error: {err}", file=sys.stderr)
                return ExitCode.USAGE
            print(text)
            return status
        if args.command_name == "images":
            from microvmm.guestbuild.command import images_command
            return images_command(args.action, force=args.force)
        if args.command_name == "ctl":
            from microvmm.control.client import ctl_main
            return ctl_main(args)
        if args.command_name == "check-host":
            from microvmm.host.hostinfo import check_kvm_device, detect_host_kind, host_quirks
            kind, reason = detect_host_kind()
            device = check_kvm_device()
            print(f"{kind.value}: {reason}")
            print(device.summary)
            applied = host_quirks(kind, reason).describe()
            print("host workarounds run applies: " + ("none" if not applied else
                  "(--no-host-workarounds turns them off)\n  " + "\n  ".join(applied)))
            return 0 if device.usable else 1
        try:
            config = _config_from_args(args)
        except UsageError as err:
            print(f"microvmm: error: {err}", file=sys.stderr)
            return ExitCode.USAGE
        # Guest RAM, the VM and the kernel are made on helper threads while the
        # VMM's modules (cffi, the devices, the boot loaders) are imported: their
        # ioctls and reads overlap the imports (start-up time, issue 6).
        from microvmm.vmprep import VmmError, VmPreparation
        try:
            preparation = VmPreparation(config)
        except VmmError:
            preparation = None  # run_vm meets the same error and reports it the usual way
        try:
            from microvmm.vmm import run_vm
        except BaseException:
            if preparation is not None:
                preparation.close()
            raise
    return run_vm(config, preparation)


if __name__ == "__main__":
    sys.exit(main())
