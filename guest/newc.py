"""The newc cpio writer lives in the microvmm package (microvmm/newc.py): the
VMM appends a modules archive to the initramfs with it (`run --modules`).
This module keeps `from newc import ...` working for the guest builder, a
script run from this directory, by importing it from this checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from microvmm.newc import (  # noqa: E402,F401
    FIXED_MTIME, HEADER_SIZE, NEWC_MAGIC, TRAILER_NAME, CpioArchive, CpioEntry, CpioError, EntryKind,
    read_newc, write_newc)
