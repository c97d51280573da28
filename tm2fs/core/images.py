"""The image lifecycle: the one protocol that makes an image, and its size changes.

Making an image (create, allocate, an in-backend clone, the target of a copy) is always: space
reserved (or already reserved by placement), the driver allocates or clones under a fresh key,
then one transaction adds the image and its name and drops the reservation. A crash in between
leaves a reserved key that `recovery.py` sweeps; any failure gives back the reservation and the
data. A size change is promised like a new image (growth reserves) and committed after the driver
made it.

An image filled after it is made (a push, a write, a copy across backends) is made `hidden`: its
entry is outside the tree (no parent, named `HOST/KEY`, a name no directory entry can have), so no
lookup, readdir or address finds it. When its bytes are complete and synced, one transaction
either names it (`publish`) or hands its data to the image it replaces (`replace_with`); a crash
before that leaves only the hidden entry, which the host's next reconcile removes.
"""

from __future__ import annotations

import logging
import stat
import threading
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from .. import errors as err
from ..drivers.base import Progress
from ..model import Attr, Backend, Caller, Node, now_ns
from ..names import check_name
from ..sizes import MAX_SIZE
from ..store import Tx
from .backends import Backends, quietly
from .leases import Leases
from .namespace import Namespace
from .permissions import WRITE, check, new_gid
from .placing import Placing
from .pool import KERNEL_KNOWS, Pool

if TYPE_CHECKING:
    from .openfiles import OpenImage

log = logging.getLogger(__name__)

RATE_FLOOR = 8 * 2**20  # bytes/s: whole-image work slower than this is presumed hung


def incomplete_name(host: str, key: str) -> str:
    """The name of a hidden image's entry: its host (whose reconcile removes it if the host
    crashed) and key. A '/' no directory entry can have."""
    return f"{host}/{key}"


def whole_image_timeout(b: Backend, size: int) -> float:
    """A clone or copy may take as long as its size needs at a slow but live pace."""
    return b.timeout + size / RATE_FLOOR


