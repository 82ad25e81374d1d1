"""What microvmm and the default guest's init agree on (guest/README.md):
the names of the console ports microvmm reserves, and what init prints.

One place for both sides: the VMM (the kernel's log port, the `-- CMD`
protocol), the run monitor, and microvmm.testing (the agent, the console
driver). Kept free of imports: the start-up path reads it.
"""

from __future__ import annotations

#: The kernel's own log (console=hvcN): only the kernel writes there.
KMSG_PORT = "microvmm.kmsg"
#: `-- CMD` runs: the command's stdout, stderr and exit status.
COMMAND_STDOUT_PORT = "microvmm.stdout"
COMMAND_STDERR_PORT = "microvmm.stderr"
COMMAND_STATUS_PORT = "microvmm.status"
#: The pytest plugin's agent: commands in, replies out (guest/README.md, "Running commands").
AGENT_PORT = "microvmm.agent"

#: Port names a user's --console may not take (they mean something to init or to microvmm).
RESERVED_PORTS = frozenset({KMSG_PORT, COMMAND_STDOUT_PORT, COMMAND_STDERR_PORT, COMMAND_STATUS_PORT,
                            AGENT_PORT})

#: The default init's first line (microvmm/guestbuild/guest/initramfs/init): user space is running.
BOOT_MARKER = "microvmm: init reached"
#: The default guest's shell prompt (its /etc/profile).
PROMPT = "microvmm# "
