"""virtio-9p: the 9P2000.L server on a temporary share (each operation, the
escapes a hostile guest would try, read-only, the fid and open-file limits),
the device behind the legacy transport driven by the fake Linux-like
front-end (identity, mount tag, requests on the worker thread, malformed
requests -> NEEDS_RESET logged once), --share's command line, and a short
seeded hostile run (fuzz/fuzz_9p.py runs the long one)."""

from __future__ import annotations

import errno
import logging
import os
import struct
from pathlib import Path

import pytest

from microvmm.devices.ninep.resolve import ComponentWalkResolver, Openat2Resolver, make_resolver
from microvmm.devices.ninep.server import NinePServer, ShareLimits
from microvmm.devices.virtio_9p import (
    VIRTIO_9P_MOUNT_TAG,
    ShareOptions,
    VirtioNineP,
    default_tag,
    parse_options,
    parse_share,
)
from microvmm.devmgr.registry import DeviceOptionError, parse_device_option
from microvmm.memory import GuestMemory
from microvmm.pci.bus import PciBus
from microvmm.virtio.pci_legacy import VirtioPciLegacy
from tests.ninep_client import Client, NinePError, message, parse_reply
from tests.test_cli import assert_usage_error, captured_config, kernel, no_vm, run_main  # noqa: F401
from microvmm.testing.fakes.virtio_driver import (
    F_INDIRECT_DESC,
    STATUS_NEEDS_RESET,
    FakeIntxLine,
    FakeLegacyPciDriver,
    FakeMsiController,
    GuestAllocator,
)

O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC = 0, 1, 2, 0o100, 0o1000
SETATTR_MODE, SETATTR_UID, SETATTR_SIZE, SETATTR_MTIME, SETATTR_MTIME_SET = 0x1, 0x2, 0x8, 0x20, 0x100


class Share:
    """A share with a sibling canary directory whose contents and times must never change."""

    def __init__(self, base: Path, read_only: bool = False, resolver: str = "openat2",
                 limits: ShareLimits = ShareLimits()):
        self.root = base / "share"
        self.canary = base / "canary"
        self.root.mkdir()
        self.canary.mkdir()
        (self.canary / "secret").write_text("host secret\n")
        (self.root / "hello.txt").write_text("hello from the host\n")
        (self.root / "dir").mkdir()
        (self.root / "dir" / "inner").write_text("inner\n")
        os.symlink("../canary/secret", self.root / "up")
        os.symlink("/etc/passwd", self.root / "abs")
        os.symlink(str(self.canary), self.root / "canarydir")
        os.symlink("/proc/self/root", self.root / "magic")
        self.fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY)
        chosen = {"openat2": Openat2Resolver, "walk": ComponentWalkResolver}[resolver](self.fd)
        self.server = NinePServer(self.fd, chosen, read_only=read_only, limits=limits)
        self.client = Client(lambda request: self.server.handle(request, 65536))
        self.client.version()
        self.client.attach(1)
        self._canary_before = self.canary_state()

    def canary_state(self) -> list:
        return sorted((p.name, p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_atime_ns)
                      for p in self.canary.iterdir()) + [self.canary.stat().st_mtime_ns]

    def canary_untouched(self) -> bool:
        return self.canary_state() == self._canary_before

    def close(self) -> None:
        self.server.close()
        os.close(self.fd)


@pytest.fixture(params=["openat2", "walk"])
def share(request, tmp_path):
    s = Share(tmp_path, resolver=request.param)
    yield s
    assert s.canary_untouched()
    s.close()


@pytest.fixture
def ro_share(tmp_path):
    s = Share(tmp_path, read_only=True)
    yield s
    s.close()


def errno_of(call) -> int:
    with pytest.raises(NinePError) as info:
        call()
    return info.value.errno


# ---- operations --------------------------------------------------------------------------


def test_version_and_attach(share):
    c = share.client
    assert c.version(8192) == (8192, b"9P2000.L")
    assert c.version(1 << 30)[0] == 512 * 1024  # capped
    assert c.version(8192, "9P2000.u") == (8192, b"unknown")
    assert errno_of(lambda: c.version(100)) == errno.EINVAL
    c.version(65536)
    qid = c.attach(1)
    assert qid[0] == 0x80  # a directory
    assert errno_of(lambda: c.attach(1)) == errno.EBADF  # fid in use


