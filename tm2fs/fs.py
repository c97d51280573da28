"""The FUSE view of the pool (pyfuse3): backends as directories, images as files.

Handlers are thin, as in S3QL: each translates its arguments, makes one service call and turns
the result into pyfuse3 types. Errors are mapped in one place (`_fuse_error`): a service error
carries its errno, an OSError keeps its own, anything unexpected is logged with its traceback and
becomes EIO. Permission checks are the kernel's (mount option `default_permissions`), so callers
reach the service with origin "fs".

Kernel caching: entries and attributes are cached for `CACHE_TIMEOUT` seconds. Changes made on
this mount are known to the kernel; changes made through the control API (`tm2 resize`, a new
backend) reach the kernel through `service.listeners`, which invalidate the entries concerned.
Invalidation runs in a worker thread: the kernel may need a lock held by a request that is itself
waiting for the trio loop, so calling it on the loop could deadlock. Those threads have their own
small limiter, so invalidations stuck behind a busy inode never starve the drivers' worker threads.

Metrics: every handler's time goes to `tm2fs_fuse_request_duration_seconds{operation}`
(`timed`; read, write and getattr inline). Measured with benchmarks/handler_cost.py: +0.5 µs of
loop time per read or write (with the driver's histogram), +0.25 µs per getattr (README, Metrics).

Data caching: none on the mount. Every open bypasses the kernel's page cache (FOPEN_DIRECT_IO),
as a block device export would: the backend's own page cache (the `dir` driver's files) or the
guest's is the cache, not a second copy in the mount's. Measured (benchmarks/acceptance.py,
README "The data path"): a buffered write(2) is one WRITE request instead of a GETXATTR
(security.capability: the kernel asks before every write to a cached FUSE file, and pyfuse3 cannot
negotiate handle_killpriv_v2 to stop it) plus a WRITE of data first copied into the mount's pages,
and a random read skips the kernel's read-ahead machinery: 2-5x the requests per second on small
writes and random reads, about 1.6x on 1 MiB ones. What it costs: no read-ahead (a reader that
reads sequentially in small blocks makes one request per block: 4 KiB reads fell from 376 to
75 MiB/s; `cp`, `qemu-img` and `dd bs=1M` read 128 KiB or more at a time) and no shared mmap
(ENODEV; private mappings work). Data written through the API (`tm2 write`) shows on the next
read, even of a file held open. No writeback cache either: the kernel then keeps its own
size of a cached regular file whatever getattr and invalidate_inode say (fuse_get_cache_mask), so
a `tm2 resize` or another host's change would not show on the mount until the kernel evicts the
inode.

st_blocks: what the backend holds (core/allocation.py keeps the figure in memory), so `du`,
`cp --sparse=always` and `qemu-img convert` see holes. pyfuse3 has no lseek or fallocate: the
kernel answers SEEK_DATA/SEEK_HOLE as "all data" (copiers then read the zeros and skip them
themselves) and fallocate, discard included, with EOPNOTSUPP.

statfs: pyfuse3 does not pass the inode to `statfs`, so `df` anywhere on the mount shows the whole
pool (the sum over backends with a known size, a filesystem or Ceph pool several backends share
counted once); per-backend figures are `onestoragebackend list`'s.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from time import perf_counter_ns
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from . import metrics
from .core import XATTR, Attr, Caller, OpenFile, Service
from .errors import Tm2Error
from .names import NAME_MAX

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 1.0  # seconds; short, so another host's changes (issue 7) show up promptly
BLOCK = 4096
FILES = 2**32  # the namespace lives in SQL: no fixed inode table to run out of


def mount_options(name: str = "tm2fs") -> set[str]:
    """`allow_other`: qemu and oneadmin reach the images; `default_permissions`: the kernel checks
    modes against what getattr shows."""
    return set(pyfuse3.default_options) | {f"fsname={name}", "subtype=tm2fs", "allow_other",
                                           "default_permissions"}


def _fuse_error(e: Exception) -> pyfuse3.FUSEError:
    """The one place where exceptions become errnos (call it in an `except` block: an unexpected
    error is logged with its traceback)."""
    if isinstance(e, pyfuse3.FUSEError):
        return e
    if isinstance(e, Tm2Error):
        return pyfuse3.FUSEError(e.errno)
    if isinstance(e, OSError):
        return pyfuse3.FUSEError(e.errno or errno.EIO)
    log.exception("unexpected error in a filesystem request")
    return pyfuse3.FUSEError(errno.EIO)


@contextmanager
def _errors() -> Iterator[None]:
    """`_fuse_error` for the handlers off the data path (a context manager costs microseconds:
    read, write and getattr use a plain try/except)."""
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except Exception as e:
        raise _fuse_error(e) from None


P = ParamSpec("P")
R = TypeVar("R")
OBSERVE_READ = metrics.FUSE_SECONDS.labels("read").observe_ns
OBSERVE_WRITE = metrics.FUSE_SECONDS.labels("write").observe_ns
OBSERVE_GETATTR = metrics.FUSE_SECONDS.labels("getattr").observe_ns


def timed(handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """The handler's time, failed or not, in metrics.FUSE_SECONDS under its name (a child built
    once). read, write and getattr, the most frequent, do the same inline (no wrapper frame)."""
    observe = metrics.FUSE_SECONDS.labels(handler.__name__).observe_ns

    @functools.wraps(handler)
    async def timed_handler(*args: P.args, **kwargs: P.kwargs) -> R:
        start = perf_counter_ns()
        try:
            return await handler(*args, **kwargs)
        finally:
            observe(perf_counter_ns() - start)

    return timed_handler


def _caller(ctx: pyfuse3.RequestContext | None) -> Caller:
    if ctx is None:
        return Caller(0, 0, origin="fs")
    return Caller(ctx.uid, ctx.gid, origin="fs")


def _caller_with_groups(ctx: pyfuse3.RequestContext | None) -> Caller:
    """The caller with its process's supplementary groups, for the one decision the kernel does
    not make for us (may a symlink's maker read the image it makes an attachment of)."""
    caller = _caller(ctx)
    if ctx is None:
        return caller
    groups: frozenset[int] = frozenset()
    with suppress(OSError, ValueError), open(f"/proc/{ctx.pid}/status") as f:
        for line in f:
            if line.startswith("Groups:"):
                groups = frozenset(int(g) for g in line.split()[1:])
                break
    return Caller(caller.uid, caller.gid, groups, origin="fs")


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_size = attr.size
    e.st_rdev = 0
    e.st_blksize = 128 * 1024
    # what the backend holds, so `du` and sparse-aware copiers see holes; unknown: as if full
    e.st_blocks = ((attr.size if attr.allocated is None else attr.allocated) + 511) // 512
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    e.entry_timeout = CACHE_TIMEOUT
    e.attr_timeout = CACHE_TIMEOUT
    return e


def _name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EINVAL) from None


