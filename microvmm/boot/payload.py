"""A bzImage's compressed payload, decompressed on the host into its ELF vmlinux.

The protected-mode part of a bzImage is the kernel's own decompressor plus a
compressed payload: `vmlinux.bin` (the kernel ELF, objcopy'd with -R .comment
-S) followed, for a relocatable kernel, by its relocation table
(arch/x86/boot/compressed/Makefile). The setup header locates it
(payload_offset, relative to the start of the protected-mode code, and
payload_length; boot protocol 2.08+, Documentation/arch/x86/boot.rst).

On a host that emulates guest kernel code the guest's own decompressor takes
tens of seconds (LZ4) to minutes (XZ); the host does the same work in a
fraction of a second. The relocation table is ignored: the ELF is loaded at
its link address (p_paddr), where no relocation applies.

Formats, recognised by their magic as lib/decompress.c does: gzip, xz, legacy
lzma and bzip2 through the standard library; the LZ4 legacy frame through the
`lz4` package. zstd and lzo are not decoded here (UnsupportedPayloadError):
the kernel then decompresses itself in the guest as usual.

The kernel build appends the uncompressed size as a 4-byte little-endian word
to every payload except gzip's (scripts/Makefile.lib `size_append`, the
`*_with_size` commands). The stream decoders stop at their end marker and
leave it unread; the LZ4 legacy frame has no end marker, so its blocks run up
to those last 4 bytes, which give the total the blocks must add up to (as in
the kernel's pre-boot unlz4, which is called with in_len - 4).

Decompression is bounded: no decoder produces more than `max_size` bytes
(plus at most one LZ4 block), so a decompression bomb raises
PayloadTooLargeError instead of exhausting host memory.
"""

from __future__ import annotations

import bz2
import enum
import lzma
import logging
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Protocol

from . import layout
from .bzimage import DecompressedBzImage, SetupHeader, parse_setup_header
from .elf import ELF_MAGIC
from .errors import (PayloadCorruptError, PayloadLocationError, PayloadNotElfError,
                     PayloadTooLargeError, UnsupportedPayloadError)

logger = logging.getLogger(__name__)

#: No kernel ELF (plus relocations) comes near this; a payload decompressing
#: beyond it is refused.
DEFAULT_MAX_PAYLOAD_SIZE = 512 * layout.MiB
#: liblzma's memory for the dictionary: the kernel uses 32 MiB (xz) / 64 MiB (lzma -9).
LZMA_MEMLIMIT = 256 * layout.MiB

LZ4_LEGACY_MAGIC = 0x184C2102
#: Uncompressed size of every block of the LZ4 legacy frame but the last.
LZ4_LEGACY_BLOCK_SIZE = 8 * layout.MiB
SIZE_APPEND_BYTES = 4  # scripts/Makefile.lib size_append


class PayloadFormat(str, enum.Enum):
    GZIP = "gzip"
    XZ = "xz"
    LZMA = "lzma"
    BZIP2 = "bzip2"
    LZ4 = "lz4"
    ZSTD = "zstd"
    LZO = "lzo"
    UNKNOWN = "unknown"


# Leading bytes of each format, as lib/decompress.c's compressed_formats table
# tells them apart.
_MAGICS: tuple[tuple[bytes, PayloadFormat], ...] = (
    (b"\x1f\x8b", PayloadFormat.GZIP),
    (b"\xfd7zXZ\x00", PayloadFormat.XZ),
    (b"\x5d\x00\x00", PayloadFormat.LZMA),
    (b"BZh", PayloadFormat.BZIP2),
    (struct.pack("<I", LZ4_LEGACY_MAGIC), PayloadFormat.LZ4),
    (b"\x28\xb5\x2f\xfd", PayloadFormat.ZSTD),
    (b"\x89LZO", PayloadFormat.LZO),
)

SUPPORTED_FORMATS = frozenset({PayloadFormat.GZIP, PayloadFormat.XZ, PayloadFormat.LZMA,
                               PayloadFormat.BZIP2, PayloadFormat.LZ4})


@dataclass(frozen=True)
class DecompressedPayload:
    """The ELF vmlinux a bzImage carries, and what it was packed as."""

    format: PayloadFormat
    compressed_size: int  # payload_length
    # The ELF, followed by the relocation table of a relocatable kernel: a
    # read-only view of the decoder's buffer (a bytes copy of ~16 MB cost ~7 ms).
    elf: memoryview