def test_walk_getattr_read(share):
    c = share.client
    fid = c.walk_to("hello.txt")
    attrs = c.getattr(fid)
    assert attrs["size"] == len("hello from the host\n") and attrs["qtype"] == 0
    c.lopen(fid, O_RDONLY)
    assert c.read(fid, 0, 4096) == b"hello from the host\n"
    assert c.read(fid, 6, 4) == b"from"
    assert c.read(fid, 1000, 10) == b""
    nested = c.walk_to("dir", "inner")
    c.lopen(nested, O_RDONLY)
    assert c.read(nested, 0, 100) == b"inner\n"
    assert errno_of(lambda: c.walk_to("missing")) == errno.ENOENT
    assert len(c.walk(1, c.fid(), "dir", "missing")) == 1  # a partial walk: one qid
    c.clunk(fid)
    assert errno_of(lambda: c.clunk(fid)) == errno.EBADF


def test_readdir_lists_everything_with_offsets(share):
    c = share.client
    (share.root / "many").mkdir()
    for i in range(300):
        (share.root / "many" / f"file-{i:03}").write_text("x")
    fid = c.walk_to("many")
    c.lopen(fid, O_RDONLY)
    names = c.readdir_all(fid)
    assert sorted(names) == sorted([b".", b".."] + [f"file-{i:03}".encode() for i in range(300)])
    first = c.readdir(fid, 0, 200)  # a small buffer: a few entries, offsets to go on from
    assert 0 < len(first) < 10 and first[-1][1] == len(first)


def test_create_write_read_back_truncate(share):
    c = share.client
    dir_fid = c.walk_to()
    c.lcreate(dir_fid, "new.txt", O_RDWR | O_CREAT, 0o4755)
    assert c.write(dir_fid, 0, b"written by the guest") == 20
    c.fsync(dir_fid)
    host = share.root / "new.txt"
    assert host.read_bytes() == b"written by the guest"
    assert host.stat().st_mode & 0o7777 == 0o755  # no set-user-ID from a guest
    assert c.read(dir_fid, 8, 3) == b"by "
    again = c.walk_to("new.txt")
    c.setattr(again, SETATTR_SIZE, size=7)
    assert host.read_bytes() == b"written"
    c.lopen(again, O_WRONLY | O_TRUNC)
    assert host.read_bytes() == b""
    assert errno_of(lambda: c.lcreate(c.walk_to(), "new.txt", O_RDWR | O_CREAT | 0o200)) == errno.EEXIST


def test_mkdir_rename_unlink_symlink_link(share):
    c = share.client
    root = c.walk_to()
    c.mkdir(root, "made", 0o755)
    assert (share.root / "made").is_dir()
    made = c.walk_to("made")
    c.renameat(1, "hello.txt", made, "moved.txt")
    assert (share.root / "made" / "moved.txt").read_text() == "hello from the host\n"
    moved = c.walk_to("made", "moved.txt")
    c.rename(moved, 1, "back.txt")
    assert (share.root / "back.txt").exists()
    c.getattr(moved)  # the fid followed its file
    c.symlink(root, "link-to-back", "back.txt")
    assert os.readlink(share.root / "link-to-back") == "back.txt"
    assert c.readlink(c.walk_to("link-to-back")) == b"back.txt"
    c.link(root, c.walk_to("back.txt"), "hard")
    assert (share.root / "hard").stat().st_nlink == 2
    c.unlinkat(root, "hard")
    assert errno_of(lambda: c.unlinkat(root, "made")) == errno.EISDIR
    c.unlinkat(root, "made", 0x200)
    assert not (share.root / "made").exists()
    c.remove(c.walk_to("back.txt"))
    assert not (share.root / "back.txt").exists()


def test_setattr_mode_times_and_owner(share):
    c = share.client
    fid = c.walk_to("hello.txt")
    c.setattr(fid, SETATTR_MODE, mode=0o6600)
    assert (share.root / "hello.txt").stat().st_mode & 0o7777 == 0o600
    c.setattr(fid, SETATTR_MTIME | SETATTR_MTIME_SET, mtime=(1_000_000, 5))
    assert (share.root / "hello.txt").stat().st_mtime_ns == 1_000_000 * 10**9 + 5
    me = os.getuid()
    c.setattr(fid, SETATTR_UID, uid=me)  # no change: allowed
    assert errno_of(lambda: c.setattr(fid, SETATTR_UID, uid=me + 1)) == errno.EPERM
    assert errno_of(lambda: c.setattr(c.walk_to("abs"), SETATTR_MODE, mode=0o777)) == errno.EOPNOTSUPP


