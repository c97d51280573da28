"""Open images and the data path: what `open`, `read`, `write`, `fsync` and `close` do.

Every open file of one image shares one `OpenImage`: one driver handle and a live size that
getattr shows while the image is open. The data path never waits for the pool store: reads and
writes go to the handle, the size lives in memory, and the pool store learns it at close(2)
(queued, not awaited), at fsync (awaited: fsync promises durability) and at last close. The last
close makes the size durable, then closes the handle (a staging driver pushes its copy back
there), and only then gives up the write lease, so another host that takes the lease sees the
final bytes and size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import perf_counter_ns

import trio

from .. import errors as err
from .. import metrics
from ..drivers.base import Handle, InlineHandle
from ..model import Caller, Node, now_ns
from ..store import Tx
from .allocation import Allocation
from .backends import Backends
from .images import Images
from .leases import Leases
from .namespace import Namespace
from .permissions import READ, WRITE, check
from .pool import Pool

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class OpenImage:
    """One image's open state, shared by every open file on it; size is live while open."""

    image_id: int
    backend_id: int
    key: str
    handle: Handle
    writable: bool  # whether the handle itself may write (not so if opened while DISABLED)
    inline: InlineHandle | None  # the handle, if its calls run inline (see `OpenFiles.read`)
    size: int
    node: Node  # kept current by the pool's deltas: getattr of an open image needs no query
    mtime_ns: int
    observe_read: Callable[[int], None]  # metrics.DRIVER_SECONDS' children, built once (ns)
    observe_write: Callable[[int], None]
    refs: int = 0
    dirty: bool = False  # size or mtime not yet in the pool store
    unmeasured: bool = False  # written since its allocation was last measured
    unlinked: bool = False  # removed from the namespace while open: data goes at last close
    retired: list[Handle] = field(default_factory=list)  # replaced handles, closed at last close
    closing: trio.Event | None = None  # set once the last close is done with the handle
    borrowers: int = 0  # users of the handle that hold no open file (a truncate by path)
    returned: trio.Event | None = None

    @property
    def ino(self) -> int:
        return self.node.ino

    @contextmanager
    def borrowed(self) -> Iterator[OpenImage]:
        """The handle used without an open file (truncate(2) by path, a clone's flush): a last
        close that comes meanwhile waits for it rather than closing the handle under it."""
        self.borrowers += 1
        try:
            yield self
        finally:
            self.borrowers -= 1
            if not self.borrowers and self.returned is not None:
                self.returned.set()

    async def all_returned(self) -> None:
        while self.borrowers:
            self.returned = trio.Event()
            await self.returned.wait()


@dataclass(eq=False, slots=True)
class OpenFile:
    image: OpenImage
    writable: bool
    append: bool = False
    origin: str = "fs"  # who opened it: writes from elsewhere must reach the kernel's caches
    stale_kernel: bool = False  # revalidation found another host's change the kernel may cache


