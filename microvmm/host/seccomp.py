"""An opt-in seccomp filter: once the VM is built, the VMM process may only make
the system calls a running VMM needs.

The guest is untrusted and the VMM parses what it writes; should a bug there
ever let guest data steer the VMM, the filter keeps it from starting programs
(execve), tracing (ptrace), opening network sockets, creating or writing new
files, or forking. It is built here as a classic BPF program (no libseccomp):
an allow-list of x86-64 system call numbers, with argument checks where a call
is needed only in a harmless form:

* `openat`/`open`: read-only only (lazy Python imports, capstone's library,
  System.map); O_WRONLY, O_RDWR, O_CREAT, O_TRUNC or O_APPEND is refused,
  unless `allow_write_open` (e.g. result files written at exit).
* `clone`: threads only (CLONE_THREAD); `clone3`, whose flags live in memory a
  filter cannot read, fails with ENOSYS so glibc falls back to `clone`.
* system calls of another ABI (x32, i386) are refused.

Every other call gets the chosen action: ERRNO (EPERM; the default, so a
missing entry shows up as a logged error, not a dead VM), KILL (the whole
process), or LOG (allowed, but the kernel logs it: for finding what a new
feature needs). The filter applies to every thread (SECCOMP_FILTER_FLAG_TSYNC)
and cannot be removed: install it only when setup is done.

ALLOWED_SYSCALLS came from `strace -f` of real runs (serial on a terminal,
pty/socket/file ports, SIGUSR1 reports, SIGWINCH, a signal to stop, --json),
taking what the process did after its first KVM_RUN, plus the calls the same
code paths make on other inputs (eventfd2 for ioeventfds when the guest moves
a BAR, accept4 for socket peers, clock_nanosleep, getrandom, ...).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import platform
import struct
import sys
from collections.abc import Iterable

logger = logging.getLogger(__name__)


class SeccompError(Exception):
    """The filter could not be built or installed."""


class FilterAction(enum.Enum):
    ERRNO = "errno"   # refuse with EPERM
    KILL = "kill"     # kill the whole process (SIGSYS)
    LOG = "log"       # allow, but log it (audit/dmesg)


#: x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl) of the
#: calls this module allows or refers to.
SYSCALL_NUMBERS: dict[str, int] = {
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "poll": 7,
    "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13,
    "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16, "pread64": 17, "pwrite64": 18,
    "readv": 19, "writev": 20, "access": 21, "pipe": 22, "select": 23, "sched_yield": 24,
    "mremap": 25, "madvise": 28, "dup": 32, "dup2": 33, "nanosleep": 35, "getpid": 39,
    "socket": 41, "connect": 42, "accept": 43, "sendto": 44, "recvfrom": 45, "sendmsg": 46,
    "recvmsg": 47, "shutdown": 48, "bind": 49, "listen": 50, "getsockname": 51,
    "getpeername": 52, "socketpair": 53, "setsockopt": 54, "getsockopt": 55, "clone": 56,
    "fork": 57, "vfork": 58, "execve": 59, "exit": 60, "wait4": 61, "kill": 62, "uname": 63,
    "fcntl": 72, "fsync": 74, "fdatasync": 75, "ftruncate": 77, "getcwd": 79, "chdir": 80,
    "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85, "link": 86, "unlink": 87,
    "symlink": 88, "readlink": 89, "chmod": 90, "fchmod": 91, "chown": 92, "umask": 95,
    "gettimeofday": 96, "getrlimit": 97, "getrusage": 98, "sysinfo": 99, "ptrace": 101,
    "getuid": 102, "getgid": 104, "setuid": 105, "setgid": 106, "geteuid": 107,
    "getegid": 108, "getppid": 110, "getpgrp": 111, "setsid": 112, "sigaltstack": 131,
    "mknod": 133, "personality": 135, "prctl": 157, "arch_prctl": 158, "chroot": 161,
    "mount": 165, "umount2": 166, "reboot": 169, "init_module": 175, "gettid": 186,
    "tkill": 200, "time": 201, "futex": 202, "sched_getaffinity": 204, "getdents64": 217,
    "set_tid_address": 218, "restart_syscall": 219, "clock_gettime": 228, "clock_getres": 229,
    "clock_nanosleep": 230, "exit_group": 231, "epoll_wait": 232, "epoll_ctl": 233,
    "tgkill": 234, "openat": 257, "mkdirat": 258, "newfstatat": 262, "unlinkat": 263,
    "renameat": 264, "linkat": 265, "symlinkat": 266, "readlinkat": 267, "fchmodat": 268,
    "faccessat": 269, "pselect6": 270, "ppoll": 271, "unshare": 272, "set_robust_list": 273,
    "epoll_pwait": 281, "eventfd": 284, "accept4": 288, "eventfd2": 290, "epoll_create1": 291,
    "dup3": 292, "pipe2": 293, "prlimit64": 302, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "seccomp": 317, "getrandom": 318, "memfd_create": 319,
    "bpf": 321, "execveat": 322, "statx": 332, "rseq": 334, "pidfd_open": 434, "clone3": 435,
    "close_range": 436, "faccessat2": 439, "epoll_pwait2": 441,
}

#: What a running VMM needs (besides the argument-checked openat/open/clone).
ALLOWED_SYSCALLS: frozenset[str] = frozenset({
    # I/O on fds it already has: terminals, ptys, sockets, files, eventfds, KVM
    "read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close", "ioctl",
    "fcntl", "fstat", "newfstatat", "statx", "dup", "dup3", "getdents64",
    "poll", "ppoll", "select", "pselect6", "epoll_wait", "epoll_pwait", "epoll_ctl", "eventfd2",
    # socket ports: serve peers on sockets made at setup
    "accept4", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown", "getsockopt",
    "setsockopt", "getsockname", "getpeername",
    # removing its own socket file at exit
    "unlink",
    # memory (the Python allocator, capstone loaded on demand)
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
    # threads, signals, time
    "futex", "set_robust_list", "rseq", "sched_yield", "sched_getaffinity", "exit", "exit_group",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    "tgkill", "tkill", "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
    "getrandom", "uname", "sysinfo", "getrlimit", "prlimit64", "getrusage",
    # lazy imports look around before opening read-only
    "readlink", "readlinkat", "getcwd", "access", "faccessat", "faccessat2",
})

# -- constants of the kernel ABI ------------------------------------------------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_LOG = 0x7FFC0000
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_PR_SET_NO_NEW_PRIVS = 38
_SYS_SECCOMP = 317
_CLONE_THREAD = 0x00010000
_WRITE_OPEN_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# classic BPF opcodes
_BPF_LD_W_ABS = 0x20   # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15      # BPF_JMP | BPF_JEQ | BPF_K
_BPF_JGE_K = 0x35      # BPF_JMP | BPF_JGE | BPF_K
_BPF_JSET_K = 0x45     # BPF_JMP | BPF_JSET | BPF_K
_BPF_RET_K = 0x06      # BPF_RET | BPF_K
_BPF_MAXINSNS = 4096

# struct seccomp_data offsets
_NR_OFFSET = 0
_ARCH_OFFSET = 4


def _arg_low_offset(index: int) -> int:
    return 16 + 8 * index  # args[i], low 32 bits (little endian)


_Insn = tuple[int, int, int, int]


def _stmt(code: int, k: int) -> _Insn:
    return (code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> _Insn:
    return (code, jt, jf, k)


def _action_value(action: FilterAction) -> int:
    return {FilterAction.ERRNO: _SECCOMP_RET_ERRNO | errno.EPERM,
            FilterAction.KILL: _SECCOMP_RET_KILL_PROCESS,
            FilterAction.LOG: _SECCOMP_RET_LOG}[action]


def syscall_number(name: str) -> int:
    try:
        return SYSCALL_NUMBERS[name]
    except KeyError:
        raise SeccompError(f"unknown system call {name!r} (not in microvmm.host.seccomp.SYSCALL_NUMBERS)") from None


def build_filter(allowed: Iterable[str] = ALLOWED_SYSCALLS, action: FilterAction = FilterAction.ERRNO,
                 allow_write_open: bool = False) -> list[_Insn]:
    """The BPF program as (code, jt, jf, k) instructions."""
    deny = _action_value(action)
    numbers = sorted({syscall_number(name) for name in allowed}
                     - {SYSCALL_NUMBERS[n] for n in ("open", "openat", "clone", "clone3")})
    program: list[_Insn] = [
        _stmt(_BPF_LD_W_ABS, _ARCH_OFFSET),
        _jump(_BPF_JEQ_K, _AUDIT_ARCH_X86_64, 1, 0),
        _stmt(_BPF_RET_K, deny),
        _stmt(_BPF_LD_W_ABS, _NR_OFFSET),
        _jump(_BPF_JGE_K, _X32_SYSCALL_BIT, 0, 1),
        _stmt(_BPF_RET_K, deny),
    ]
    for number in numbers:
        program += [_jump(_BPF_JEQ_K, number, 0, 1), _stmt(_BPF_RET_K, _SECCOMP_RET_ALLOW)]

    def flag_check(nr: int, arg: int, mask: int, allow_if_set: bool) -> list[_Insn]:
        # the block returns on every path, so reloading nr afterwards is unnecessary
        first, second = (_SECCOMP_RET_ALLOW, deny) if allow_if_set else (deny, _SECCOMP_RET_ALLOW)
        return [_jump(_BPF_JEQ_K, nr, 0, 4),
                _stmt(_BPF_LD_W_ABS, _arg_low_offset(arg)),
                _jump(_BPF_JSET_K, mask, 0, 1),
                _stmt(_BPF_RET_K, first),
                _stmt(_BPF_RET_K, second)]

    for name, arg in (("openat", 2), ("open", 1)):
        if allow_write_open:
            program += [_jump(_BPF_JEQ_K, SYSCALL_NUMBERS[name], 0, 1), _stmt(_BPF_RET_K, _SECCOMP_RET_ALLOW)]
        else:
            # the openat block clobbers the accumulator only on paths that return
            program += flag_check(SYSCALL_NUMBERS[name], arg, _WRITE_OPEN_FLAGS, allow_if_set=False)
    program += [_jump(_BPF_JEQ_K, SYSCALL_NUMBERS["clone3"], 0, 1),
                _stmt(_BPF_RET_K, _SECCOMP_RET_ERRNO | errno.ENOSYS)]
    program += flag_check(SYSCALL_NUMBERS["clone"], 0, _CLONE_THREAD, allow_if_set=True)
    program.append(_stmt(_BPF_RET_K, deny))
    if len(program) > _BPF_MAXINSNS:
        raise SeccompError(f"filter of {len(program)} instructions exceeds {_BPF_MAXINSNS}")
    return program


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def supported() -> tuple[bool, str]:
    """Whether this process can install the filter, and if not why."""
    if platform.system() != "Linux":
        return False, "seccomp filters need Linux"
    if platform.machine() != "x86_64":
        return False, f"the filter knows x86-64 system call numbers only, not {platform.machine()}"
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            if not any(line.startswith("Seccomp:") for line in status):
                return False, "this kernel has no seccomp support"
    except OSError as exc:
        return False, f"cannot read /proc/self/status: {exc.strerror}"
    return True, ""


def install_filter(extra_allowed: Iterable[str] = (), *, action: FilterAction = FilterAction.ERRNO,
                   allow_write_open: bool = False) -> None:
    """Restrict every thread of this process to ALLOWED_SYSCALLS + extra_allowed, for good.

    Sets no_new_privs (required to install a filter without CAP_SYS_ADMIN, and
    right for a VMM anyway). Raises SeccompError if the kernel refuses.
    """
    ok, why = supported()
    if not ok:
        raise SeccompError(why)
    program = build_filter(ALLOWED_SYSCALLS | frozenset(extra_allowed), action, allow_write_open)
    packed = b"".join(struct.pack("<HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(packed, len(packed))
    fprog = _SockFprog(len(program), ctypes.cast(buffer, ctypes.c_void_p))
    if not allow_write_open:
        # Creating .pyc files for modules imported later would be refused (or,
        # in KILL mode, fatal): don't try.
        sys.dont_write_bytecode = True
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(_SYS_SECCOMP), ctypes.c_ulong(_SECCOMP_SET_MODE_FILTER),
                          ctypes.c_ulong(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if result < 0:
        err = ctypes.get_errno()
        raise SeccompError(f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
    if result > 0:
        raise SeccompError(f"seccomp: thread {result} could not be synchronised to the filter")
    logger.info("seccomp filter installed: %d system calls allowed, others %s",
                len(ALLOWED_SYSCALLS | frozenset(extra_allowed)) + 3, action.value)
