"""A bzImage's payload decompressed on the host and booted as its ELF vmlinux.

The payloads are built the way arch/x86/boot/compressed/Makefile builds them:
the ELF compressed with the format's tool, then (all but gzip) the 4-byte
little-endian uncompressed size appended (scripts/Makefile.lib size_append).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import lz4.block
import pytest

from boot_testimages import BZ_SETUP_SIZE, make_bzimage, make_elf
from microvmm.boot import (BzImageError, KernelFormat, PayloadCorruptError, PayloadFormat,
                           PayloadLocationError, PayloadNotElfError, PayloadTooLargeError,
                           UnsupportedPayloadError, decompress_bzimage_payload, guest_ram_layout,
                           setup_linux_boot)
from microvmm.memory import GuestMemory

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
DECOMPRESSOR_STUB = b"\xcc" * 0x400  # stands in for the decompressor code before the payload
TEXT_ADDR, DATA_ADDR, ENTRY = 0x100_0000, 0x140_0000, 0x100_0040
TEXT = bytes(range(256)) * 32  # 8 KiB
DATA = b"initialised data" * 64
BSS_TAIL = 0x3000


def kernel_elf() -> bytes:
    """A small vmlinux: text, and data with a bss tail; plus a fake relocation table."""
    elf = make_elf([(TEXT_ADDR, TEXT, len(TEXT)), (DATA_ADDR, DATA, len(DATA) + BSS_TAIL)],
                   entry=ENTRY, extra_phdrs=1)
    return elf + struct.pack("<3I", 0x1234, 0x5678, 0)  # relocs follow vmlinux.bin


def size_append(data: bytes) -> bytes:
    return struct.pack("<I", len(data))


def lz4_legacy(data: bytes, block: int = 8 * MiB) -> bytes:
    out = struct.pack("<I", 0x184C2102)
    for start in range(0, len(data), block):
        chunk = lz4.block.compress(data[start:start + block], store_size=False)
        out += struct.pack("<I", len(chunk)) + chunk
    return out


def compress(fmt: str, data: bytes) -> bytes:
    if fmt == "gzip":
        return gzip.compress(data, 9, mtime=0)
    if fmt == "xz":
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
        return lzma.compress(data, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                             filters=filters) + size_append(data)
    if fmt == "lzma":
        return lzma.compress(data, lzma.FORMAT_ALONE) + size_append(data)
    if fmt == "bzip2":
        return bz2.compress(data, 9) + size_append(data)
    if fmt == "lz4":
        return lz4_legacy(data) + size_append(data)
    raise ValueError(fmt)


def bzimage_with_payload(payload: bytes, *, offset: int | None = None,
                         length: int | None = None, **kwargs) -> bytes:
    """make_bzimage, its protected-mode part replaced by stub + payload, header pointing at it."""
    pm = DECOMPRESSOR_STUB + payload + b"\xee" * 16  # the kernel puts code after it too
    pm += bytes(-len(pm) % 16)
    image = bytearray(make_bzimage(pm_size=16, **kwargs)[:BZ_SETUP_SIZE]) + pm
    struct.pack_into("<I", image, 0x1F4, len(pm) // 16)  # syssize
    struct.pack_into("<I", image, 0x248, len(DECOMPRESSOR_STUB) if offset is None else offset)
    struct.pack_into("<I", image, 0x24C, len(payload) if length is None else length)
    return bytes(image)


@pytest.fixture
def mem():
    memory = GuestMemory(guest_ram_layout(64 * MiB))
    yield memory
    memory.close()


FORMATS = ["gzip", "xz", "lzma", "bzip2", "lz4"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_decompresses_to_the_elf(fmt):
    elf = kernel_elf()
    result = decompress_bzimage_payload(bzimage_with_payload(compress(fmt, elf)), "bz")
    assert result.format is PayloadFormat(fmt)
    assert result.elf == elf


@pytest.mark.parametrize("fmt", FORMATS)
def test_bzimage_boots_as_its_elf(mem, fmt):
    image = bzimage_with_payload(compress(fmt, kernel_elf()), cmdline_size=300,
                                 initrd_addr_max=0x2FFF_FFFF)
    initrd = os.urandom(50_000)
    seed = os.urandom(32)
    # Dirty the bss first: the loader must zero it.
    mem.write(DATA_ADDR + len(DATA), b"\xff" * BSS_TAIL)
    info = setup_linux_boot(mem, image, "console=hvc0", initrd, kernel_source="bz",
                            rng_seed=seed, bzimage_payload_as_elf=True)
    assert info.kernel_format is KernelFormat.BZIMAGE
    assert info.payload_format == fmt and info.payload_fallback_reason is None
    assert info.payload_elf_size == len(kernel_elf())
    # ELF segments at p_paddr, entry e_entry: nothing of the bzImage's code is loaded
    assert mem.read(TEXT_ADDR, len(TEXT)) == TEXT
    assert mem.read(DATA_ADDR, len(DATA)) == DATA
    assert mem.read(DATA_ADDR + len(DATA), BSS_TAIL) == bytes(BSS_TAIL)
    assert info.entry == info.cpu_state.rip == ENTRY
    assert info.kernel_load_addr == TEXT_ADDR
    assert info.kernel_end == DATA_ADDR + len(DATA) + BSS_TAIL
    # the zero page carries the bzImage's real header, not a synthesized one
    assert mem.read(0x7000 + 0x1F1, 0x206 - 0x1F1) == image[0x1F1:0x206]
    assert mem.read_u16(0x7000 + 0x206) == 0x020F  # version
    assert mem.read_u32(0x7000 + 0x238) == 300  # cmdline_size
    assert mem.read_u32(0x7000 + 0x22C) == 0x2FFF_FFFF  # initrd_addr_max
    assert mem.read_u16(0x7000 + 0x236) == 0x3  # xloadflags
    assert mem.read_u32(0x7000 + 0x248) == len(DECOMPRESSOR_STUB)  # payload_offset
    assert mem.read_u32(0x7000 + 0x268) == 0x5A5A  # kernel_info_offset marker
    assert info.setup_header.cmdline_size == 300
    # command line, initrd and setup_data as on every other path
    assert mem.read_u32(0x7000 + 0x228) == info.cmdline_addr
    assert mem.read(info.cmdline_addr, 13) == b"console=hvc0\0"
    assert info.initrd_addr is not None and info.initrd_addr >= info.kernel_end
    assert info.initrd_addr + len(initrd) <= 0x2FFF_FFFF + 1
    assert mem.read_u32(0x7000 + 0x218) == info.initrd_addr
    assert mem.read_u32(0x7000 + 0x21C) == len(initrd)
    assert mem.read(info.initrd_addr, len(initrd)) == initrd
    assert info.setup_data_addr and mem.read_u64(0x7000 + 0x250) == info.setup_data_addr
    assert mem.read(info.setup_data_addr + 16, 32) == seed


def test_a_payload_decompressed_beforehand_boots_the_same(mem):
    """The VMM decompresses on its image thread (decompress_bzimage) and hands
    setup_linux_boot the result: same BootInfo (but the time), same guest RAM."""
    from microvmm.boot import DecompressedBzImage, decompress_bzimage
    image = bzimage_with_payload(compress("lz4", kernel_elf()))
    initrd = os.urandom(20_000)
    expected = setup_linux_boot(mem, image, "console=hvc0", initrd, bzimage_payload_as_elf=True)
    expected_ram = mem.read(0, 64 * MiB)
    predecoded = decompress_bzimage(image, "kernel")
    assert isinstance(predecoded, DecompressedBzImage) and predecoded.image is image
    assert predecoded.seconds > 0
    fresh = GuestMemory(guest_ram_layout(64 * MiB))
    try:
        info = setup_linux_boot(fresh, predecoded, "console=hvc0", initrd, bzimage_payload_as_elf=True)
        assert info._replace(payload_decompress_seconds=0) == expected._replace(payload_decompress_seconds=0)
        assert info.payload_decompress_seconds == predecoded.seconds
        assert fresh.read(0, 64 * MiB) == expected_ram
    finally:
        fresh.close()


def test_without_the_flag_the_bzimage_boots_through_its_decompressor(mem):
    image = bzimage_with_payload(compress("lz4", kernel_elf()))
    info = setup_linux_boot(mem, image, "", kernel_source="bz")
    assert info.payload_format is None and info.payload_fallback_reason is None
    assert info.entry == 0x100_0200
    assert mem.read(0x100_0000, len(image) - BZ_SETUP_SIZE) == image[BZ_SETUP_SIZE:]


def test_an_elf_kernel_ignores_the_flag(mem):
    info = setup_linux_boot(mem, kernel_elf(), "", bzimage_payload_as_elf=True)
    assert info.kernel_format is KernelFormat.ELF and info.payload_format is None
    assert info.payload_fallback_reason is None and info.entry == ENTRY


@pytest.mark.parametrize("magic, name", [(b"\x28\xb5\x2f\xfd", "zstd"), (b"\x89LZO\x00", "lzo"),
                                         (b"\x00\x01\x02\x03", "unknown")])
def test_unsupported_payload_falls_back_to_the_bzimage_path(mem, magic, name):
    image = bzimage_with_payload(magic + b"\x55" * 200)
    with pytest.raises(UnsupportedPayloadError, match=name) as excinfo:
        decompress_bzimage_payload(image, "bz")
    assert excinfo.value.payload_format == name
    info = setup_linux_boot(mem, image, "", kernel_source="bz", bzimage_payload_as_elf=True)
    assert info.payload_format is None
    assert info.payload_fallback_reason is not None and name in info.payload_fallback_reason
    assert info.entry == info.cpu_state.rip == info.kernel_load_addr + 0x200
    assert mem.read(info.kernel_load_addr, len(image) - BZ_SETUP_SIZE) == image[BZ_SETUP_SIZE:]


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_payload(fmt):
    payload = bytearray(compress(fmt, kernel_elf()))
    # The LZ4 legacy frame has no checksum: damaged literals go unnoticed (by
    # the kernel's own decompressor too), damaged sequence tokens do not.
    middle = 8 if fmt == "lz4" else len(payload) // 2
    payload[middle:middle + 8] = bytes(b ^ 0x5A for b in payload[middle:middle + 8])
    with pytest.raises(PayloadCorruptError, match=fmt):
        decompress_bzimage_payload(bzimage_with_payload(bytes(payload)), "bz")


@pytest.mark.parametrize("fmt", ["gzip", "xz", "lzma", "bzip2"])
def test_truncated_stream(fmt):
    payload = compress(fmt, kernel_elf())
    cut = payload[:len(payload) * 2 // 3]
    with pytest.raises(PayloadCorruptError, match=fmt):
        decompress_bzimage_payload(bzimage_with_payload(cut), "bz")


def test_lz4_blocks_must_add_up_to_the_appended_size():
    elf = kernel_elf()
    frame = lz4_legacy(elf)
    with pytest.raises(PayloadCorruptError, match="appended"):
        decompress_bzimage_payload(bzimage_with_payload(frame + struct.pack("<I", len(elf) + 1)))
    # a block size running past the end of the payload
    bad = bytearray(frame + size_append(elf))
    struct.pack_into("<I", bad, 4, len(bad))
    with pytest.raises(PayloadCorruptError, match="claims"):
        decompress_bzimage_payload(bzimage_with_payload(bytes(bad)))


def test_lz4_multi_block_and_concatenated_frames():
    # An ELF just over one 8 MiB block; the second half as a second legacy frame.
    elf = kernel_elf() + bytes(range(251)) * (33 * 1024)
    assert len(elf) > 8 * MiB
    payload = lz4_legacy(elf[:8 * MiB]) + lz4_legacy(elf[8 * MiB:]) + size_append(elf)
    assert decompress_bzimage_payload(bzimage_with_payload(payload)).elf == elf


@pytest.mark.parametrize("offset, length, match", [
    (0x400, 0, "payload_length is 0"),
    (0x10_0000, 16, "runs past"),
    (0x400, 0x10_0000, "runs past"),
    (0xFFFF_FFF0, 0x20, "runs past"),
])
def test_payload_location_is_checked(offset, length, match):
    image = bzimage_with_payload(compress("gzip", kernel_elf()), offset=offset, length=length)
    with pytest.raises(PayloadLocationError, match=match):
        decompress_bzimage_payload(image)


def test_bad_location_is_an_error_not_a_fallback(mem):
    image = bzimage_with_payload(compress("gzip", kernel_elf()), length=0x10_0000)
    with pytest.raises(PayloadLocationError):
        setup_linux_boot(mem, image, "", bzimage_payload_as_elf=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decompression_bomb_is_refused_within_the_limit(fmt):
    zeros = b"\x7fELF" + bytes(3 * MiB)
    with pytest.raises(PayloadTooLargeError, match="more than 2 MiB"):
        decompress_bzimage_payload(bzimage_with_payload(compress(fmt, zeros)), max_size=2 * MiB)


def test_lz4_size_word_over_the_limit_is_refused_before_decoding():
    payload = lz4_legacy(b"\x7fELF") + struct.pack("<I", 0xFFFF_FFFF)
    with pytest.raises(PayloadTooLargeError):
        decompress_bzimage_payload(bzimage_with_payload(payload))


@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_that_is_not_an_elf(mem, fmt):
    image = bzimage_with_payload(compress(fmt, b"MZ not a kernel" * 100))
    with pytest.raises(PayloadNotElfError, match="not an ELF"):
        decompress_bzimage_payload(image)
    with pytest.raises(PayloadNotElfError):
        setup_linux_boot(mem, image, "", bzimage_payload_as_elf=True)


def test_header_is_validated_first():
    image = bzimage_with_payload(compress("gzip", kernel_elf()), xloadflags=0)
    with pytest.raises(BzImageError, match="XLF_KERNEL_64"):
        decompress_bzimage_payload(image)


# The same formats as the kernel build makes them, with the real tools
# (arch/x86/boot/compressed/Makefile, scripts/Makefile.lib cmd_*_with_size).
KERNEL_BUILD_COMMANDS = {
    "gzip": (["gzip", "-n", "-f", "-9"], False),
    "bzip2": (["bzip2", "-9"], True),
    "lzma": (["lzma", "-9"], True),
    "xz": (["xz", "--check=crc32", "--x86", "--lzma2=,dict=32MiB"], True),
    "lz4": (["lz4", "-l", "-9", "-", "-"], True),
    "zstd": (["zstd", "-22", "--ultra"], True),
}


@pytest.mark.parametrize("fmt", sorted(KERNEL_BUILD_COMMANDS))
def test_payloads_made_by_the_kernel_build_tools(mem, fmt):
    command, with_size = KERNEL_BUILD_COMMANDS[fmt]
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    elf = kernel_elf()
    payload = subprocess.run(command, input=elf, capture_output=True, check=True).stdout
    if with_size:
        payload += size_append(elf)
    image = bzimage_with_payload(payload)
    info = setup_linux_boot(mem, image, "", bzimage_payload_as_elf=True)
    if fmt == "zstd":
        assert info.payload_format is None and "zstd" in info.payload_fallback_reason
        assert info.entry == info.kernel_load_addr + 0x200
    else:
        assert info.payload_format == fmt and info.entry == ENTRY
        assert mem.read(TEXT_ADDR, len(TEXT)) == TEXT


def _pt_loads(elf: bytes):
    phoff, = struct.unpack_from("<Q", elf, 32)
    phnum, = struct.unpack_from("<H", elf, 56)
    for index in range(phnum):
        p_type, _, offset, _, paddr, filesz, memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", elf, phoff + index * 56)
        if p_type == 1:
            yield paddr, elf[offset:offset + filesz], memsz


def test_the_default_guest_bzimage_holds_its_vmlinux():
    bzimage, vmlinux = REPO / "images" / "bzImage", REPO / "images" / "vmlinux"
    if not (bzimage.exists() and vmlinux.exists()):
        pytest.skip("images/bzImage and images/vmlinux not built (guest/build.sh)")
    result = decompress_bzimage_payload(bzimage.read_bytes(), str(bzimage))
    reference = vmlinux.read_bytes()
    assert result.elf[24:32] == reference[24:32]  # e_entry
    assert list(_pt_loads(result.elf)) == list(_pt_loads(reference))


def test_the_vmm_announces_the_workaround_and_its_fallback(mem, caplog):
    from microvmm.vmm import Vmm
    caplog.set_level("WARNING", logger="microvmm.vmm")
    info = setup_linux_boot(mem, bzimage_with_payload(compress("lz4", kernel_elf())), "",
                            bzimage_payload_as_elf=True)
    Vmm._announce_payload_workaround(info)
    assert "host workaround: bzImage: lz4 payload (0.0 MB ELF) decompressed on the host" in caplog.text
    caplog.clear()
    info = setup_linux_boot(mem, bzimage_with_payload(b"\x28\xb5\x2f\xfd" + bytes(64)), "",
                            bzimage_payload_as_elf=True)
    Vmm._announce_payload_workaround(info)
    assert "host workaround: bzImage: not applied:" in caplog.text and "zstd" in caplog.text
    caplog.clear()
    Vmm._announce_payload_workaround(setup_linux_boot(mem, kernel_elf(), ""))
    assert caplog.text == ""
