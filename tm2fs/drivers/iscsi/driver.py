"""`IscsiDriver`: an iscsi backend, put together from settings, backing files, a target manager and
libiscsi sessions (the package docstring tells the whole design)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ...errors import InvalidArgument
from ..base import Capacity, Driver, Handle, Progress
from ..threads import in_thread, open_in_thread
from .files import Files, LocalFiles, RemoteFiles, removed_on_failure
from .handle import IscsiHandle
from .libiscsi import Session, SessionCount
from .lio import LioTargets
from .runner import Runner
from .settings import DEFAULT_PREFIX, DEFAULT_TIMEOUT, LUN, Settings, check_key, initiator_name, round_up
from .targets import Targets
from .tgt import TgtTargets

log = logging.getLogger(__name__)


class IscsiDriver(Driver):
    """Images as sparse files in STORE, each LUN 1 of its own target, moved over libiscsi sessions."""

    name = "iscsi"
    cheap_clone = False  # `cp --reflink=auto` shares blocks only where STORE's filesystem can

    def __init__(self, tm_raw: dict[str, Any], state_dir: Path) -> None:
        super().__init__(tm_raw, state_dir)
        self.invalid: InvalidArgument | None = None
        try:
            self.s = Settings.parse(tm_raw)
        except InvalidArgument as e:  # start() reports it and the backend turns ERROR
            self.invalid = e
            self.s = Settings("127.0.0.1:3260", "127.0.0.1", 3260, DEFAULT_PREFIX, "tgt", 0, "/nonexistent",
                              None, DEFAULT_TIMEOUT, ())
        self.timeout = self.s.timeout
        self.limiter = trio.CapacityLimiter(16)
        self.runner = Runner(self.s.ssh, self.timeout)
        self.files: Files = (RemoteFiles(self.s.store, self.runner) if self.s.ssh
                             else LocalFiles(self.s.store, self.runner, self.limiter))
        self.targets: Targets = (LioTargets(self.s, self.limiter) if self.s.manager == "lio"
                                 else TgtTargets(self.s, self.runner))
        self.initiator = initiator_name(self.s.prefix)
        self.count = SessionCount()
        self.attached: dict[tuple[str, str, str], Session] = {}

    @classmethod
    def validate(cls, tm_raw: dict[str, Any], state_dir: Path, backend_name: str) -> dict[str, Any]:
        s = Settings.parse(tm_raw)
        if s.manager == "lio":
            try:
                LioTargets(s, trio.CapacityLimiter(1))._lib()
            except OSError as e:
                raise InvalidArgument(e.strerror or str(e),
                                      "TARGET_MANAGER=tgt works without kernel support") from None
        if not s.ssh:
            try:
                os.makedirs(s.store, mode=0o700, exist_ok=True)
            except OSError as e:
                raise InvalidArgument(f"iscsi driver: cannot use STORE {s.store!r}: {e.strerror}",
                                      "STORE must be a directory root can create and write") from None
        return s.to_raw()

    @classmethod
    def storage_dir(cls, tm_raw: dict[str, Any], host: str) -> str | None:
        if "STORE" not in tm_raw or tm_raw.get("SSH"):
            return None  # the backing files are on the target host
        return str(tm_raw["STORE"])

    def sessions(self) -> int:
        """Open initiator sessions (handles, attachments), so tests can count leaks."""
        return self.count.value

    async def _check_portal(self) -> None:
        """A TCP connect to PORTAL within TIMEOUT."""
        what = f"iscsi driver: PORTAL {self.s.portal}"
        try:
            with trio.fail_after(self.timeout):
                infos = await trio.socket.getaddrinfo(self.s.host, self.s.port, type=socket.SOCK_STREAM)
                family, kind, proto, _, address = infos[0]
                sock = trio.socket.socket(family, kind, proto)
                with sock:
                    await sock.connect(address)
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, f"{what} does not answer within {self.timeout:g}s") from None
        except socket.gaierror as e:
            raise OSError(errno.EHOSTUNREACH, f"{what}: unknown host ({e.strerror})") from None
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise OSError(e.errno or errno.EIO, f"{what}: {reason} (is the target running?)") from None

    async def start(self) -> None:
        """Portal answers, target manager answers, STORE exists; then every backing file gets its
        target back (after a tgtd restart they are all gone)."""
        if self.invalid is not None:
            raise OSError(errno.EIO, self.invalid.message)
        await self._check_portal()
        await self.targets.check()
        await self.files.check()
        luns = await self.targets.luns()
        _, files = await self.files.usage()
        made = 0
        for key, size in files.items():
            if not luns.get(key):
                await self.targets.ensure(key, self.s.path(key), size)
                made += 1
            elif luns[key] != self.s.path(key):
                log.info("iscsi target %s is backed by %s, not %s", self.s.iqn(key), luns[key],
                         self.s.path(key))
        if made:
            log.info("iscsi backend at %s: re-created %d target(s) from STORE", self.s.portal, made)

    async def stop(self) -> None:
        """Log out the attachment sessions."""
        sessions, self.attached = list(self.attached.values()), {}
        for session in sessions:
            with contextlib.suppress(OSError):
                await in_thread(self.limiter, session.close)

    async def monitor(self) -> Capacity:
        await self._check_portal()
        await self.targets.check()
        capacity, _ = await self.files.usage()
        return capacity

    async def allocate(self, key: str, size: int) -> None:
        path = self.s.path(key)
        await self.files.create(path, size)  # exclusive: the key is new
        async with removed_on_failure(self.files, path):
            # ensure, not create: a start() running meanwhile may have made the target of the new file
            await self.targets.ensure(key, path, round_up(size))

    async def delete(self, key: str) -> None:
        path = self.s.path(key)
        await self.targets.delete_lun(key)
        await self.files.remove(path)

    async def size(self, key: str) -> int:
        return await self.files.size(self.s.path(key))

    async def allocated(self, key: str) -> int:
        return await self.files.allocated(self.s.path(key))

    async def _set_size(self, key: str, size: int, lun: bool = True) -> None:
        """The image's new size; with `lun`, the target is told (its LUN changes length)."""
        path = self.s.path(key)
        await self.files.set_size(path, size)
        if lun:
            await self.targets.resize_lun(key, path, round_up(size))

    async def resize(self, key: str, size: int) -> None:
        if size < 0:
            raise OSError(errno.EINVAL, "iscsi driver: negative size")
        await self._set_size(key, size)

    async def clone(self, src_key: str, dst_key: str, progress: Progress | None = None) -> None:
        src, dst = self.s.path(src_key), self.s.path(dst_key)
        await self.files.copy(src, dst)
        async with removed_on_failure(self.files, dst):
            size = await self.files.size(dst)
            await self.targets.ensure(dst_key, dst, size)
        if progress:
            progress(size)

    def _connect(self, key: str) -> Session:
        return Session(self.s.portal, self.s.iqn(key), self.initiator, self.timeout, self.count)

    async def _login(self, key: str) -> Session:
        """A session made in a worker thread; if the caller gave up meanwhile, it is closed."""
        check_key(key)
        return await open_in_thread(self.limiter, partial(self._connect, key), Session.close)

    async def open(self, key: str, writable: bool) -> Handle:
        size = await self.files.size(self.s.path(key))
        pipeline = await IscsiHandle.start(self, await self._login(key))
        return IscsiHandle(self, key, pipeline, writable, size)

    async def keys(self) -> list[str]:
        luns = await self.targets.luns()
        _, files = await self.files.usage()
        return sorted(set(luns) | set(files))

    async def attach(self, key: str, host: str, path: str) -> None:
        """Log this host's userspace initiator in to the image's target until detach."""
        ref = (key, host, path)
        if ref in self.attached:
            return
        session = await self._login(key)
        if ref in self.attached:  # a concurrent attach won
            await in_thread(self.limiter, session.close)
            return
        self.attached[ref] = session

    async def detach(self, key: str, host: str, path: str) -> None:
        session = self.attached.pop((key, host, path), None)
        if session is not None:
            await in_thread(self.limiter, session.close)

    def local_path(self, key: str) -> str | None:
        return None

    def source(self, key: str) -> dict[str, Any]:
        """The image's own target, as this daemon's initiator logs in to it (a hypervisor uses
        that initiator name, which INITIATORS lets in). No CHAP: the driver sets none."""
        return {"type": "iscsi", "portal": self.s.portal, "host": self.s.host, "port": self.s.port,
                "iqn": self.s.iqn(key), "lun": LUN, "initiator": self.initiator, "chap": None}