def test_statfs_lock_flush_xattr_mknod(share):
    c = share.client
    assert c.statfs(1)[0] == 0x01021997
    fid = c.walk_to("hello.txt")
    c.lopen(fid, O_RDONLY)
    assert c.lock(fid) == 0
    c.flush(5)
    assert errno_of(lambda: c.xattrwalk(1, c.fid(), "security.selinux")) == errno.EOPNOTSUPP
    assert errno_of(lambda: c.mknod(1, "fifo")) == errno.EPERM
    assert not (share.root / "fifo").exists()


# ---- escapes -------------------------------------------------------------------------------------


def test_dotdot_stays_at_the_root(share):
    c = share.client
    fid = c.fid()
    qids = c.walk(1, fid, "..", "..", "..")
    root_qid = c.walk(1, c.fid())  # a clone
    assert len(qids) == 3 and c.getattr(fid) == c.getattr(1)
    assert root_qid == []
    assert errno_of(lambda: c.walk_to("..", "canary")) == errno.ENOENT


@pytest.mark.parametrize("name", ["up", "abs", "canarydir", "magic"])
def test_symlinks_are_never_followed(share, name):
    c = share.client
    fid = c.walk_to(name)
    assert c.getattr(fid)["qtype"] == 0x02  # the link itself
    assert errno_of(lambda: c.lopen(fid, O_RDONLY)) == errno.ELOOP
    assert errno_of(lambda: c.walk_to(name, "secret")) != 0
    assert errno_of(lambda: c.setattr(fid, SETATTR_SIZE, size=0)) in (errno.EINVAL, errno.ELOOP)
    assert errno_of(lambda: c.lcreate(fid, "x")) in (errno.ENOTDIR, errno.ELOOP)
    assert errno_of(lambda: c.mkdir(fid, "x")) in (errno.ENOTDIR, errno.ELOOP)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../canary", "/etc", "x\0y", "x" * 256, ""])
def test_bad_names_are_refused(share, name):
    c = share.client
    root = c.walk_to()
    for call in (lambda: c.lcreate(root, name), lambda: c.mkdir(root, name),
                 lambda: c.symlink(root, name, "t"), lambda: c.unlinkat(root, name),
                 lambda: c.renameat(1, "hello.txt", 1, name), lambda: c.renameat(1, name, 1, "x")):
        assert errno_of(call) in (errno.EINVAL, errno.ENAMETOOLONG)
    if name not in ("..",):
        assert errno_of(lambda: c.walk_to(name)) in (errno.EINVAL, errno.ENAMETOOLONG)
    assert (share.root / "hello.txt").exists()


def test_rename_out_of_the_share_is_impossible(share):
    c = share.client
    up = c.walk_to("canarydir")  # a symlink to the canary dir: not a directory fid
    assert errno_of(lambda: c.renameat(1, "hello.txt", up, "stolen")) in (errno.ENOTDIR, errno.ELOOP)
    assert errno_of(lambda: c.rename(c.walk_to("hello.txt"), up, "stolen")) in (errno.ENOTDIR, errno.ELOOP)
    assert not (share.canary / "stolen").exists()
    # A rename onto a symlink replaces the link, never what it points to.
    c.renameat(1, "hello.txt", 1, "up")
    assert (share.canary / "secret").read_text() == "host secret\n"
    assert (share.root / "up").read_text() == "hello from the host\n"


def test_a_directory_swapped_for_a_symlink_on_the_host_is_not_followed(share):
    c = share.client
    fid = c.walk_to("dir")
    os.rename(share.root / "dir", share.root / "dir-old")
    os.symlink(str(share.canary), share.root / "dir")
    assert errno_of(lambda: c.walk_to("dir", "secret")) != 0
    assert errno_of(lambda: c.lcreate(fid, "planted")) in (errno.ENOTDIR, errno.ELOOP)
    assert errno_of(lambda: c.mkdir(fid, "planted")) in (errno.ENOTDIR, errno.ELOOP)
    assert not (share.canary / "planted").exists()


def test_device_nodes_and_fifos_are_not_opened(share):
    os.mkfifo(share.root / "fifo")
    c = share.client
    assert errno_of(lambda: c.lopen(c.walk_to("fifo"), O_RDONLY)) == errno.ENXIO
    if os.getuid() == 0:
        os.mknod(share.root / "null", 0o20666, os.makedev(1, 3))
        assert errno_of(lambda: c.lopen(c.walk_to("null"), O_RDONLY)) == errno.ENXIO


