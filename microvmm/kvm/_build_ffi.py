"""Regenerate the committed out-of-line cffi module ``_kvm_cffi.py``.

Run ``python3 -m microvmm.kvm._build_ffi`` after editing ``_abi.CDEF``.
The generated module only needs ``_cffi_backend`` at import time: no C
compiler, and no parsing of C declarations (pycparser is slow), which keeps
VMM start-up fast. ``tests/test_kvm_abi.py`` fails if the committed module is
stale.
"""

from __future__ import annotations

import io
import pathlib

from cffi import FFI

from microvmm.kvm._abi import CDEF

MODULE_NAME = "microvmm.kvm._kvm_cffi"
MODULE_PATH = pathlib.Path(__file__).with_name("_kvm_cffi.py")


def generate() -> str:
    """The source text of the out-of-line ABI module for ``CDEF``."""
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(MODULE_NAME, None)
    out = io.StringIO()
    builder.emit_python_code(out)
    return out.getvalue()


def main() -> None:
    MODULE_PATH.write_text(generate())
    print(f"wrote {MODULE_PATH}")


if __name__ == "__main__":
    main()
