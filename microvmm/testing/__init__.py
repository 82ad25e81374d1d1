"""Test support: boot microvmm guests from Python and pytest.

* `GuestProcess` (console.py): a `microvmm run` child with its console on
  pipes: expect output, run shell commands on the guest console.
* `MicroVM` (vm.py): a guest booted with socket ports and the default
  initramfs's agent: `run` commands with exact output and status, `port`s.
* `PortChannel` (channels.py), `AgentClient` (agent.py): their parts.
* plugin.py: the pytest plugin (fixtures `microvm`, `microvm_module`,
  `microvm_session`), loaded through the package's `pytest11` entry point.
* fakes/: a fake virtio driver, the soak and hostile-guest harnesses, used by
  tests/, fuzz/ and bench/.

Importing this package does not import pytest.
"""

from microvmm.guest_contract import BOOT_MARKER, PROMPT
from microvmm.testing.agent import AgentClient, CommandResult
from microvmm.testing.channels import PortChannel
from microvmm.testing.console import GuestProcess, default_images
from microvmm.testing.errors import AgentError, GuestTimeout, MicroVMError, MicroVMTimeout
from microvmm.testing.vm import MicroVM, VmSpec, kvm_unusable_reason

__all__ = ["BOOT_MARKER", "PROMPT", "AgentClient", "AgentError", "CommandResult", "GuestProcess", "GuestTimeout",
           "MicroVM", "MicroVMError", "MicroVMTimeout", "PortChannel", "VmSpec", "default_images",
           "kvm_unusable_reason"]