def test_read_only_share_refuses_every_change(ro_share):
    c, root = ro_share.client, ro_share.client.walk_to()
    before = sorted(p.name for p in ro_share.root.iterdir())
    hello = c.walk_to("hello.txt")
    for call in (lambda: c.lcreate(c.walk_to(), "x"), lambda: c.mkdir(root, "x"),
                 lambda: c.unlinkat(root, "hello.txt"), lambda: c.renameat(1, "hello.txt", 1, "y"),
                 lambda: c.symlink(root, "s", "t"), lambda: c.link(root, hello, "h"),
                 lambda: c.setattr(hello, SETATTR_SIZE, size=0),
                 lambda: c.setattr(hello, SETATTR_MODE, mode=0o777),
                 lambda: c.lopen(c.walk_to("hello.txt"), O_WRONLY),
                 lambda: c.lopen(c.walk_to("hello.txt"), O_RDONLY | O_TRUNC),
                 lambda: c.remove(c.walk_to("hello.txt"))):
        assert errno_of(call) == errno.EROFS
    c.lopen(hello, O_RDONLY)
    assert c.read(hello, 0, 5) == b"hello"
    assert sorted(p.name for p in ro_share.root.iterdir()) == before
    assert (ro_share.root / "hello.txt").read_text() == "hello from the host\n"


def test_fids_and_open_files_are_bounded(tmp_path):
    s = Share(tmp_path, limits=ShareLimits(max_fids=20, max_open_files=5))
    c = s.client
    fids = [c.walk_to("hello.txt") for _ in range(5)]
    for fid in fids:
        c.lopen(fid, O_RDONLY)
    assert errno_of(lambda: c.lopen(c.walk_to("hello.txt"), O_RDONLY)) == errno.EMFILE
    while s.server.fid_count < 20:
        c.walk_to()
    assert errno_of(lambda: c.walk_to()) == errno.EMFILE
    assert s.server.open_file_count == 5
    c.version()  # a new session releases everything
    assert s.server.fid_count == 0 and s.server.open_file_count == 0
    s.close()


@pytest.mark.parametrize("request_bytes, code", [
    (message("walk", 1, struct.pack("<IIH", 1, 2, 3) + b"\x05\x00ab"), errno.EINVAL),  # string past the end
    (message("walk", 1, struct.pack("<IIH", 1, 2, 17)), errno.EINVAL),  # more than 16 names
    (message("write", 1, struct.pack("<IQI", 1, 0, 1000) + b"short"), errno.EINVAL),
    (message("read", 1, struct.pack("<IQI", 99, 0, 10)), errno.EBADF),
    (message(250, 1, b""), errno.EOPNOTSUPP),  # unknown type
    (message(117, 1, b""), errno.EOPNOTSUPP),  # an R-message
    (struct.pack("<IBH", 2, 100, 1), errno.EINVAL),  # size below the header
    (struct.pack("<IBH", 500, 100, 1) + b"xx", errno.EINVAL),  # size past the data
])
def test_malformed_messages_get_rlerror(share, request_bytes, code):
    reply = parse_reply(share.server.handle(request_bytes, 4096))
    assert reply.type == 7 and reply.u32(0) == code and reply.tag == 1


# ---- the device behind the transport ---------------------------------------------------------

RAM = 8 << 20


class DeviceEnv:
    def __init__(self, tmp_path: Path, tag: str = "hostdir"):
        self.share = Share(tmp_path)
        self.memory = GuestMemory([(0, RAM)])
        bus = PciBus()
        self.device = VirtioNineP(tag, self.share.server)
        self.transport = VirtioPciLegacy(self.device, self.memory, intx=FakeIntxLine(), msi=FakeMsiController())
        bus.add_device(self.transport, 2)
        self.driver = FakeLegacyPciDriver(bus, self.memory, GuestAllocator(self.memory, 0x10000, RAM),
                                          device_id=0x1009, transport=self.transport)
        self.driver.enable()
        self.features = self.driver.negotiate(VIRTIO_9P_MOUNT_TAG | F_INDIRECT_DESC)
        self.queue = self.driver.setup_queue(0)
        self.driver.driver_ok()

    def rpc(self, request: bytes, room: int = 8192) -> bytes:
        """One request as Linux posts it: the T-message readable, the reply room writable."""
        self.queue.add(readable=[request], writable=[room])
        self.driver.kick(0, force=True)
        assert self.device.wait_idle(5)
        (used,) = self.queue.get_used()
        return used.data

    def close(self) -> None:
        self.device.close()
        self.share.close()


