"""Reading part of an image file straight into guest memory (preadv, no GIL)."""

from __future__ import annotations

import os


def pread_into(fd: int, target: memoryview, offset: int) -> int:
    """Fill `target` from the file at `offset` with preadv(); returns the bytes
    read, fewer than len(target) only where the file ends. OSError passes through.

    The read drops the GIL, page faults on fresh guest RAM included: the VMM
    loads images this way on a helper thread while its main thread imports.
    """
    done = 0
    while done < len(target):
        count = os.preadv(fd, [target[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done
