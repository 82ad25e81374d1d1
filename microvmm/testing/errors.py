"""Exceptions of microvmm.testing: a VM that cannot be used, and waits that came to nothing."""

from __future__ import annotations


class MicroVMError(Exception):
    """A VM could not be booted or used; the message carries the console's last lines."""


class MicroVMTimeout(MicroVMError, AssertionError):
    """Something expected from the guest did not come in time (a test failure, not an error)."""


class AgentError(MicroVMError):
    """The guest's agent refused a request or broke the protocol."""


class GuestTimeout(MicroVMTimeout):
    """Expected console output did not appear in time; the message shows what did."""