def identify_payload_format(payload: bytes | memoryview) -> PayloadFormat:
    head = bytes(payload[:8])
    for magic, payload_format in _MAGICS:
        if head.startswith(magic):
            return payload_format
    return PayloadFormat.UNKNOWN


def locate_payload(image: bytes | memoryview, header: SetupHeader,
                   source: str = "bzImage") -> memoryview:
    """The compressed payload bytes of a bzImage whose header was validated already."""
    pm_start = header.setup_size
    pm_size = min(header.protected_mode_size, len(image) - pm_start)
    offset, length = header.payload_offset, header.payload_length
    if length == 0:
        raise PayloadLocationError(f"{source}: payload_length is 0: the header names no payload")
    if offset >= pm_size or length > pm_size - offset:
        raise PayloadLocationError(
            f"{source}: payload at offset {offset:#x}, length {length:#x} runs past the "
            f"{pm_size:#x}-byte protected-mode kernel")
    return memoryview(image)[pm_start + offset:pm_start + offset + length]


class _StreamDecompressor(Protocol):
    eof: bool
    needs_input: bool

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


def _check_size(produced: int, max_size: int, payload_format: PayloadFormat,
                source: str) -> None:
    if produced > max_size:
        raise PayloadTooLargeError(
            f"{source}: {payload_format.value} payload decompresses to more than "
            f"{max_size // layout.MiB} MiB: refused (no kernel is that large)")


def _decode_stream(decompressor: _StreamDecompressor, data: bytes | memoryview,
                   max_size: int, payload_format: PayloadFormat, source: str) -> bytearray:
    """Drive an lzma/bz2 decompressor object, never asking for more than max_size + 1 bytes."""
    out = bytearray()
    try:
        chunk = decompressor.decompress(bytes(data), max_size + 1)
        while True:
            out += chunk
            _check_size(len(out), max_size, payload_format, source)
            if decompressor.eof:
                return out
            if decompressor.needs_input:
                raise PayloadCorruptError(
                    f"{source}: {payload_format.value} payload is truncated: the stream ends "
                    f"after {len(out)} bytes of output without its end marker")
            chunk = decompressor.decompress(b"", max_size + 1 - len(out))
    except (lzma.LZMAError, OSError, EOFError, ValueError) as err:
        raise PayloadCorruptError(
            f"{source}: {payload_format.value} payload does not decompress: {err}") from err


def _decode_gzip(data: bytes | memoryview, max_size: int, source: str) -> bytearray:
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper: checks CRC32 and ISIZE
    out = bytearray()
    pending = bytes(data)
    try:
        while True:
            chunk = decompressor.decompress(pending, max_size + 1 - len(out))
            out += chunk
            _check_size(len(out), max_size, PayloadFormat.GZIP, source)
            if decompressor.eof:
                return out
            pending = decompressor.unconsumed_tail
            if not pending and not chunk:
                raise PayloadCorruptError(
                    f"{source}: gzip payload is truncated: the stream ends after {len(out)} "
                    f"bytes of output without its trailer")
    except zlib.error as err:
        raise PayloadCorruptError(f"{source}: gzip payload does not decompress: {err}") from err


