"""virtio-9p (virtio device id 9): a host directory shared with the guest.

`--share HOST_DIR[:TAG][:ro]` or `--device virtio-9p,path=DIR[,tag=TAG][,ro]`.
The device offers VIRTIO_9P_MOUNT_TAG; its config space is the tag's length
(le16) and the tag. The guest mounts it with
`mount -t 9p -o trans=virtio,version=9p2000.L TAG DIR` (the default guest
mounts every share at /mnt/TAG). The file server (ninep/server.py) resolves
every guest path beneath HOST_DIR; `ro` refuses every change with EROFS.

One request queue. Each request is one descriptor chain: the T-message in
its device-readable buffers, room for the R-message in its writable ones
(Linux's zero-copy reads and writes put the data pages after the header in
the same chain, which reads as one byte stream either way).

Threading: requests are served on a worker thread of the device's own
("9p-TAG"), never on a vCPU thread or the event loop: a slow host disk
stalls only this share. The queue is touched under the lock; the file
system work runs outside it, and a reset in between (a new generation)
drops the reply. A request too short for a 9P header, or a reply with no
room, puts the device in NEEDS_RESET (logged once by the transport).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from microvmm.virtio.device import VirtioDevice, VirtioDeviceType

if TYPE_CHECKING:
    from microvmm.devices.ninep.resolve import Resolver
    from microvmm.devices.ninep.server import NinePServer
    from microvmm.devmgr.registry import DeviceContext, HostContext
    from microvmm.memory import GuestMemory
    from microvmm.virtio.chain import DescriptorChain
    from microvmm.virtio.queue import VirtQueue

logger = logging.getLogger(__name__)

DEVICE_NAME = "virtio-9p"
REQUEST_QUEUE = 0
#: Linux's 9p transport posts up to 128 segments per request (VIRTQUEUE_NUM).
QUEUE_SIZE = 128
#: Feature bit: the config space carries a mount tag.
VIRTIO_9P_MOUNT_TAG = 1 << 0
MAX_TAG_LENGTH = 64
_TAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ShareOptions:
    """One shared directory: host path, mount tag, read-only."""

    path: str
    tag: str
    read_only: bool = False
    #: --rootfs host: proc, sysfs & co. mounted under the share look absent.
    hide_pseudo_filesystems: bool = False


def default_tag(path: str) -> str:
    """The directory's basename with anything but [A-Za-z0-9_.-] made '_' ("root" for /)."""
    base = os.path.basename(os.path.normpath(os.path.abspath(path)))
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", base)[:MAX_TAG_LENGTH].strip(".")
    return tag or "root"


def _checked(path: str, tag: str | None, read_only: bool) -> ShareOptions:
    if not path:
        raise ValueError("no host directory given")
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory")
    if tag is None:
        tag = default_tag(path)
    if not _TAG_RE.fullmatch(tag) or tag in (".", ".."):
        raise ValueError(f"tag {tag!r}: use 1 to {MAX_TAG_LENGTH} of A-Z a-z 0-9 _ . -")
    if tag.startswith("microvmm."):
        raise ValueError(f"tag {tag!r}: tags starting with 'microvmm.' are microvmm's own")
    return ShareOptions(os.path.abspath(path), tag, read_only)


def parse_share(text: str) -> ShareOptions:
    """`HOST_DIR[:TAG][:ro]` (the --share form)."""
    rest, read_only = text, False
    if rest.endswith(":ro"):
        rest, read_only = rest[:-3], True
    path, tag = rest, None
    if ":" in rest:
        path, tag = rest.rsplit(":", 1)
    return _checked(path, tag, read_only)


#: The tag of `--rootfs host`'s share; /init finds it as microvmm.rootfs=TAG.
HOST_ROOT_TAG = "microvmm.hostroot"
ROOTFS_PARAM = "microvmm.rootfs"


def host_root_share() -> ShareOptions:
    """`--rootfs host`: the host's / read-only, its kernel filesystems hidden."""
    return ShareOptions("/", HOST_ROOT_TAG, read_only=True, hide_pseudo_filesystems=True)


def parse_options(text: str) -> ShareOptions:
    """`path=DIR[,tag=TAG][,ro]` (the --device form)."""
    values: dict[str, str] = {}
    read_only = False
    for token in text.split(",") if text else []:
        key, sep, value = token.partition("=")
        if key in ("path", "tag") and sep and key not in values:
            values[key] = value
        elif token == "ro" and not read_only:
            read_only = True
        else:
            raise ValueError(f"{token!r}: expected path=DIR, tag=TAG or ro (each at most once)")
    if "path" not in values:
        raise ValueError("path=DIR is required")
    return _checked(values["path"], values.get("tag"), read_only)


@dataclass
class OpenedShare:
    options: ShareOptions
    root_fd: int
    resolver: "Resolver"