@pytest.fixture
def env(tmp_path):
    e = DeviceEnv(tmp_path)
    yield e
    e.close()


def test_identity_features_and_mount_tag(env):
    assert env.driver.config_read(0, 4) == 0x1009 << 16 | 0x1AF4
    assert env.driver.config_read(0x2E, 2) == 9
    assert env.features & VIRTIO_9P_MOUNT_TAG
    base = 20  # legacy device config without MSI-X
    length = env.driver.io_read(base, 2)
    assert length == len("hostdir")
    assert bytes(env.driver.io_read(base + 2 + i, 1) for i in range(length)) == b"hostdir"


def test_requests_are_served_on_the_worker_thread(env):
    client = Client(env.rpc)
    client.version(8192)
    client.attach(1)
    fid = client.walk_to("hello.txt")
    client.lopen(fid, O_RDONLY)
    assert client.read(fid, 0, 100) == b"hello from the host\n"
    assert env.device._thread.name == "9p-hostdir"


def test_a_zero_copy_read_spreads_over_data_pages(env):
    """Linux's zero-copy Tread: an 11-byte reply header, then the data pages."""
    client = Client(env.rpc)
    client.version(65536)
    client.attach(1)
    (env.share.root / "big").write_bytes(bytes(range(256)) * 40)
    fid = client.walk_to("big")
    client.lopen(fid, O_RDONLY)
    env.queue.add(readable=[message("read", 9, struct.pack("<IQI", fid, 0, 8192))], writable=[11, 4096, 4096])
    env.driver.kick(0, force=True)
    assert env.device.wait_idle(5)
    (used,) = env.queue.get_used()
    assert used.length == 11 + 8192
    assert used.data[11:] == (bytes(range(256)) * 40)[:8192]


@pytest.mark.parametrize("post, reason", [
    (lambda q: q.add(readable=[b"\x01\x00"], writable=[64]), "no 9P header"),
    (lambda q: q.add(writable=[64]), "no 9P header"),
    (lambda q: q.add(readable=[message("version", 1, struct.pack("<I", 8192) + b"\x08\x009P2000.L")],
                     writable=[4]), "cannot hold any reply"),
])
def test_unusable_requests_need_a_reset_logged_once(env, caplog, post, reason):
    caplog.set_level(logging.WARNING, logger="microvmm.virtio.pci_legacy")
    post(env.queue)
    env.driver.kick(0, force=True)
    assert env.device.wait_idle(5)
    assert env.driver.status & STATUS_NEEDS_RESET
    post(env.queue)
    env.driver.kick(0, force=True)
    assert env.device.wait_idle(5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0]
    # After a reset the device serves again.
    env.driver.reset()
    env.driver.negotiate(VIRTIO_9P_MOUNT_TAG)
    env.queue = env.driver.setup_queue(0)
    env.driver.driver_ok()
    assert Client(env.rpc).version(8192) == (8192, b"9P2000.L")


# ---- options and the command line ---------------------------------------------------------------


def test_share_and_device_options(tmp_path):
    d = tmp_path / "my dir!"
    d.mkdir()
    assert parse_share(str(d)) == ShareOptions(str(d), "my_dir_", False)
    assert parse_share(f"{d}:src:ro") == ShareOptions(str(d), "src", True)
    assert parse_share(f"{d}:ro") == ShareOptions(str(d), "my_dir_", True)
    assert parse_options(f"path={d},tag=t1,ro") == ShareOptions(str(d), "t1", True)
    assert default_tag("/") == "root"
    with pytest.raises(DeviceOptionError, match="not a directory"):
        parse_device_option(f"virtio-9p,path={tmp_path / 'absent'}")
    with pytest.raises(DeviceOptionError, match="tag"):
        parse_device_option(f"virtio-9p,path={d},tag=a/b")
    with pytest.raises(DeviceOptionError, match="path=DIR is required"):
        parse_device_option("virtio-9p,ro")


def test_cli_share_becomes_a_device(capsys, captured_config, kernel, tmp_path):
    status, err, _ = run_main(capsys, ["run", "--initrd", "none", "--serial", "off", "--kernel", str(kernel),
                                       "--share", f"{tmp_path}:data", "--share", f"{tmp_path}:other:ro"])
    assert status == 0, err
    (config,) = captured_config
    assert [(d.kind, d.options.tag, d.options.read_only) for d in config.devices] == [
        ("virtio-9p", "data", False), ("virtio-9p", "other", True)]


