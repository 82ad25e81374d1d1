"""The cffi handle for <linux/kvm.h> structures and libc's ioctl().

Normally the committed out-of-line module ``_kvm_cffi`` provides ``ffi``: it
loads in about a millisecond and needs neither a C compiler nor pycparser.
If it cannot be loaded (e.g. a cffi backend that rejects its format), the
same declarations are parsed in-line from ``_abi.CDEF``: slower to import,
identical in behaviour.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _load_ffi():  # -> cffi FFI instance (no stub types for cffi)
    try:
        from microvmm.kvm._kvm_cffi import ffi as out_of_line_ffi
        return out_of_line_ffi
    except Exception as exc:  # noqa: BLE001 - any failure here means "use the fallback"
        logger.warning("out-of-line KVM cffi module unusable (%s); parsing declarations in-line", exc)
        import cffi

        from microvmm.kvm._abi import CDEF

        inline_ffi = cffi.FFI()
        inline_ffi.cdef(CDEF)
        return inline_ffi


ffi = _load_ffi()
# libc of this process: ioctl() through cffi releases the GIL during the call
# (other vCPU and I/O threads run while a vCPU sits in KVM_RUN) and passes
# struct pointers without copying.
libc = ffi.dlopen(None)