INVALIDATORS = 4  # threads: one invalidation blocked in the kernel does not hold up the rest


def _invalidate_now(ino: int | None, parent: int | None, name: str | None) -> None:
    if pyfuse3.trio_token is None:
        return  # pyfuse3.main() has returned: the session is about to be destroyed
    # ENOENT only means the kernel had nothing cached
    if parent is not None and name is not None:
        with suppress(OSError):
            pyfuse3.invalidate_entry(parent, name.encode())
    if ino is not None:
        with suppress(OSError):
            pyfuse3.invalidate_inode(ino, attr_only=False)


def _invalidator(todo: queue.SimpleQueue[tuple[int | None, int | None, str | None]]) -> None:
    while True:
        _invalidate_now(*todo.get())


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False  # see the module docstring: coherence over write speed
    enable_acl = False

    def __init__(self, service: Service) -> None:
        super().__init__()
        self.service = service
        self._files: dict[int, OpenFile] = {}
        self._fh = itertools.count(1)
        # invalidations may block in the kernel: at most a few threads, never the drivers' pool
        self._invalidations = trio.CapacityLimiter(INVALIDATORS)
        self._queued: queue.SimpleQueue[tuple[int | None, int | None, str | None]] | None = None
        service.listeners.append(self._invalidate)

    # ------------------------------------------------------------------ cache invalidation

    def _invalidate(self, ino: int | None, parent: int | None, name: str | None) -> None:
        """Queued to a few long-lived threads: every host hears every change, and a worker
        thread handed each invalidation cost a listening host more than the rest of hearing
        the change (measured: 45% of its CPU)."""
        if pyfuse3.trio_token is None:  # not mounted (unit tests call handlers directly)
            return
        if self._queued is None:
            self._queued = queue.SimpleQueue()
            for i in range(INVALIDATORS):
                threading.Thread(target=_invalidator, args=(self._queued,), daemon=True,
                                 name=f"tm2fs-invalidate-{i}").start()
        self._queued.put((ino, parent, name))

    async def _invalidate_in_thread(self, ino: int | None, parent: int | None,
                                    name: str | None) -> None:
        """One invalidation, awaited (an open must not start before it is done)."""
        await trio.to_thread.run_sync(_invalidate_now, ino, parent, name,
                                      limiter=self._invalidations)

    # ------------------------------------------------------------------ metadata

    @timed
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        with _errors():
            if name == b".":
                return _entry(self.service.getattr(parent_inode))
            if name == b"..":
                return _entry(self.service.getattr(self.service.parent_of(parent_inode)))
            if len(name) > NAME_MAX:  # as ext4 answers, rather than ENOENT
                raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
            return _entry(self.service.lookup(parent_inode, _name(name)))

    async def getattr(self, inode: int,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        start = perf_counter_ns()
        try:
            return _entry(self.service.getattr(inode))
        except Exception as e:
            raise _fuse_error(e) from None
        finally:
            OBSERVE_GETATTR(perf_counter_ns() - start)

    @timed
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        kwargs: dict[str, Any] = {}
        if fields.update_mode:
            kwargs["mode"] = attr.st_mode
        if fields.update_uid:
            kwargs["uid"] = attr.st_uid
        if fields.update_gid:
            kwargs["gid"] = attr.st_gid
        if fields.update_size:
            kwargs["size"] = attr.st_size
        if fields.update_atime:
            kwargs["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kwargs["mtime_ns"] = attr.st_mtime_ns
        with _errors():
            return _entry(await self.service.setattr(inode, _caller(ctx), **kwargs))

    @timed
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        with _errors():
            return self.service.readlink(inode).encode()

    @timed
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """`user.tm2fs.source`: the image's native source as JSON (the kernel checked read
        permission: user.* attributes of regular files need it); no other attribute exists."""
        value = None
        if name == XATTR.encode():
            with _errors():
                value = self.service.source_xattr(inode, _caller(ctx))
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @timed
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        try:
            return [XATTR.encode()] if self.service.source_xattr(inode, _caller(ctx)) else []
        except (Tm2Error, OSError):  # a backend in trouble: its images just show no attribute
            return []

    @timed
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        with _errors():
            if not stat.S_ISDIR(self.service.getattr(inode).mode):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @timed
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """The cookie is the inode of the last entry sent: stable under concurrent changes."""
        with _errors():
            after = start_id
            while True:
                entries = self.service.readdir(fh, after, limit=500)
                if not entries:
                    return
                for name, attr in entries:
                    if not pyfuse3.readdir_reply(token, name.encode(), _entry(attr), attr.ino):
                        return
                    after = attr.ino

    @timed
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        with _errors():
            cap = self.service.statfs(pyfuse3.ROOT_INODE)
        return _statvfs(cap.total, cap.free)

    # ------------------------------------------------------------------ namespace changes

    @timed
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _errors():
            return _entry(await self.service.mkdir(parent_inode, _name(name), mode, _caller(ctx)))

    @timed
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with _errors():
            await self.service.rmdir(parent_inode, _name(name), _caller(ctx))

    @timed
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with _errors():
            await self.service.unlink(parent_inode, _name(name), _caller(ctx))

    @timed
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        with _errors():
            await self.service.rename(
                parent_inode_old, _name(name_old), parent_inode_new, _name(name_new), _caller(ctx),
                noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
                exchange=bool(flags & pyfuse3.RENAME_EXCHANGE))

    @timed
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with _errors():
            return _entry(await self.service.symlink(parent_inode, _name(name), _name(target),
                                               _caller_with_groups(ctx)))

    @timed
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # an image has exactly one name

    @timed
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if stat.S_IFMT(mode) != stat.S_IFREG:
            raise pyfuse3.FUSEError(errno.EPERM)  # only regular files (images) live here
        with _errors():
            return _entry(await self.service.create(parent_inode, _name(name), mode,
                                                    _caller(ctx)))

    # ------------------------------------------------------------------ data

    def _add(self, of: OpenFile) -> int:
        fh = next(self._fh)
        self._files[fh] = of
        return fh

    @timed
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        with _errors():
            caller = _caller(ctx)
            attr = await self.service.create(parent_inode, _name(name), mode, caller)
            of = await self.service.open(attr.ino, caller, writable=True,
                                         append=bool(flags & os.O_APPEND))
        return _file_info(self._add(of)), _entry(attr)

    @timed
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        with _errors():
            of = await self.service.open(inode, _caller(ctx), writable=writable,
                                         truncate=bool(flags & os.O_TRUNC),
                                         append=bool(flags & os.O_APPEND))
        if of.stale_kernel and pyfuse3.trio_token is not None:
            # another host changed it: the kernel must drop its cached size before the first
            # read, not some time after (close-to-open consistency)
            await self._invalidate_in_thread(inode, None, None)
        return _file_info(self._add(of))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        start = perf_counter_ns()
        try:
            return await self.service.read(self._files[fh], off, size)
        except Exception as e:
            raise _fuse_error(e) from None
        finally:
            OBSERVE_READ(perf_counter_ns() - start)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        start = perf_counter_ns()
        try:
            return await self.service.write(self._files[fh], off, buf)
        except Exception as e:
            raise _fuse_error(e) from None
        finally:
            OBSERVE_WRITE(perf_counter_ns() - start)

    @timed
    async def flush(self, fh: int) -> None:
        with _errors():
            await self.service.flush(self._files[fh])

    @timed
    async def fsync(self, fh: int, datasync: bool) -> None:
        with _errors():
            await self.service.fsync(self._files[fh])

    @timed
    async def release(self, fh: int) -> None:
        of = self._files.pop(fh)
        with _errors():
            await self.service.release(of)

    @timed
    async def releasedir(self, fh: int) -> None:
        return None

    @timed
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """The directory's entries (every metadata change so far) reach stable storage."""
        with _errors():
            await self.service.sync()


def _file_info(fh: int) -> pyfuse3.FileInfo:
    """No page cache on the mount (module docstring): every read and write is a request."""
    return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=True)


def _statvfs(total: int | None, free: int | None) -> pyfuse3.StatvfsData:
    st = pyfuse3.StatvfsData()
    st.f_bsize = BLOCK
    st.f_frsize = BLOCK
    st.f_blocks = (total or 0) // BLOCK
    st.f_bfree = (free or 0) // BLOCK
    st.f_bavail = st.f_bfree
    st.f_files = FILES
    st.f_ffree = FILES
    st.f_favail = FILES
    st.f_namemax = NAME_MAX
    return st
