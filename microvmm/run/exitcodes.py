"""Process exit statuses of `microvmm run`, one documented meaning each.

Like timeout(1), microvmm keeps the codes from 123 up for itself, so a guest
command's own status (with `--`, 0-122) passes through unchanged.
"""

import enum


class ExitCode(enum.IntEnum):
    #: The guest powered off, halted for good or rebooted by itself (poweroff, halt -f, reboot -f).
    OK = 0
    #: Bad command line or port syntax (nothing was started).
    USAGE = 2
    #: The guest stopped without a result: no `-- CMD` status, no --expect match.
    NO_RESULT = 123
    #: --timeout, --boot-timeout or --idle-timeout expired; the VM was killed.
    TIMEOUT = 124
    #: The VMM itself failed: no usable /dev/kvm, unreadable kernel, host error.
    VMM_ERROR = 125
    #: The guest kernel panicked, or oopsed/warned at the --fail-on level.
    GUEST_PANIC = 126
    #: A vCPU stopped abnormally: triple fault, internal or emulation error.
    GUEST_FAULT = 127
    # 128 + N: microvmm was ended by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP).


def signal_exit_code(signum: int) -> int:
    return 128 + signum


HELP_TEXT = """exit status:
  0    the guest powered off, halted for good or rebooted; or --expect matched
  N    with '-- CMD': the command's own exit status (0-122)
  2    bad command line or port syntax; nothing was started
  123  the guest stopped without a result ('-- CMD' status or --expect match)
  124  a timeout expired (--timeout, --boot-timeout, --idle-timeout); the VM was killed
  125  VMM or setup error (no usable /dev/kvm, bad kernel image, ...)
  126  guest kernel failure: a panic, or an oops/BUG/sanitizer report/warning per --fail-on
  127  a vCPU stopped abnormally (triple fault, internal/emulation error)
  128+N  microvmm was ended by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP)"""