def _decode_lz4_legacy(data: bytes | memoryview, max_size: int, source: str) -> bytearray:
    """The LZ4 legacy frame: magic, then [u32 LE compressed size][block]..., then size_append."""
    try:
        import lz4.block
    except ImportError as err:
        raise UnsupportedPayloadError(
            f"{source}: lz4 payload, but the Python package 'lz4' is not installed "
            f"(pip install lz4)", PayloadFormat.LZ4.value) from err
    view = memoryview(data)
    if len(view) < 4 + SIZE_APPEND_BYTES:
        raise PayloadCorruptError(f"{source}: lz4 payload is truncated: {len(view)} bytes")
    blocks_end = len(view) - SIZE_APPEND_BYTES
    declared, = struct.unpack_from("<I", view, blocks_end)
    _check_size(declared, max_size, PayloadFormat.LZ4, source)
    out = bytearray()
    pos = 4  # past the magic
    while pos < blocks_end:
        if blocks_end - pos < 4:
            raise PayloadCorruptError(
                f"{source}: lz4 payload is truncated: {blocks_end - pos} stray bytes at {pos:#x} "
                f"where a block size belongs")
        block_size, = struct.unpack_from("<I", view, pos)
        pos += 4
        if block_size == LZ4_LEGACY_MAGIC:  # concatenated frames: another header
            continue
        if block_size == 0 or block_size > blocks_end - pos:
            raise PayloadCorruptError(
                f"{source}: lz4 payload is corrupt: block at {pos - 4:#x} claims {block_size} "
                f"bytes, {blocks_end - pos} remain")
        try:
            out += lz4.block.decompress(view[pos:pos + block_size],
                                        uncompressed_size=LZ4_LEGACY_BLOCK_SIZE)
        except lz4.block.LZ4BlockError as err:
            raise PayloadCorruptError(
                f"{source}: lz4 payload does not decompress: block at {pos - 4:#x}: {err}") from err
        _check_size(len(out), max_size, PayloadFormat.LZ4, source)
        pos += block_size
    if len(out) != declared:
        raise PayloadCorruptError(
            f"{source}: lz4 payload is corrupt: its blocks give {len(out)} bytes, but the size "
            f"appended by the kernel build says {declared}")
    return out


def decompress_payload(payload: bytes | memoryview, source: str = "bzImage", *,
                       max_size: int = DEFAULT_MAX_PAYLOAD_SIZE) -> tuple[PayloadFormat, bytearray]:
    """Decompress a bzImage payload by its magic. Raises a PayloadError subclass."""
    payload_format = identify_payload_format(payload)
    if payload_format is PayloadFormat.GZIP:
        out = _decode_gzip(payload, max_size, source)
    elif payload_format is PayloadFormat.XZ:
        out = _decode_stream(lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT),
                             payload, max_size, payload_format, source)
    elif payload_format is PayloadFormat.LZMA:
        out = _decode_stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=LZMA_MEMLIMIT),
                             payload, max_size, payload_format, source)
    elif payload_format is PayloadFormat.BZIP2:
        out = _decode_stream(bz2.BZ2Decompressor(), payload, max_size, payload_format, source)
    elif payload_format is PayloadFormat.LZ4:
        out = _decode_lz4_legacy(payload, max_size, source)
    else:
        what = ("an unknown format (starts with " + bytes(payload[:6]).hex(" ") + ")"
                if payload_format is PayloadFormat.UNKNOWN else payload_format.value)
        raise UnsupportedPayloadError(
            f"{source}: payload is compressed with {what}, which the VMM does not decompress",
            payload_format.value)
    return payload_format, out


def decompress_bzimage_payload(image: bytes | memoryview, source: str = "bzImage", *,
                               max_size: int = DEFAULT_MAX_PAYLOAD_SIZE) -> DecompressedPayload:
    """Extract a bzImage's payload and decompress it to the kernel's ELF vmlinux.

    Pure function of the image bytes. Raises BzImageError for a bad header,
    UnsupportedPayloadError for a format not decoded here (the caller can boot
    the bzImage the usual way), and PayloadLocationError, PayloadCorruptError,
    PayloadTooLargeError or PayloadNotElfError for a payload that is broken.
    """
    header = parse_setup_header(image, source)
    payload = locate_payload(image, header, source)
    payload_format, out = decompress_payload(payload, source, max_size=max_size)
    if not out.startswith(ELF_MAGIC):
        raise PayloadNotElfError(
            f"{source}: {payload_format.value} payload decompresses to {len(out)} bytes that "
            f"are not an ELF file (start {bytes(out[:8])!r})")
    logger.debug("%s: %s payload of %d bytes -> %d bytes of ELF", source,
                 payload_format.value, len(payload), len(out))
    return DecompressedPayload(format=payload_format, compressed_size=len(payload),
                               elf=memoryview(out).toreadonly())


def decompress_bzimage(image: bytes | memoryview, source: str = "bzImage") -> DecompressedBzImage:
    """decompress_bzimage_payload, timed, with the image: what setup_linux_boot takes
    as its kernel when the caller decompressed the payload beforehand."""
    started = time.perf_counter()
    payload = decompress_bzimage_payload(image, source)
    return DecompressedBzImage(image, payload, time.perf_counter() - started)
