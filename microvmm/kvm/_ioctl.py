"""The one place that issues KVM ioctls."""

from __future__ import annotations

import errno

from microvmm.kvm._ffi import ffi, libc
from microvmm.kvm.constants import Ioctl
from microvmm.kvm.errors import KvmError

_ioctl = libc.ioctl
_cast = ffi.cast


def ioctl(fd: int, request: Ioctl, arg=ffi.NULL) -> int:
    """Issue ``request`` on ``fd``; ``arg`` is a cffi pointer or an int.

    Returns the ioctl's non-negative result; raises KvmError on failure.
    EINTR is retried (PEP 475 style); KVM_RUN does not come through here.
    """
    if isinstance(arg, int):
        arg = _cast("void *", arg)
    while True:
        ret = _ioctl(fd, int(request), arg)
        if ret >= 0:
            return ret
        err = ffi.errno
        if err != errno.EINTR:
            raise KvmError(request.name, err)