def open_host(options: ShareOptions, context: "HostContext") -> OpenedShare:
    from microvmm.devices.ninep.resolve import make_resolver
    from microvmm.devmgr.registry import DeviceSetupError
    try:
        root_fd = os.open(options.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise DeviceSetupError(f"--share {options.path}: {err.strerror}") from None
    context.closers.append(lambda: os.close(root_fd))
    resolver = make_resolver(root_fd)
    logger.info("share %s (tag %s%s): paths resolved with %s", options.path, options.tag,
                ", read-only" if options.read_only else "", resolver.method)
    return OpenedShare(options, root_fd, resolver)


def create_device(opened: OpenedShare, context: "DeviceContext") -> "VirtioNineP":
    from microvmm.devices.ninep.server import NinePServer
    server = NinePServer(opened.root_fd, opened.resolver, read_only=opened.options.read_only,
                         hide_pseudo_filesystems=opened.options.hide_pseudo_filesystems)
    device = VirtioNineP(opened.options.tag, server)
    context.closers.append(device.close)
    return device


class VirtioNineP(VirtioDevice):
    device_type = VirtioDeviceType.NINEP
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, tag: str, server: "NinePServer"):
        self.tag = tag
        self._config = len(tag).to_bytes(2, "little") + tag.encode("ascii")
        self.server = server
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: VirtQueue | None = None
        self._signal_queue: Callable[[int], None] = lambda index: None
        self._fail: Callable[[str], None] = lambda reason: None
        self._generation = 0
        self._kicks = 0
        self._served = 0
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"9p-{tag}", daemon=True)
        self._thread.start()

    # ---- VirtioDevice (vCPU threads, I/O thread) ------------------------------------

    def device_features(self) -> int:
        return VIRTIO_9P_MOUNT_TAG

    def read_config(self, offset: int, size: int) -> int:
        if offset < 0 or offset >= len(self._config):
            return 0
        return int.from_bytes(self._config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # the tag is read-only

    def activate(self, memory: "GuestMemory", queues: list["VirtQueue"], driver_features: int,
                 signal_queue: Callable[[int], None], signal_config: Callable[[], None],
                 fail: Callable[[str], None]) -> None:
        with self._lock:
            self._queue = queues[REQUEST_QUEUE]
            self._signal_queue, self._fail = signal_queue, fail
            self._generation += 1
            self._kick_locked()

    def reset(self) -> None:
        with self._lock:
            self._queue = None
            self._generation += 1

    def queue_notify(self, index: int) -> None:
        if index == REQUEST_QUEUE:
            with self._lock:
                self._kick_locked()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue = None
            self._generation += 1
            self._wake.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not self._thread.is_alive():  # (else a host call still runs: its fds go at exit)
            self.server.close()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every kick so far has been served (tests, teardown)."""
        with self._lock:
            return self._wake.wait_for(lambda: self._served >= self._kicks or self._closed, timeout)

    def _kick_locked(self) -> None:
        self._kicks += 1
        self._wake.notify_all()

    # ---- the worker thread -------------------------------------------------------------

    def _serve(self) -> None:
        from microvmm.host.osthread import set_os_thread_name
        set_os_thread_name(f"9p-{self.tag}")
        while True:
            with self._lock:
                self._wake.wait_for(lambda: self._closed or self._served < self._kicks)
                if self._closed:
                    return
                kicks = self._kicks
            try:
                self._drain()
            except Exception:  # never let a bug kill the thread or the VMM
                logger.exception("9p share %s: request failed", self.tag)
                with self._lock:
                    self._stop_locked("internal error serving a 9P request")
            with self._lock:
                self._served = kicks
                self._wake.notify_all()

    def _drain(self) -> None:
        from microvmm.devices.ninep.protocol import MalformedMessage
        from microvmm.memory import GuestMemoryError
        from microvmm.virtio.queue import VirtQueueError
        while True:
            with self._lock:
                queue, generation = self._queue, self._generation
                if queue is None:
                    return
                try:
                    chain = queue.pop()
                except (VirtQueueError, GuestMemoryError) as exc:
                    self._stop_locked(str(exc))
                    return
                if chain is None:
                    return
                request = self._request_bytes(chain)
                room = chain.writable_len
            try:
                reply = self.server.handle(request, room)
            except MalformedMessage as exc:
                with self._lock:
                    if generation == self._generation:
                        self._stop_locked(f"request {chain.head}: {exc}")
                return
            with self._lock:
                if generation != self._generation:
                    return  # reset while the request ran: its buffers are gone
                written = chain.write(reply)
                queue.add_used(chain.head, written)
                if queue.needs_notification():
                    self._signal_queue(REQUEST_QUEUE)

    def _request_bytes(self, chain: "DescriptorChain") -> bytes:
        """The T-message: the readable bytes, at most msize of them (no more can count)."""
        limit = self.server.msize
        parts, taken = [], 0
        for view in chain.readable:
            if taken >= limit:
                break
            part = bytes(view[:limit - taken])
            parts.append(part)
            taken += len(part)
        return b"".join(parts)

    def _stop_locked(self, reason: str) -> None:
        self._queue = None
        self._generation += 1
        self._fail(reason)
