"""Name the calling OS thread, so that `top -H`, `ps -L` and /proc show which
thread is a vCPU and which the I/O loop (Python's thread names stay inside Python)."""

from __future__ import annotations

#: The kernel keeps 15 bytes of a thread's name (TASK_COMM_LEN 16 with the NUL).
COMM_MAX = 15


def set_os_thread_name(name: str) -> bool:
    """Best effort: False if /proc is not there or a seccomp filter refuses the open."""
    try:
        with open("/proc/thread-self/comm", "w", encoding="ascii", errors="replace") as comm:
            comm.write(name[:COMM_MAX])
        return True
    except OSError:
        return False
