"""Tests for the guest image builder (microvmm/guestbuild/): cpio writer, cache key, config verification.

No kernel is built here; if images/ exists (built by `make images`), its
kernel.config and initramfs are checked against the sources.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest

from microvmm.initramfs import newc
from microvmm.guestbuild import GUEST_SOURCES as GUEST
from microvmm.guestbuild import cache, errors, initramfs, kconfig, kernel, packages

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"

VERSIONS = {"linux-source-6.1": "6.1.192-2", "busybox-static": "1:1.35.0-4", "gcc": "gcc 12.2.0"}


# ----------------------------------------------------------------------------- cpio writer


def _sample_archive() -> newc.CpioArchive:
    archive = newc.CpioArchive()
    archive.add_directory("bin")
    archive.add_directory("tmp", 0o1777)
    archive.add_directory("dev")
    archive.add_file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3 + b"x", 0o755)
    archive.add_symlink("bin/sh", "/bin/busybox")
    archive.add_char_device("dev/console", 5, 1, 0o600)
    archive.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    archive.add_file("empty", b"", 0o644)
    return archive


def test_cpio_round_trip_preserves_names_modes_links_and_bytes() -> None:
    blob = _sample_archive().to_bytes()
    entries = {e.path: e for e in newc.read_newc(blob)}
    assert set(entries) == {"bin", "tmp", "dev", "bin/busybox", "bin/sh", "dev/console", "init", "empty"}
    assert entries["bin"].kind is newc.EntryKind.DIRECTORY
    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert entries["bin/busybox"].data == b"\x7fELF" + bytes(range(256)) * 3 + b"x"
    assert entries["bin/sh"].kind is newc.EntryKind.SYMLINK
    assert entries["bin/sh"].data == b"/bin/busybox"
    assert (entries["dev/console"].kind, entries["dev/console"].rdev_major, entries["dev/console"].rdev_minor) \
        == (newc.EntryKind.CHAR_DEVICE, 5, 1)
    assert entries["init"].data == b"#!/bin/sh\necho hi\n"
    assert entries["empty"].data == b""
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == newc.FIXED_MTIME for e in entries.values())


def test_cpio_layout_is_newc_with_4_byte_alignment_and_trailer() -> None:
    blob = _sample_archive().to_bytes()
    assert blob.startswith(b"070701")
    assert len(blob) % 4 == 0
    assert b"TRAILER!!!\0" in blob[-128:]
    # Every header starts on a 4-byte boundary: walk them like the kernel does.
    offset, names = 0, []
    while True:
        assert offset % 4 == 0 and blob[offset:offset + 6] == b"070701"
        namesize = int(blob[offset + 94:offset + 102], 16)
        filesize = int(blob[offset + 54:offset + 62], 16)
        name = blob[offset + 110:offset + 110 + namesize - 1].decode()
        names.append(name)
        if name == "TRAILER!!!":
            break
        offset += 110 + namesize
        offset += -offset % 4
        offset += filesize + (-filesize % 4)
    assert names[-1] == "TRAILER!!!"


def test_cpio_is_deterministic_and_sorted_parents_first() -> None:
    first = _sample_archive()
    # Same entries added in another order must give the same bytes.
    second = newc.CpioArchive()
    for entry in reversed(list(first.entries.values())):
        second.add(entry)
    assert first.to_bytes() == second.to_bytes()
    order = [e.path for e in newc.read_newc(first.to_bytes())]
    assert order.index("bin") < order.index("bin/busybox")
    assert order.index("dev") < order.index("dev/console")
    assert order == sorted(order, key=lambda p: p.split("/"))


def test_cpio_matches_gnu_cpio_listing(tmp_path: Path) -> None:
    cpio = shutil.which("cpio")
    if cpio is None:
        pytest.skip("GNU cpio not installed")
    import subprocess
    blob = _sample_archive().to_bytes()
    listing = subprocess.run([cpio, "-t", "-v", "--quiet"], input=blob, capture_output=True, check=True).stdout
    text = listing.decode()
    assert "bin/sh -> /bin/busybox" in text
    assert "drwxrwxrwt" in text  # tmp with sticky bit
    subprocess.run([cpio, "-i", "-d", "--quiet", "--no-absolute-filenames", "--nonmatching", "dev/console"],
                   input=blob, cwd=tmp_path, check=True)
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/sh").is_symlink() and str((tmp_path / "bin/sh").readlink()) == "/bin/busybox"


@pytest.mark.parametrize("bad", ["/abs", "a/../b", "trailing/", "", "a//b", "./x"])
def test_cpio_rejects_unsafe_paths(bad: str) -> None:
    with pytest.raises(newc.CpioError):
        newc.CpioEntry(bad, newc.EntryKind.FILE, 0o644, b"")


def test_cpio_rejects_missing_parent_directory() -> None:
    archive = newc.CpioArchive()
    archive.add_file("etc/profile", b"x")
    with pytest.raises(newc.CpioError, match="etc"):
        archive.to_bytes()


def test_cpio_reader_rejects_corruption() -> None:
    blob = bytearray(_sample_archive().to_bytes())
    with pytest.raises(newc.CpioError):
        newc.read_newc(bytes(blob[:200]))
    blob[0:6] = b"070707"
    with pytest.raises(newc.CpioError, match="magic"):
        newc.read_newc(bytes(blob))


# ----------------------------------------------------------------------------- cache key


@pytest.fixture
def guest_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "guest"
    shutil.copytree(GUEST, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_cache_key_is_stable(guest_copy: Path) -> None:
    assert cache.compute_cache_key(guest_copy, VERSIONS) == cache.compute_cache_key(GUEST, VERSIONS)


def test_cache_key_changes_with_fragment(guest_copy: Path) -> None:
    before = cache.compute_cache_key(guest_copy, VERSIONS)
    with (guest_copy / "kernel.config").open("a") as fragment:
        fragment.write("CONFIG_NET=y\n")
    assert cache.compute_cache_key(guest_copy, VERSIONS) != before


def test_cache_key_changes_with_patch_content_and_new_patch(guest_copy: Path) -> None:
    before = cache.compute_cache_key(guest_copy, VERSIONS)
    patch = sorted((guest_copy / "patches").glob("*.patch"))[0]
    patch.write_text(patch.read_text().replace("regs->ax = -ENOSYS;", "regs->ax = -EINVAL;"))
    changed = cache.compute_cache_key(guest_copy, VERSIONS)
    assert changed != before
    (guest_copy / "patches" / "0002-extra.patch").write_text("--- a/x\n+++ b/x\n")
    assert cache.compute_cache_key(guest_copy, VERSIONS) != changed


def test_cache_key_changes_with_initramfs_versions_and_exec_bit(guest_copy: Path) -> None:
    base = cache.compute_cache_key(guest_copy, VERSIONS)
    assert cache.compute_cache_key(guest_copy, {**VERSIONS, "busybox-static": "2"}) != base
    assert cache.compute_cache_key(guest_copy, {**VERSIONS, "linux-source-6.1": "6.1.193-1"}) != base
    init = guest_copy / "initramfs" / "init"
    init.chmod(0o644)
    no_exec = cache.compute_cache_key(guest_copy, VERSIONS)
    assert no_exec != base
    init.chmod(0o755)
    (guest_copy / "initramfs" / "etc" / "profile").write_text("PS1='x# '\n")
    assert cache.compute_cache_key(guest_copy, VERSIONS) not in (base, no_exec)


def test_cache_key_ignores_readme_and_bytecode(guest_copy: Path) -> None:
    before = cache.compute_cache_key(guest_copy, VERSIONS)
    (guest_copy / "README.md").write_text("changed docs\n")
    (guest_copy / "__pycache__").mkdir(exist_ok=True)
    (guest_copy / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert cache.compute_cache_key(guest_copy, VERSIONS) == before


# ----------------------------------------------------------------------------- config verification


def test_parse_kconfig_reads_set_and_unset_options() -> None:
    parsed = kconfig.parse_kconfig(
        "# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_HZ=100\nCONFIG_S=\"x y\"\n\n")
    assert parsed == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_HZ": "100", "CONFIG_S": '"x y"'}


def test_verify_config_detects_options_that_did_not_stick() -> None:
    fragment = kconfig.parse_kconfig(
        "CONFIG_A=y\nCONFIG_HZ=100\n# CONFIG_ACPI is not set\n# CONFIG_VT is not set\nCONFIG_GONE=y\n")
    final = kconfig.parse_kconfig("CONFIG_A=y\nCONFIG_HZ=250\nCONFIG_ACPI=y\n# CONFIG_OTHER is not set\n")
    mismatches = kconfig.verify_config(fragment, final)
    assert {(m.option, m.wanted, m.got) for m in mismatches} == {
        ("CONFIG_HZ", "100", "250"), ("CONFIG_ACPI", "n", "y"), ("CONFIG_GONE", "y", None)}
    error = kconfig.ConfigMismatchError(mismatches)
    assert "CONFIG_HZ: wanted 100, got 250" in str(error)
    assert "CONFIG_GONE: wanted y, got absent" in str(error)


def test_verify_config_accepts_matching_config() -> None:
    fragment = kconfig.parse_kconfig((GUEST / "kernel.config").read_text())
    assert len(fragment) > 40
    final_text = "\n".join(f"# {k} is not set" if v == "n" else f"{k}={v}" for k, v in fragment.items())
    assert kconfig.verify_config(fragment, kconfig.parse_kconfig(final_text)) == []


def test_fragment_requests_the_options_the_host_needs() -> None:
    fragment = kconfig.parse_kconfig((GUEST / "kernel.config").read_text())
    for option in ("CONFIG_64BIT", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_VIRTIO_CONSOLE", "CONFIG_VIRTIO_PCI_LEGACY",
                   "CONFIG_X86_MPPARSE", "CONFIG_KERNEL_LZ4", "CONFIG_BLK_DEV_INITRD", "CONFIG_RD_GZIP",
                   "CONFIG_DEVTMPFS_MOUNT", "CONFIG_CRYPTO_MANAGER_DISABLE_TESTS", "CONFIG_HZ_100",
                   "CONFIG_KVM_GUEST", "CONFIG_UNIX98_PTYS"):
        assert fragment.get(option) == "y", option
    for option in ("CONFIG_ACPI", "CONFIG_VT", "CONFIG_LEGACY_PTYS"):
        assert fragment.get(option) == "n", option


# ----------------------------------------------------------------------------- patches and initramfs


def test_patched_paths_reads_unified_diff_headers() -> None:
    patch = next((GUEST / "patches").glob("0001-*.patch")).read_text()
    assert kernel.patched_paths(patch) == ["arch/x86/mm/fault.c"]
    assert kernel.patched_paths("--- /dev/null\n+++ b/new/file.c\n") == ["new/file.c"]


def test_prepare_work_tree_applies_reverts_and_keeps_pristine(tmp_path: Path) -> None:
    trees = kernel.KernelTrees(tmp_path / "pristine", tmp_path / "work", tmp_path / "build")
    (trees.pristine / "dir").mkdir(parents=True)
    (trees.pristine / "dir" / "f.c").write_text("one\ntwo\nthree\n")
    (trees.pristine / kernel._UNPACKED_MARKER).touch()
    patch1 = tmp_path / "0001-a.patch"
    patch1.write_text("header text\n---\n--- a/dir/f.c\n+++ b/dir/f.c\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n")
    assert kernel.prepare_work_tree(trees, [patch1]) is True
    assert (trees.work / "dir" / "f.c").read_text() == "one\nTWO\nthree\n"
    assert (trees.pristine / "dir" / "f.c").read_text() == "one\ntwo\nthree\n"
    assert kernel.prepare_work_tree(trees, [patch1]) is False  # idempotent
    # A changed patch set restores the old files first, then applies the new one.
    patch2 = tmp_path / "0001-a.patch"
    patch2.write_text("--- a/dir/f.c\n+++ b/dir/f.c\n@@ -1,3 +1,3 @@\n one\n two\n-three\n+THREE\n")
    assert kernel.prepare_work_tree(trees, [patch2]) is True
    assert (trees.work / "dir" / "f.c").read_text() == "one\ntwo\nTHREE\n"
    assert kernel.prepare_work_tree(trees, []) is True
    assert (trees.work / "dir" / "f.c").read_text() == "one\ntwo\nthree\n"
    assert (trees.pristine / "dir" / "f.c").read_text() == "one\ntwo\nthree\n"


def test_patch_applies_to_kernel_source_if_unpacked() -> None:
    version = packages.package_version("linux-source-6.1")
    if version is None:
        pytest.skip("linux-source-6.1 not installed")
    pristine = kernel.kernel_trees(cache.cache_root(), version).pristine
    if not (pristine / kernel._UNPACKED_MARKER).exists():
        pytest.skip(f"kernel source not unpacked at {pristine} (run guest/build_images.py)")
    import subprocess
    for patch in sorted((GUEST / "patches").glob("*.patch")):
        result = subprocess.run(["patch", "-p1", "--dry-run", "-s", "-i", str(patch)], cwd=pristine,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_build_initramfs_contents() -> None:
    applets = ["bin/sh", "bin/mount", "bin/cttyhack", "usr/bin/setsid", "sbin/reboot", "sbin/poweroff",
               "sbin/halt", "usr/sbin/chroot", "linuxrc"]
    blob = initramfs.build_initramfs(GUEST / "initramfs", b"BUSYBOX", applets)
    entries = {e.path: e for e in newc.read_newc(blob)}
    assert entries["bin/busybox"].data == b"BUSYBOX"
    assert entries["init"].mode == stat.S_IFREG | 0o755
    init = entries["init"].data.decode()
    for needle in ("mount -t devtmpfs", "mkdir -p /dev/pts", "mount -a",
                   "microvmm: init reached", "setsid -c login -p -f root", "/sys/class/tty/console/active",
                   "/sbin/poweroff"):
        assert needle in init, needle
    # `mount -a` mounts everything else /init needs
    fstab = [line.split() for line in entries["etc/fstab"].data.decode().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {(fields[1], fields[2]) for fields in fstab} == {
        ("/proc", "proc"), ("/sys", "sysfs"), ("/dev/pts", "devpts"), ("/tmp", "tmpfs"), ("/run", "tmpfs")}
    assert entries["bin/sh"].data == b"/bin/busybox"
    assert entries["sbin/reboot"].kind is newc.EntryKind.SYMLINK
    # poweroff/halt are our scripts, not busybox links.
    # A forced poweroff/halt ends in the final halt microvmm recognises.
    for name, command in (("sbin/poweroff", b"busybox poweroff -f"), ("sbin/halt", b"busybox halt -f")):
        assert entries[name].kind is newc.EntryKind.FILE and command in entries[name].data
        assert entries[name].mode & 0o111
    assert b"PS1='microvmm# '" in entries["etc/profile"].data
    assert entries["dev/console"].kind is newc.EntryKind.CHAR_DEVICE
    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    assert entries["usr/sbin"].kind is newc.EntryKind.DIRECTORY
    assert blob == initramfs.build_initramfs(GUEST / "initramfs", b"BUSYBOX", list(reversed(applets)))


def test_gzip_is_deterministic() -> None:
    data = b"abc" * 1000
    assert initramfs.gzip_deterministic(data) == initramfs.gzip_deterministic(data)
    assert gzip.decompress(initramfs.gzip_deterministic(data)) == data


def test_install_outputs_never_writes_through_existing_files(tmp_path: Path) -> None:
    entry, out = tmp_path / "entry", tmp_path / "out"
    entry.mkdir()
    out.mkdir()
    for name in (*cache.IMAGE_FILES, cache.MANIFEST_NAME):
        (entry / name).write_text(f"new {name}")
    # An older output that is a hard link to some other file (e.g. an older cache entry).
    victim = tmp_path / "older-cache-bzImage"
    victim.write_text("old bzImage")
    (out / "bzImage").hardlink_to(victim)
    cache.install_outputs(entry, out)
    cache.install_outputs(entry, out)  # idempotent over its own links
    assert victim.read_text() == "old bzImage"
    for name in (*cache.IMAGE_FILES, cache.MANIFEST_NAME):
        assert (out / name).read_text() == f"new {name}"
    assert not list(out.glob(".*.tmp"))


def test_cache_entry_completeness(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    assert not cache.cache_entry_complete(entry)
    files = {}
    for name in cache.IMAGE_FILES:
        (entry / name).write_bytes(name.encode())
        files[name] = {"size": len(name), "sha256": ""}
    (entry / cache.MANIFEST_NAME).write_text(json.dumps({"files": files}))
    assert cache.cache_entry_complete(entry)
    (entry / "vmlinux").write_bytes(b"")
    assert not cache.cache_entry_complete(entry)


# ----------------------------------------------------------------------------- built images (if present)


def _require_images() -> dict:
    manifest = IMAGES / cache.MANIFEST_NAME
    if not manifest.exists():
        pytest.skip("images/ not built (run: python3 guest/build_images.py --out images)")
    return json.loads(manifest.read_text())


def test_built_kernel_config_has_every_fragment_option() -> None:
    _require_images()
    fragment = kconfig.parse_kconfig((GUEST / "kernel.config").read_text())
    final = kconfig.parse_kconfig((IMAGES / "kernel.config").read_text())
    assert kconfig.verify_config(fragment, final) == []


def test_built_images_match_manifest_and_initramfs_parses() -> None:
    manifest = _require_images()
    for name, info in manifest["files"].items():
        data = (IMAGES / name).read_bytes()
        assert len(data) == info["size"], name
        assert hashlib.sha256(data).hexdigest() == info["sha256"], name
    cpio = (IMAGES / "initramfs.cpio").read_bytes()
    assert gzip.decompress((IMAGES / "initramfs.cpio.gz").read_bytes()) == cpio
    entries = {e.path: e for e in newc.read_newc(cpio)}
    assert entries["init"].data == (GUEST / "initramfs" / "init").read_bytes()
    assert entries["bin/busybox"].kind is newc.EntryKind.FILE and entries["bin/busybox"].data[:4] == b"\x7fELF"
    assert (IMAGES / "bzImage").read_bytes()[0x202:0x206] == b"HdrS"
    assert (IMAGES / "vmlinux").read_bytes()[:4] == b"\x7fELF"
    assert " entry_SYSCALL_64\n" in (IMAGES / "System.map").read_text()


@pytest.mark.parametrize("script", ["init", "sbin/poweroff", "sbin/halt", "etc/profile"])
def test_initramfs_shell_scripts_parse_with_busybox_sh(script: str) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        pytest.skip("busybox not installed")
    import subprocess
    result = subprocess.run([busybox, "sh", "-n", str(GUEST / "initramfs" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_applet_links_are_the_few_needed_before_proc_and_by_path(tmp_path) -> None:
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    if not busybox.exists():
        pytest.skip("no busybox on this machine")
    links = initramfs.applet_links(busybox)
    # /init's first mount runs before /proc (busybox's /proc/self/exe) exists;
    # /etc/passwd and scripts name /bin/sh.
    assert {"bin/sh", "bin/mount"} <= set(links)
    assert len(links) < 10  # each link costs the guest ~35 ms to unpack here
    with pytest.raises(errors.GuestBuildError, match="no-such-applet"):
        initramfs.applet_links(busybox, ("bin/sh", "bin/no-such-applet"))


def test_a_cache_hit_does_not_wait_for_another_build(tmp_path, monkeypatch) -> None:
    """Another key's kernel build holds the cache lock for minutes; a complete
    entry of ours is installed without it. An incomplete one waits."""
    import fcntl
    import threading

    from microvmm.guestbuild import build
    monkeypatch.setenv("MICROVMM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "ensure_packages", lambda packages: None)
    monkeypatch.setattr(build, "collect_inputs", lambda guest_dir: build.BuildInputs(guest_dir, VERSIONS, "k1"))
    building = []
    monkeypatch.setattr(build, "build_entry", lambda *args: building.append(args))
    entry = tmp_path / "cache" / "images" / "k1"
    entry.mkdir(parents=True)
    for name in cache.IMAGE_FILES:
        (entry / name).write_bytes(name.encode())
    (entry / cache.MANIFEST_NAME).write_text(json.dumps(
        {"files": {name: {"size": len(name)} for name in cache.IMAGE_FILES}}))
    with open(tmp_path / "cache" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another build"
        hit = threading.Thread(target=lambda: build.build_images(tmp_path / "out"), daemon=True)
        hit.start()
        hit.join(10)
        assert not hit.is_alive(), "a cache hit waited for the build lock"
        assert (tmp_path / "out" / "vmlinux").read_bytes() == b"vmlinux" and building == []

        (entry / cache.MANIFEST_NAME).unlink()  # incomplete: must take the lock to build
        waiter = threading.Thread(target=lambda: build.build_images(tmp_path / "out2"), daemon=True)
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and building == []
        (entry / cache.MANIFEST_NAME).write_text(json.dumps(
            {"files": {name: {"size": len(name)} for name in cache.IMAGE_FILES}}))
    waiter.join(10)
    assert not waiter.is_alive() and building == []  # complete by the time it had the lock
