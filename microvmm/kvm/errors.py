"""Exceptions raised by the KVM bindings."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """A KVM ioctl failed.

    ``str()`` reads like "KVM_CREATE_VM failed: [Errno 22] Invalid argument";
    ``.ioctl`` is the request name and ``.errno`` the error number.
    """

    def __init__(self, ioctl: str, errno: int, detail: str | None = None):
        super().__init__(errno, os.strerror(errno))
        self.ioctl = ioctl
        self.detail = detail

    def __str__(self) -> str:
        text = f"{self.ioctl} failed: [Errno {self.errno}] {self.strerror}"
        return f"{text} ({self.detail})" if self.detail else text

    def __reduce__(self):  # keep the custom constructor when pickled
        return (type(self), (self.ioctl, self.errno, self.detail))


class KvmUnavailableError(OSError):
    """/dev/kvm is missing, inaccessible or speaks an unsupported API.

    ``.fix`` is a one-line hint for the user.
    """

    MISSING_FIX = "load kvm_intel/kvm_amd (modprobe kvm_intel) and enable virtualization in firmware"
    ACCESS_FIX = "add your user to the 'kvm' group (sudo usermod -aG kvm $USER) or run as root"

    def __init__(self, path: str, errno: int, fix: str, reason: str | None = None):
        super().__init__(errno, reason or os.strerror(errno), path)
        self.fix = fix

    def __str__(self) -> str:
        return f"cannot use {self.filename}: {self.strerror}: {self.fix}"

    def __reduce__(self):
        return (type(self), (self.filename, self.errno, self.fix, self.strerror))

    @classmethod
    def from_open_error(cls, path: str, exc: OSError) -> "KvmUnavailableError":
        if exc.errno in (_errno.EACCES, _errno.EPERM):
            fix = cls.ACCESS_FIX
        else:
            fix = cls.MISSING_FIX
        return cls(path, exc.errno or _errno.ENODEV, fix)


class KvmExitDataError(Exception):
    """kvm_run describes exit data that does not fit the shared mapping.

    The kernel should never do this; the check keeps a bad value from turning
    into an out-of-bounds host access.
    """


class SoftExceptionError(ValueError):
    """``Vcpu.inject_exception`` was asked for #BP or #OF.

    KVM injects those as software exceptions, completions of an INT3/INTO
    instruction at RIP, and each KVM implementation does that differently
    (see ``Vcpu.inject_exception``): there is no portable meaning to give them.
    """
