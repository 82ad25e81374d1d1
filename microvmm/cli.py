"""`microvmm` command line: parse and validate everything, then hand a VmConfig
to the VMM. Bad input gets one error line and exit status 2 before anything
starts."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import sys
from typing import NoReturn

from microvmm.cliconfig import DEFAULT_CMDLINE, DEFAULT_MEM, UsageError, parse_size  # noqa: F401 (re-exported)
from microvmm.cliconfig import config_from_args as _config_from_args
from microvmm.run.exitcodes import HELP_TEXT, ExitCode

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