class Images:
    def __init__(self, pool: Pool, backends: Backends, namespace: Namespace, leases: Leases,
                 placing: Placing) -> None:
        self.pool = pool
        self.backends = backends
        self.ns = namespace
        self.leases = leases
        self.placing = placing

    async def create(self, parent: int, name: str, mode: int, caller: Caller, size: int = 0,
                     reservation: int | None = None, key: str | None = None,
                     source: Node | None = None, progress: Progress | None = None,
                     hidden: bool = False, folders: Sequence[str] = ()) -> Attr:
        """A new image of `size` bytes in directory `parent` (or in `folders` below it, made in
        the image's transaction where missing): allocated, or cloned from `source` (an image on
        the same backend). `reservation`/`key`: placement reserved already. `hidden`: made
        outside the tree, to be filled and then named by `publish` (which makes `folders`)."""
        check_name(name)
        p, b = self.ns.dir_for_change(parent, caller)
        if not hidden and not folders:
            self.ns.free_name(parent, name)
        key = key or uuid.uuid4().hex
        try:
            if reservation is None:
                reservation = await self.placing.reserve(b.id, size, key)
            if source is None:
                async with self.backends.call(b, "allocate") as driver:
                    await driver.allocate(key, size)
            else:
                await self._clone_data(b, source, key, size, progress)
        except BaseException:
            with trio.CancelScope(shield=True):
                await quietly(self.placing.unreserve(reservation))
            raise
        t = now_ns()
        gid = new_gid(caller, p)
        kind = stat.S_IFREG | (mode & 0o7777)

        def work(tx: Tx) -> int:
            tx.delete_reservation(reservation)
            image_id = tx.insert_image(b.id, key, size)
            if hidden:
                return tx.insert_node(parent=None, name=incomplete_name(self.pool.host, key),
                                      backend_id=b.id, mode=stat.S_IFREG | 0o600, uid=caller.uid,
                                      gid=gid, atime_ns=t, mtime_ns=t, ctime_ns=t,
                                      image_id=image_id)
            where = self.ns.folders_in(tx, p, folders, caller, t) if folders else parent
            if folders and tx.child(where, name) is not None:
                raise err.Exists(f"{name} exists")
            ino = tx.insert_node(parent=where, name=name, backend_id=b.id, mode=kind,
                                 uid=caller.uid, gid=gid, atime_ns=t, mtime_ns=t, ctime_ns=t,
                                 image_id=image_id)
            tx.update_node(where, mtime_ns=t, ctime_ns=t)
            return ino

        try:
            ino = await self.pool.write(work, caller)
        except BaseException as e:
            # a change that may yet commit keeps its data
            if not (isinstance(e, err.StoreUnavailable) and e.maybe_done):
                with trio.CancelScope(shield=True):
                    await quietly(self.placing.unreserve(reservation))
                    await quietly(self.backends.runtime(b).driver.delete(key))
            raise
        self.pool.stale.add(b.id)
        return self.ns.attr(self.ns.get(ino))

    async def publish(self, ino: int, parent: int, name: str, mode: int, caller: Caller,
                      folders: Sequence[str] = ()) -> Attr:
        """A hidden image, complete and synced, takes its name (in `folders` below `parent`,
        made where missing) in one transaction."""
        check_name(name)
        p, _ = self.ns.dir_for_change(parent, caller)
        if not folders:
            self.ns.free_name(parent, name)
        t = now_ns()
        kind = stat.S_IFREG | (mode & 0o7777)

        def work(tx: Tx) -> None:
            where = self.ns.folders_in(tx, p, folders, caller, t) if folders else parent
            if tx.child(where, name) is not None:  # another host took the name meanwhile
                raise err.Exists(f"{name} exists")
            tx.update_node(ino, parent=where, name=name, mode=kind, mtime_ns=t, ctime_ns=t)
            tx.update_node(where, mtime_ns=t, ctime_ns=t)

        await self.pool.write(work, caller)
        return self.ns.attr(self.ns.get(ino))

    async def replace_with(self, old: Node, ino: int, caller: Caller) -> None:
        """The image of entry `old` takes the data of hidden image `ino` in one transaction: the
        entry, its inode, owner, mode and attachments stay; its old data goes after the commit."""
        staged = self.ns.get(ino)
        assert old.image_id is not None and staged.image_id is not None
        image_id, staged_id = old.image_id, staged.image_id
        if image_id in self.pool.open:
            raise err.Busy(f"{old.name} was opened during the write; it is unchanged",
                           "close it and write again")
        t = now_ns()

        def work(tx: Tx) -> str:
            now = tx.node(old.ino)
            if now is None or now.image_id != image_id:
                raise err.NotFound(f"{old.name} was removed or replaced during the write")
            if image_id in self.pool.open:
                raise err.Busy(f"{old.name} was opened during the write; it is unchanged")
            self.leases.not_elsewhere_in(tx, image_id, old.name)
            self.leases.no_native_in(tx, image_id, old.name)
            before, new = tx.image(image_id), tx.image(staged_id)
            assert before is not None and new is not None
            tx.delete_node(ino)
            tx.delete_image(staged_id)
            tx.set_image_data(image_id, new.key, new.size)
            tx.update_node(old.ino, mtime_ns=t, ctime_ns=t)
            return before.key

        key = await self.pool.write(work, caller)
        await self.backends.delete_data(self.backends.get(staged.backend_id or 0), key)

    async def discard(self, ino: int) -> None:
        """A hidden image given up on (its transfer failed): its rows and its data go."""
        n = self.pool.nodes.get(ino)
        if n is None or n.parent is not None or n.image_id is None:
            return
        image_id = n.image_id

        def work(tx: Tx) -> str | None:
            im = tx.image(image_id)
            tx.delete_node(ino)
            tx.delete_image(image_id)
            return im.key if im else None

        key = await self.pool.write(work)
        if key is not None and n.backend_id is not None:
            await self.backends.delete_data(self.backends.get(n.backend_id), key)

    async def _clone_data(self, b: Backend, source: Node, key: str, size: int,
                          progress: Progress | None) -> None:
        """The driver's clone (reflink/COW where it can), with time to match the size; a clone
        given up on is told to stop at its next progress report instead of running on."""
        assert source.image_id is not None
        src = self.pool.images.get(source.image_id)
        if src is None:
            raise err.NotFound(f"{source.name} does not exist")
        stop = threading.Event()

        def report(done: int) -> None:
            if stop.is_set():
                raise InterruptedError("clone given up")
            if progress:
                progress(done)

        try:
            async with self.backends.call(b, "clone", whole_image_timeout(b, size)) as driver:
                await driver.clone(src.key, key, report)
        finally:
            stop.set()

    async def commit_size(self, oi: OpenImage) -> None:
        """An open image's size and mtime reach the pool store (others cache the old size)."""
        if not oi.dirty or oi.unlinked:
            return
        size, mtime = oi.size, oi.mtime_ns
        oi.dirty = False

        def work(tx: Tx) -> None:
            tx.set_image_size(oi.image_id, size)
            tx.update_node(oi.ino, mtime_ns=mtime, ctime_ns=mtime)

        self.pool.stale.add(oi.backend_id)
        try:
            await self.pool.write(work, KERNEL_KNOWS)
        except BaseException:
            oi.dirty = True  # not committed: the next flush, fsync or close tries again
            raise

    async def resize(self, b: Backend, n: Node, size: int) -> None:
        """Truncate or grow an image (open or not); growth is reserved until committed."""
        if size < 0 or size > MAX_SIZE:
            raise err.InvalidArgument(f"size {size} is out of range")
        assert n.image_id is not None
        image_id = n.image_id
        im = self.pool.images.get(image_id)
        if im is None:
            raise err.NotFound(f"{n.name} does not exist")
        if self.leases.enabled and image_id not in self.leases.writers:
            await self.pool.read(lambda tx: self.leases.not_elsewhere_in(tx, image_id, n.name))
        current = self.pool.image_size(image_id)
        reservation = (await self.placing.reserve(b.id, size - current, None)
                       if size > current else None)
        try:
            oi = await self.pool.open_image(image_id)
            t = now_ns()
            if oi is not None:
                with oi.borrowed():
                    async with self.backends.data(b.id, "resize"):
                        await oi.handle.atruncate(size)
                    oi.size, oi.mtime_ns, oi.dirty = size, t, True
                    oi.unmeasured = True
                    await self.commit_size(oi)
                return
            async with self.backends.call(b, "resize") as driver:
                await driver.resize(im.key, size)
            self.pool.stale.add(b.id)

            def work(tx: Tx) -> None:
                tx.set_image_size(image_id, size)
                tx.update_node(n.ino, mtime_ns=t)

            await self.pool.write(work)
        finally:
            with trio.CancelScope(shield=True):
                await quietly(self.placing.unreserve(reservation))

    def fits(self, b: Backend, size: int) -> None:
        limit = b.total if b.capacity is None else min(b.capacity, b.total or b.capacity)
        if limit is not None and size > limit:
            raise err.FileTooBig(f"{size} bytes do not fit backend {b.name} "
                                 f"(capacity {limit} bytes)", "choose a smaller size or backend")

    async def setattr(self, ino: int, caller: Caller, **changes: Any) -> Attr:
        """chmod, chown, truncate and utimens."""
        n = self.ns.get(ino)
        if n.backend_id is None:
            raise err.NotPermitted("the top level cannot be changed")
        b = self.backends.get(n.backend_id)
        self.backends.usable(b, write=True)
        size = changes.pop("size", None)
        if size is not None:
            if not n.is_file:
                raise (err.IsADirectory if n.is_dir else err.InvalidArgument)(
                    f"{n.name} is not an image")
            if caller.origin == "api":
                check(caller, n, WRITE)
            await self.resize(b, n, size)
        values = {k: v for k, v in changes.items() if v is not None}
        if not values and size is not None:
            return self.ns.getattr(ino)
        return await self.ns.set_meta(self.ns.get(ino), caller, values)