@pytest.mark.parametrize("extra, names", [
    (["--share", "/nonexistent-dir"], ["/nonexistent-dir"]),
    (["--share", "{tmp}:bad/tag"], ["bad/tag"]),
    (["--share", "{tmp}:same", "--share", "{tmp}:same"], ["same"]),
    (["--share", "{tmp}", "--seccomp", "errno"], ["--seccomp"]),
])
def test_cli_share_errors(capsys, no_vm, kernel, tmp_path, extra, names):
    argv = ["run", "--initrd", "none", "--serial", "off", "--kernel", str(kernel),
            *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    assert_usage_error(capsys, argv, *names)


def test_resolver_prefers_openat2(tmp_path):
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        assert isinstance(make_resolver(fd), Openat2Resolver)
        assert isinstance(make_resolver(fd, prefer_openat2=False), ComponentWalkResolver)
    finally:
        os.close(fd)


# ---- a short hostile run (the long one: fuzz/fuzz_9p.py) ------------------------------------------


def test_hostile_messages_short_run(tmp_path):
    from fuzz.fuzz_9p import run_cases
    result = run_cases(tmp_path, seed=1234, cases=3000)
    assert result.crashes == [] and result.escapes == [], result
    assert result.cases == 3000


class FollowingResolver:
    """A broken resolver that follows symlinks out of the share: the hostile
    run must notice (else its 'no escape' would mean nothing)."""

    method = "broken"

    def __init__(self, root_fd: int):
        self.root_fd = root_fd

    def open(self, path, flags, mode=0):
        return os.open(b"/".join(path) or b".", (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC, mode,
                       dir_fd=self.root_fd)


def test_the_hostile_run_notices_an_escape(tmp_path):
    from fuzz.fuzz_9p import run_cases
    result = run_cases(tmp_path, seed=1, cases=20000, resolver=FollowingResolver)
    assert result.escapes, "a resolver that follows symlinks out of the share went unnoticed"


# ---- --rootfs host -------------------------------------------------------------------------------


def test_host_root_share_hides_the_kernels_filesystems():
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        hidden = NinePServer(fd, make_resolver(fd), read_only=True, hide_pseudo_filesystems=True)
        c = Client(lambda request: hidden.handle(request, 65536))
        c.version()
        c.attach(1)
        assert c.getattr(c.walk_to("etc"))["qtype"] == 0x80
        for name in ("proc", "sys"):
            if os.path.ismount(f"/{name}"):
                assert errno_of(lambda: c.walk_to(name)) == errno.ENOENT
                assert errno_of(lambda: c.walk_to(name, "self")) == errno.ENOENT
        assert errno_of(lambda: c.lcreate(c.walk_to("tmp"), "x")) == errno.EROFS
        plain = NinePServer(fd, make_resolver(fd), read_only=True)
        c = Client(lambda request: plain.handle(request, 65536))
        c.version()
        c.attach(1)
        if os.path.ismount("/proc"):
            c.walk_to("proc", "self")  # (without the option, as any share would)
    finally:
        os.close(fd)


def test_cli_rootfs_host(capsys, captured_config, kernel):
    status, err, _ = run_main(capsys, ["run", "--initrd", "none", "--serial", "off", "--kernel", str(kernel),
                                       "--rootfs", "host"])
    assert status == 0, err
    (config,) = captured_config
    (device,) = config.devices
    assert device.kind == "virtio-9p"
    assert device.options == ShareOptions("/", "microvmm.hostroot", True, True)
    assert "microvmm.rootfs=microvmm.hostroot" in config.cmdline.split()


def test_tags_starting_with_microvmm_are_reserved(tmp_path):
    with pytest.raises(ValueError, match="microvmm's own"):
        parse_share(f"{tmp_path}:microvmm.hostroot")


def test_an_open_file_is_truncated_through_its_fd_even_when_unlinked(share):
    c = share.client
    fid = c.walk_to("hello.txt")
    c.lopen(fid, O_RDWR)
    c.unlinkat(1, "hello.txt")
    c.setattr(fid, SETATTR_SIZE, size=3)
    assert c.getattr(fid)["size"] == 3 and c.read(fid, 0, 100) == b"hel"