class OpenFiles:
    def __init__(self, pool: Pool, backends: Backends, namespace: Namespace, leases: Leases,
                 images: Images, allocation: Allocation) -> None:
        self.pool = pool
        self.allocation = allocation
        self.backends = backends
        self.ns = namespace
        self.leases = leases
        self.images = images
        #: images whose last close is still running: an open waits, or it could read the backend
        #: before a staging driver (legacy) has pushed the changes back
        self._closing: dict[int, trio.Event] = {}

    async def open(self, ino: int, caller: Caller, writable: bool, truncate: bool = False,
                   append: bool = False) -> OpenFile:
        while (closing := self._closing.get(ino)) is not None:
            await closing.wait()
        n = self.ns.get(ino)
        if n.is_dir:
            raise err.IsADirectory(f"{n.name} is a directory")
        if n.image_id is None:
            raise err.InvalidArgument(f"{n.name} is not an image")
        check(caller, n, READ | WRITE if writable else READ)
        assert n.backend_id is not None
        image_id = n.image_id
        b = self.backends.get(n.backend_id)
        self.backends.usable(b, write=writable or truncate)
        if writable:
            await self.leases.open_for_writing(image_id, n.name)
        try:
            # another host may have written it: re-read its rows, after taking the lease (the
            # last writer committed its size before giving the lease up)
            changed = False
            if self.pool.store.shared and image_id not in self.pool.open:
                changed = await self.pool.revalidate(n)
                if ino in self.pool.remote_touched:
                    self.pool.remote_touched.discard(ino)
                    changed = True
                fresh = self.pool.nodes.get(ino)
                if fresh is None or fresh.image_id != image_id:
                    raise err.NotFound(f"{n.name} is gone")
                n = fresh
            oi = await self._image(n, writable)
            oi.refs += 1
        except BaseException:
            if writable:
                with trio.CancelScope(shield=True):
                    await self.leases.closed_for_writing(image_id)
            raise
        of = OpenFile(oi, writable, append, caller.origin, stale_kernel=changed)
        if truncate and oi.size:
            try:
                await self.images.resize(b, n, 0)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.release(of)
                raise
        return of

    async def _image(self, n: Node, writable: bool) -> OpenImage:
        assert n.image_id is not None and n.backend_id is not None
        oi = self.pool.open.get(n.image_id)
        if oi is not None and (oi.writable or not writable):
            return oi
        b = self.backends.get(n.backend_id)
        im = self.pool.images.get(n.image_id)
        if im is None:
            raise err.NotFound(f"{n.name} does not exist")
        may_write = b.state == "READY"
        if writable:  # the first writer here
            image_id, name = n.image_id, n.name
            await self.pool.read(lambda tx: self.leases.no_native_in(tx, image_id, name))
        async with self.backends.call(b, "open") as driver:
            handle = await driver.open(im.key, writable=may_write)
        current = self.pool.open.get(n.image_id)  # another open may have raced us
        if current is None:
            oi = OpenImage(im.id, b.id, im.key, handle, may_write, _inline(handle), im.size, n,
                           n.mtime_ns, metrics.DRIVER_SECONDS.labels(b.name, "read").observe_ns,
                           metrics.DRIVER_SECONDS.labels(b.name, "write").observe_ns)
            self.pool.open[im.id] = oi
            self.pool.open_ino[n.ino] = oi
            return oi
        if writable and not current.writable and may_write:
            # first opened while DISABLED: a writer now gets a writable handle; the old one may
            # still serve reads in flight, so it is closed at the last close
            current.retired.append(current.handle)
            current.handle, current.writable, current.inline = handle, True, _inline(handle)
        else:
            async with self.backends.data(b.id, "close"):
                await handle.aclose()
        return current

    async def read(self, of: OpenFile, offset: int, size: int) -> bytes:
        """The hot path, kept lean (measured: benchmarks/pyfuse3_ceiling.py): plain dict and
        attribute lookups (the backend's current state is seen at once), no context manager;
        the driver's time goes to a histogram child the open image holds (no label lookup).
        An inline handle's blocking call is made directly: it never yields to the trio loop, so
        no timeout could interrupt it anyway. Any other handle's call runs under the backend's
        timeout, which can abandon it."""
        oi = of.image
        b = self.backends.by_id.get(oi.backend_id)
        if b is None or (b.state != "READY" and b.state != "DISABLED"):
            b = self.backends.get(oi.backend_id)
            self.backends.usable(b, write=False)
        if offset >= oi.size:
            return b""
        if size > oi.size - offset:
            size = oi.size - offset
        start = perf_counter_ns()
        try:
            if oi.inline is not None:
                data = oi.inline.pread(offset, size)
            else:
                with trio.fail_after(b.timeout):
                    data = await oi.handle.apread(offset, size)
        except (trio.TooSlowError, OSError) as e:
            raise await self.backends.data_error(b, "read", e) from None
        oi.observe_read(perf_counter_ns() - start)
        return data

    async def write(self, of: OpenFile, offset: int, data: bytes) -> int:
        """As lean as read."""
        oi = of.image
        b = self.backends.by_id.get(oi.backend_id)
        if b is None or b.state != "READY":
            b = self.backends.get(oi.backend_id)
            self.backends.usable(b, write=True)
        if not of.writable:
            raise err.PermissionDenied("file is not open for writing")
        if of.append:
            offset = oi.size
        end = offset + len(data)
        if end > oi.size:
            self.images.fits(b, end)
        start = perf_counter_ns()
        try:
            if oi.inline is not None:
                n = oi.inline.pwrite(offset, data)
            else:
                with trio.fail_after(b.timeout):
                    n = await oi.handle.apwrite(offset, data)
        except (trio.TooSlowError, OSError) as e:
            raise await self.backends.data_error(b, "write", e) from None
        oi.observe_write(perf_counter_ns() - start)
        if offset + n > oi.size:
            oi.size = offset + n
        oi.mtime_ns = now_ns()
        oi.dirty = oi.unmeasured = True
        return n

    async def flush(self, of: OpenFile) -> None:
        """close(2): the size and times reach the pool store, so whoever opens the image next,
        on any host, sees what was written (close-to-open, as NFS; durability is fsync's)."""
        await self.images.commit_size(of.image)
        await self.allocation.after_writes(of.image)

    async def fsync(self, of: OpenFile) -> None:
        """The data reaches the backend's durable state, then the size is committed and the
        pool store synced."""
        oi = of.image
        async with self.backends.data(oi.backend_id, "fsync"):
            await oi.handle.aflush()
        await self.images.commit_size(oi)
        await self.pool.db.sync()

    async def release(self, of: OpenFile) -> None:
        oi = of.image
        if of.writable and of.origin != "fs":
            for listener in self.pool.listeners:  # the mount's cached size and pages are stale
                listener(oi.ino, None, None)
        oi.refs -= 1
        if oi.refs > 0:
            if of.writable:
                await self.leases.closed_for_writing(oi.image_id)
            return
        self._closing[oi.ino] = oi.closing = closed = trio.Event()
        try:
            with trio.CancelScope(shield=True):
                await oi.all_returned()
            await self._last_close(oi)
        finally:
            # only now: until the size is committed (and in memory) getattr shows the live one
            del self.pool.open[oi.image_id]
            self.pool.open_ino.pop(oi.ino, None)
            del self._closing[oi.ino]
            closed.set()
            if of.writable:
                await self.leases.closed_for_writing(oi.image_id)
        if oi.unlinked:
            await self._drop_unlinked(oi)

    async def _last_close(self, oi: OpenImage) -> None:
        """The size durable, then the handle closed (a staging driver pushes its copy here)."""
        try:
            await self.images.commit_size(oi)
        finally:
            try:
                async with self.backends.data(oi.backend_id, "close"):
                    for handle in [*oi.retired, oi.handle]:
                        await handle.aclose()
            except err.Tm2Error as e:
                log.error("closing image %d: %s", oi.image_id, e.message)
            if oi.writable:  # a staging driver has only now pushed its copy back
                self.pool.unmeasured.add(oi.image_id)

    async def _drop_unlinked(self, oi: OpenImage) -> None:
        """Its name went while it was open: the image and its data go with the last close."""
        def work(tx: Tx) -> str | None:
            im = tx.image(oi.image_id)
            tx.delete_image(oi.image_id)
            return im.key if im else None

        key = await self.pool.write(work)
        if key is not None:
            await self.backends.delete_data(self.backends.get(oi.backend_id), key)

    async def stop(self) -> None:
        """Close every open image, making it durable."""
        for oi in list(self.pool.open.values()):
            try:
                await self.images.commit_size(oi)
                async with self.backends.data(oi.backend_id, "close"):
                    await oi.handle.aclose()
            except (OSError, err.Tm2Error) as e:
                log.error("closing image %d: %s", oi.image_id, e)
        self.pool.open.clear()
        self.pool.open_ino.clear()


def _inline(handle: Handle) -> InlineHandle | None:
    """An `InlineHandle` is read and written through its blocking calls, without a coroutine or
    a cancel scope per request (a few microseconds each)."""
    return handle if isinstance(handle, InlineHandle) else None
