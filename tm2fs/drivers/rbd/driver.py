"""`RbdDriver`: the backend's images as RBD images of its pool, through librbd.

Images, copy-on-write clones (a snapshot of the parent each, flattened past MAX_CLONE_DEPTH),
deletes that trash a parent while its clones live, and capacity from `ceph df`: see the package
docstring for the why of each. Every blocking librbd call runs in a worker thread that a timeout
can abandon, on this driver's own limiter.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..base import Capacity, Driver, Handle, Progress
from ..threads import in_thread, open_in_thread
from .ceph import CLONE_SNAP, KEY_RE, T, call, check_key, features, os_error, rados, rbd
from .handle import RbdHandle
from .settings import Settings, check, connect, monitors


class RbdDriver(Driver):
    name = "rbd"
    cheap_clone = True

    def __init__(self, tm_raw: dict[str, Any], state_dir: Path) -> None:
        super().__init__(tm_raw, state_dir)
        self.s = Settings.parse(tm_raw)
        self.limiter = trio.CapacityLimiter(16)
        self.cluster: Any = None
        self.ioctx: Any = None

    # ------------------------------------------------------------------ TM_RAW

    @classmethod
    def validate(cls, tm_raw: dict[str, Any], state_dir: Path, backend_name: str) -> dict[str, Any]:
        """Static checks only; `start()` connects (the service turns its failure into "not reachable")."""
        return check(tm_raw)

    # ------------------------------------------------------------------ connection

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking call in a worker thread that a timeout can abandon, on this driver's limiter."""
        return await in_thread(self.limiter, fn, *args)

    async def start(self) -> None:
        """Connect and check the pool (and namespace); a failure is an OSError saying which."""
        if self.ioctx is not None:
            return  # librados reconnects by itself; a backend back from ERROR keeps its connection
        self.cluster, self.ioctx = await open_in_thread(self.limiter, partial(connect, self.s),
                                                        lambda pair: pair[0].shutdown())

    async def stop(self) -> None:
        cluster, ioctx = self.cluster, self.ioctx
        self.cluster = self.ioctx = None
        if cluster is None:
            return

        def shutdown() -> None:
            with contextlib.suppress(rados.Error):
                ioctx.close()
            cluster.shutdown()

        await self._run(shutdown)

    def source(self, key: str) -> dict[str, Any]:
        """The image as librbd names it, with what a client needs to reach the cluster: the
        monitors as this connection knows them (in memory: no I/O), the Ceph user and keyring."""
        check_key(key)
        if self.cluster is None:
            raise OSError(errno.ENOTCONN, f"rbd driver: not connected to pool {self.s.pool!r}")
        return {"type": "rbd", "pool": self.s.pool, "namespace": self.s.namespace or None,
                "image": key, "monitors": monitors(self.cluster.conf_get("mon_host") or ""),
                "client_id": self.s.client_id, "keyring": self.s.keyring, "conf": self.s.conf_file}

    def _io(self) -> Any:
        if self.ioctx is None:
            raise OSError(errno.ENOTCONN, f"rbd driver: not connected to pool {self.s.pool!r}")
        return self.ioctx

    # ------------------------------------------------------------------ capacity

    async def monitor(self) -> Capacity:
        return await self._run(self._monitor)

    def _monitor(self) -> Capacity:
        ioctx = self._io()
        try:  # one OSD round trip: fails (times out) when no OSD serves the pool
            ioctx.stat("rbd_directory")
        except rados.ObjectNotFound:
            pass
        except rados.Error as e:
            raise os_error(e, f"pool {self.s.pool} does not answer") from None
        cmd = json.dumps({"prefix": "df", "detail": "detail", "format": "json"})
        ret, out, message = call("ceph df", self.cluster.mon_command, cmd, b"")
        if ret < 0:
            raise OSError(-ret, f"ceph df: {message or os.strerror(-ret)}")
        for pool in json.loads(out).get("pools", []):
            if pool.get("name") == self.s.pool:
                stats = pool["stats"]
                break
        else:
            raise OSError(errno.ENOENT, f"pool {self.s.pool!r} is gone")
        used = int(stats.get("stored", stats.get("bytes_used", 0)))
        avail = int(stats["max_avail"])
        quota = int(stats.get("quota_bytes") or 0)
        storage = f"ceph:{self.cluster.get_fsid()}:{self.s.pool}"  # backends on one pool share it
        if quota:
            return Capacity(total=quota, free=max(0, min(quota - used, avail)), used=used,
                            storage=storage)
        return Capacity(total=used + avail, free=avail, used=used, storage=storage)

    # ------------------------------------------------------------------ images

    async def allocate(self, key: str, size: int) -> None:
        check_key(key)
        await self._run(lambda: call(f"create {key}", rbd.RBD().create, self._io(), key, size,
                                     old_format=False, features=features()))

    async def size(self, key: str) -> int:
        check_key(key)

        def _size() -> int:
            with call(f"open {key}", rbd.Image, self._io(), key, read_only=True) as image:
                return call(f"size of {key}", image.size)

        return await self._run(_size)

    async def allocated(self, key: str) -> int:
        """The objects that exist, from the object map (fast-diff): a few reads whatever the
        image's size, at the granularity of whole objects (4 MiB by default)."""
        check_key(key)

        def _allocated() -> int:
            total = 0

            def extent(offset: int, length: int, exists: bool) -> None:
                nonlocal total
                if exists:
                    total += length

            with call(f"open {key}", rbd.Image, self._io(), key, read_only=True) as image:
                size = call(f"size of {key}", image.size)
                call(f"usage of {key}", image.diff_iterate, 0, size, None, extent,
                     whole_object=True)
            return total

        return await self._run(_allocated)

    async def resize(self, key: str, size: int) -> None:
        check_key(key)

        def _resize() -> None:
            with call(f"open {key}", rbd.Image, self._io(), key) as image:
                call(f"resize {key}", image.resize, size)

        await self._run(_resize)

    async def keys(self) -> list[str]:
        """The key-like images of the pool (namespace). Called to sweep leftovers, so it first
        removes trashed parents that no clone needs any more."""

        def _keys() -> list[str]:
            self._sweep_trash()
            return call("list images", rbd.RBD().list, self._io())

        return [n for n in await self._run(_keys) if KEY_RE.fullmatch(n)]

    async def open(self, key: str, writable: bool) -> Handle:
        check_key(key)

        def _open() -> tuple[Any, int]:
            image = call(f"open {key}", rbd.Image, self._io(), key, read_only=not writable)
            try:
                return image, call(f"size of {key}", image.size)
            except BaseException:
                image.close()
                raise

        image, size = await open_in_thread(self.limiter, _open, lambda opened: opened[0].close())
        return RbdHandle(image, key, size, self.limiter)

    # ------------------------------------------------------------------ clone

    async def clone(self, src_key: str, dst_key: str, progress: Progress | None = None) -> None:
        check_key(src_key)
        check_key(dst_key)
        await self._run(self._clone, src_key, dst_key)

    def _clone(self, src: str, dst: str) -> None:
        ioctx = self._io()
        snap = CLONE_SNAP + dst
        with call(f"open {src}", rbd.Image, ioctx, src) as image:
            depth = self._depth(image) + 1
            call(f"snapshot {src}@{snap}", image.create_snap, snap)
            try:
                call(f"protect {src}@{snap}", image.protect_snap, snap)
                call(f"clone {src}@{snap} to {dst}", rbd.RBD().clone, ioctx, src, snap, ioctx, dst,
                     features=features())
            except BaseException:
                _drop_snap(image, snap)
                raise
        if depth <= self.s.max_depth:
            return
        try:
            with call(f"open {dst}", rbd.Image, ioctx, dst) as child:
                call(f"flatten {dst}", child.flatten)
        except BaseException:
            with contextlib.suppress(rbd.Error, OSError):
                rbd.RBD().remove(ioctx, dst)
            with contextlib.suppress(rbd.Error, OSError), rbd.Image(ioctx, src) as image:
                _drop_snap(image, snap)
            raise
        with contextlib.suppress(rbd.Error, OSError), rbd.Image(ioctx, src) as image:
            _drop_snap(image, snap)  # no child left on it

    def _depth(self, image: Any) -> int:
        """The length of the image's parent chain (0 for a plain image)."""
        depth = 0
        opened: list[Any] = []
        try:
            while (parent := self._parent(image)) is not None and depth < 10_000:
                depth += 1
                pool, namespace, parent_id, _ = parent
                ioctx = self._io()
                if (pool, namespace) != (self.s.pool, self.s.namespace):  # a parent in another pool
                    ioctx = call(f"open pool {pool}", self.cluster.open_ioctx, pool)
                    opened.append(ioctx)
                    ioctx.set_namespace(namespace)
                image = call("open parent", rbd.Image, ioctx, image_id=parent_id, read_only=True)
                opened.append(image)
        finally:
            for thing in reversed(opened):
                with contextlib.suppress(rados.Error, rbd.Error):
                    thing.close()
        return depth

    def _parent(self, image: Any) -> tuple[str, str, str, str] | None:
        """(pool, namespace, image id, snapshot name) of the image's parent, or None."""
        try:
            spec = image.get_parent_image_spec()
            parent_id = image.parent_id()
        except rbd.ImageNotFound:
            return None
        except rbd.Error as e:
            raise os_error(e, "parent of an image") from None
        return spec["pool_name"], spec.get("pool_namespace", ""), parent_id, spec["snap_name"]

    # ------------------------------------------------------------------ delete

    async def delete(self, key: str) -> None:
        check_key(key)
        await self._run(self._delete, key)

    def _delete(self, key: str) -> None:
        ioctx = self._io()
        try:
            image = rbd.Image(ioctx, key)
        except rbd.ImageNotFound:
            return  # already gone
        except rbd.Error as e:
            raise os_error(e, f"open {key}") from None
        with image:
            parent = self._parent(image)
            snaps = [s["name"] for s in call(f"snapshots of {key}", image.list_snaps)]
            foreign = [name for name in snaps if not name.startswith(CLONE_SNAP)]
            if foreign:
                raise OSError(errno.EBUSY, f"delete {key}: it has snapshots tm2fs did not make: "
                              f"{', '.join(foreign)}")
            # drop every clone snapshot no clone reads through any more; keep the others
            needed = [name for name in snaps if not _drop_snap(image, name)]
        if needed:  # clones still read through it: it waits in the trash until the last one goes
            call(f"move {key} to the trash", rbd.RBD().trash_move, ioctx, key, 0)
            return
        try:
            rbd.RBD().remove(ioctx, key)
        except rbd.ImageBusy:
            raise OSError(errno.EBUSY, f"remove {key}: the image is open elsewhere, or a client that "
                          "died still watches it (the OSDs drop such a watch after "
                          "osd_client_watch_timeout, 30 s by default)") from None
        except rbd.Error as e:
            raise os_error(e, f"remove {key}") from None
        if parent is not None:
            self._release_parent(parent, CLONE_SNAP + key)

    def _release_parent(self, parent: tuple[str, str, str, str] | None, snap: str) -> None:
        """A clone went: drop its snapshot on the parent, and the parent itself if it waits in the
        trash with no clone left; then the same one level up."""
        ioctx = self._io()
        while parent is not None:
            pool, namespace, parent_id, _ = parent
            if (pool, namespace) != (self.s.pool, self.s.namespace):
                return  # not ours to tidy
            try:
                image = rbd.Image(ioctx, image_id=parent_id)
            except rbd.ImageNotFound:
                return
            except rbd.Error as e:
                raise os_error(e, "open a parent") from None
            with image:
                if call("snapshots", image.snap_exists, snap):
                    _drop_snap(image, snap)
                if not _in_trash(ioctx, parent_id) or list(call("snapshots", image.list_snaps)):
                    return
                grand = self._parent(image)
                name = call("image name", image.get_name)
            call(f"remove trashed {name}", rbd.RBD().trash_remove, ioctx, parent_id)
            parent, snap = grand, CLONE_SNAP + name

    def _sweep_trash(self) -> None:
        """Remove trashed parents (moved there by delete) that no clone needs any more."""
        ioctx = self._io()
        for entry in list(call("list the trash", rbd.RBD().trash_list, ioctx)):
            if not KEY_RE.fullmatch(entry["name"]):
                continue
            try:  # e.g. a parent still busy: tried again next time
                with rbd.Image(ioctx, image_id=entry["id"]) as image:
                    snaps = [s["name"] for s in image.list_snaps()]
                    kept = [name for name in snaps
                            if not name.startswith(CLONE_SNAP) or not _drop_snap(image, name)]
                    if kept:
                        continue
                    parent = self._parent(image)
                rbd.RBD().trash_remove(ioctx, entry["id"])
            except rbd.Error:
                continue  # in use or half-gone: the next sweep tries again
            self._release_parent(parent, CLONE_SNAP + entry["name"])


def _drop_snap(image: Any, snap: str) -> bool:
    """Unprotect and remove one snapshot; False when a clone still depends on it."""
    try:
        if image.is_protected_snap(snap):
            image.unprotect_snap(snap)
        image.remove_snap(snap)
    except rbd.ImageNotFound:
        return True
    except rbd.ImageBusy:
        return False  # it has children
    except rbd.Error as e:
        raise os_error(e, f"remove snapshot {snap}") from None
    return True


def _in_trash(ioctx: Any, image_id: str) -> bool:
    try:
        rbd.RBD().trash_get(ioctx, image_id)
    except rbd.ImageNotFound:
        return False
    except rbd.Error as e:
        raise os_error(e, "look in the trash") from None
    return True
