"""`rbd`: images as Ceph RBD images in one pool (and optionally one RADOS namespace).

Why: a Ceph pool is shared storage every hypervisor reaches, with thin images and copy-on-write
clones; this driver lets such a pool serve as a tm2fs backend, reached through librbd (the
distribution's python3-rados / python3-rbd bindings), with no kernel mapping and no FUSE of its own.

How: image KEY is the RBD image named KEY (the service's opaque 32-hex keys). One librados
connection per backend, opened by `start()` and closed by `stop()`.

- Data path: `RbdHandle.apread/apwrite/aflush` use librbd's asynchronous calls. The completion
  callback runs on a librbd thread and wakes the waiting trio task through the loop's TrioToken
  (`run_sync_soon` + `reschedule`): no thread hop per request. A write past the end grows the
  image first (librbd would silently clip it). `aflush` is librbd's flush: every acknowledged
  write is then on the OSDs.
- Control calls (create, remove, clone, resize, stats, opening an image) block in librbd, so each
  runs in a worker thread that a timeout can abandon, under a `trio.CapacityLimiter` of this
  driver's own: a dead cluster ties up only these threads and never stalls the trio thread.
- Timeouts: librados waits forever by default. The connection sets `rados_osd_op_timeout`,
  `rados_mon_op_timeout` and `client_mount_timeout` to CONNECT_TIMEOUT, so every call against a
  dead OSD or monitor fails with ETIMEDOUT after that long, and `objecter_timeout` (the age at
  which an op asks the monitors for a newer OSD map) and `objecter_tick_interval` (how often that
  is checked; 10 s and 5 s by default) well below it, so a restarted OSD is found again by the
  next op instead of each op timing out against the dead address.
- `monitor()` first does one OSD read (the monitors answer from their maps even when every OSD
  is dead), then reads `df detail`: total = used + MAX AVAIL of the pool (its share of the raw
  space, replication already counted), free = MAX AVAIL; with a pool quota, total = the quota and
  free = min(quota - used, MAX AVAIL). A shared pool's figures are the pool's, namespace or not.
- Errors of librados/librbd become OSError with a fitting errno (ImageNotFound ENOENT,
  ImageExists EEXIST, ImageBusy/ImageHasSnapshots EBUSY, timeouts ETIMEDOUT, a shut-down
  connection ENOTCONN, NoSpace ENOSPC, anything else EIO), which the service maps.

Clones are copy-on-write: clone(SRC, DST) takes snapshot `tm2fs-clone-DST` of SRC, protects it
and clones DST from it (format 1 or 2, as the cluster allows), so a clone costs no data and takes
milliseconds whatever the size. Each clone has its own snapshot on its parent, so the parent
knows exactly which snapshot to drop when that clone goes.

- Clone depth: reads of a deep clone walk its parent chain. When DST's chain would be longer than
  MAX_CLONE_DEPTH (default 8; 0 flattens every clone), DST is flattened (its data copied from the
  chain) right away, inside the clone call and in its worker thread: the driver has no task of its
  own to do it later, and a flattened clone is a plain image whose cost is paid once. Its
  snapshot on SRC is then dropped.
- Delete of an image that has clones: the clones keep working. The image is moved to the RBD
  trash (gone from `keys()`, `size()` answers ENOENT; the name is free again) and stays there as
  long as any clone needs it; deleting the last clone drops the parent's snapshot and removes the
  trashed parent, all the way up the chain. `keys()` (the service's sweep of leftovers) also
  removes trashed parents whose clones are gone (a crash between the two steps). Flattening the
  children instead would make a delete cost a full copy of every child, bounded only by the
  backend's TIMEOUT.
- Delete removes the `tm2fs-clone-*` snapshots the image owns. An image that also has snapshots
  tm2fs did not make is refused with EBUSY (they are someone else's to remove). So is an image
  another client has open, and, for up to `osd_client_watch_timeout` (30 s), one that was open
  while its OSD crashed (librbd could not drop its old watch); the service leaves such data to
  its sweep of leftovers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

from ..errors import InvalidArgument
from .base import Capacity, Driver, Handle, Progress
from .base import check_key as plain_key

try:  # the bindings exist only as distribution packages (python3-rados, python3-rbd)
    import rados
    import rbd
except ImportError:  # pragma: no cover - reported by validate()
    rados = rbd = None

T = TypeVar("T")

KNOWN = {"CEPH_CONF", "CLIENT_ID", "KEYRING", "POOL", "NAMESPACE", "MAX_CLONE_DEPTH", "CONNECT_TIMEOUT"}
DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_CLIENT = "admin"
DEFAULT_DEPTH = 8
DEFAULT_TIMEOUT = 10.0
CLONE_SNAP = "tm2fs-clone-"
KEY_RE = re.compile(r"[0-9a-f]{32}")
NAME_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}")
HINT = ("the rbd driver takes POOL=name and optionally CEPH_CONF=/etc/ceph/ceph.conf, CLIENT_ID=admin, "
        "KEYRING=/path, NAMESPACE=name, MAX_CLONE_DEPTH=8, CONNECT_TIMEOUT=10 (seconds)")


def features() -> int:
    """Thin, COW-capable images with a fast usage map; deep-flatten so flattening frees parents."""
    return (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK | rbd.RBD_FEATURE_OBJECT_MAP
            | rbd.RBD_FEATURE_FAST_DIFF | rbd.RBD_FEATURE_DEEP_FLATTEN)


def os_error(e: BaseException, what: str) -> OSError:
    """A librados/librbd exception as an OSError with a fitting errno (the service maps those)."""
    if isinstance(e, OSError):  # builtin, e.g. raised by this module
        return e
    code = getattr(e, "errno", None) or errno.EIO
    if isinstance(e, rbd.ImageHasSnapshots | rbd.ImageBusy):
        code = errno.EBUSY
    elif isinstance(e, rbd.Timeout | rados.TimedOut):
        code = errno.ETIMEDOUT
    elif isinstance(e, rbd.ConnectionShutdown | rados.ConnectionShutdown) or code == errno.ESHUTDOWN:
        code = errno.ENOTCONN
    text = re.sub(r"^\[errno \d+\] ", "", str(e))
    return OSError(code, f"{what}: {text}")


def call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking librbd/librados call with its errors mapped to OSError."""
    try:
        return fn(*args, **kwargs)
    except (rados.Error, rbd.Error) as e:
        raise os_error(e, what) from None


def check_key(key: str) -> None:
    """Keys name RBD images: no pool/snapshot separators, short enough for a snapshot name too."""
    plain_key(key, "rbd")
    if len(key) > 200 or "@" in key:
        raise InvalidArgument(f"rbd driver: invalid image key {key!r}")


async def wait_aio(start: Callable[[Callable[..., None]], object], what: str, keep: object = None) -> Any:
    """Start one librbd aio call and sleep until its completion fires; returns its result.

    `start(callback)` issues the call. The callback runs on a librbd thread; it hands the
    outcome to the trio thread with the loop's TrioToken, which reschedules the waiting task.
    If the task is cancelled meanwhile (a timeout), the late completion is dropped; the callback
    keeps `keep` (a write's buffer) alive until librbd is done with it."""
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    waiting = True

    def wake(result: outcome.Outcome) -> None:  # on the trio thread
        if waiting:
            trio.lowlevel.reschedule(task, result)

    def on_complete(completion: Any, *data: Any, _keep: object = keep) -> None:  # on a librbd thread
        ret = completion.get_return_value()
        if ret < 0:
            result: outcome.Outcome = outcome.Error(OSError(-ret, f"{what}: {os.strerror(-ret)}"))
        else:
            result = outcome.Value(data[0] if data else ret)
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(wake, result)

    call(what, start, on_complete)

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal waiting
        waiting = False
        return trio.lowlevel.Abort.SUCCEEDED

    return await trio.lowlevel.wait_task_rescheduled(abort)


class RbdHandle(Handle):
    """Random access to one open RBD image. The a* methods are librbd aio, woken through trio."""

    __slots__ = ("_grow", "image", "key", "limiter", "size")

    def __init__(self, image: Any, key: str, size: int, limiter: trio.CapacityLimiter) -> None:
        self.image = image
        self.key = key
        self.size = size  # this handle's view; only writes and truncates through it change it
        self.limiter = limiter
        self._grow = trio.Lock()

    # blocking variants: only ever used off the trio thread

    def pread(self, offset: int, size: int) -> bytes:
        length = min(size, self.size - offset)
        if length <= 0:
            return b""
        return call(f"read {self.key}", self.image.read, offset, length)

    def pwrite(self, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if end > self.size:
            self.truncate(end)
        call(f"write {self.key}", self.image.write, bytes(data), offset)
        return len(data)

    def truncate(self, size: int) -> None:
        call(f"resize {self.key}", self.image.resize, size)
        self.size = size

    def flush(self) -> None:
        call(f"flush {self.key}", self.image.flush)

    def close(self) -> None:
        call(f"close {self.key}", self.image.close)

    # the data path on the trio thread

    async def apread(self, offset: int, size: int) -> bytes:
        length = min(size, self.size - offset)
        if length <= 0:
            return b""
        image = self.image
        return await wait_aio(lambda cb: image.aio_read(offset, length, cb), f"read {self.key}")

    async def apwrite(self, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if end > self.size:
            async with self._grow:
                if end > self.size:
                    await self._thread(self.truncate, end)
        buf = data if type(data) is bytes else bytes(data)
        image = self.image
        await wait_aio(lambda cb: image.aio_write(buf, offset, cb), f"write {self.key}", keep=buf)
        return len(buf)

    async def aflush(self) -> None:
        image = self.image
        await wait_aio(image.aio_flush, f"flush {self.key}")

    async def atruncate(self, size: int) -> None:
        async with self._grow:
            await self._thread(self.truncate, size)

    async def aclose(self) -> None:
        await self._thread(self.close)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self.limiter)


class RbdDriver(Driver):
    name = "rbd"
    cheap_clone = True

    def __init__(self, tm_raw: dict[str, Any], state_dir: Path) -> None:
        super().__init__(tm_raw, state_dir)
        raw = {k.upper(): v for k, v in tm_raw.items()}
        self.conf_file = str(raw.get("CEPH_CONF") or DEFAULT_CONF)
        self.client_id = str(raw.get("CLIENT_ID") or DEFAULT_CLIENT).removeprefix("client.")
        self.keyring = str(raw["KEYRING"]) if raw.get("KEYRING") else None
        self.pool = str(raw["POOL"])
        self.namespace = str(raw.get("NAMESPACE") or "")
        self.max_depth = int(raw.get("MAX_CLONE_DEPTH", DEFAULT_DEPTH))
        self.timeout = float(raw.get("CONNECT_TIMEOUT", DEFAULT_TIMEOUT))
        self.limiter = trio.CapacityLimiter(16)
        self.cluster: Any = None
        self.ioctx: Any = None

    # ------------------------------------------------------------------ TM_RAW

    @classmethod
    def validate(cls, tm_raw: dict[str, Any], state_dir: Path, backend_name: str) -> dict[str, Any]:
        """Static checks only; `start()` connects (the service turns its failure into "not reachable")."""
        if rados is None or rbd is None:
            raise InvalidArgument("rbd driver: the Ceph Python bindings are not installed",
                                  "apt-get install python3-rados python3-rbd (the virtual env needs "
                                  "--system-site-packages)")
        raw = {k.upper(): v for k, v in tm_raw.items()}
        unknown = set(raw) - KNOWN
        if unknown:
            raise InvalidArgument(f"rbd driver: unknown TM_RAW attribute(s) {', '.join(sorted(unknown))}",
                                  HINT)
        pool = str(raw.get("POOL") or "")
        if not pool:
            raise InvalidArgument("rbd driver: POOL is missing from TM_RAW", HINT)
        if not NAME_RE.fullmatch(pool):
            raise InvalidArgument(f"rbd driver: POOL {pool!r} is not a plain pool name", HINT)
        out: dict[str, Any] = {"POOL": pool}
        conf = str(raw.get("CEPH_CONF") or DEFAULT_CONF)
        if not os.path.isabs(conf) or "\0" in conf:
            raise InvalidArgument(f"rbd driver: CEPH_CONF {conf!r} is not an absolute path", HINT)
        if not os.path.isfile(conf) or not os.access(conf, os.R_OK):
            raise InvalidArgument(f"rbd driver: cannot read CEPH_CONF {conf!r}",
                                  "copy the cluster's ceph.conf (mon_host at least) to this host")
        out["CEPH_CONF"] = conf
        client = str(raw.get("CLIENT_ID") or DEFAULT_CLIENT).removeprefix("client.")
        if not NAME_RE.fullmatch(client):
            raise InvalidArgument(f"rbd driver: CLIENT_ID {client!r} is not a plain Ceph user name",
                                  "e.g. CLIENT_ID=admin or CLIENT_ID=tm2fs (for client.tm2fs)")
        out["CLIENT_ID"] = client
        if raw.get("KEYRING"):
            keyring = str(raw["KEYRING"])
            if not os.path.isabs(keyring) or not os.path.isfile(keyring) or not os.access(keyring, os.R_OK):
                raise InvalidArgument(f"rbd driver: cannot read KEYRING {keyring!r}",
                                      f"e.g. /etc/ceph/ceph.client.{client}.keyring")
            out["KEYRING"] = keyring
        if raw.get("NAMESPACE"):
            namespace = str(raw["NAMESPACE"])
            if not NAME_RE.fullmatch(namespace):
                raise InvalidArgument(f"rbd driver: NAMESPACE {namespace!r} is not a plain name", HINT)
            out["NAMESPACE"] = namespace
        depth = str(raw.get("MAX_CLONE_DEPTH", DEFAULT_DEPTH)).strip()
        if not depth.isdigit() or int(depth) > 1000:
            raise InvalidArgument(f"rbd driver: MAX_CLONE_DEPTH {depth!r} is not a whole number 0-1000",
                                  "clones deeper than this are flattened; 0 flattens every clone")
        out["MAX_CLONE_DEPTH"] = str(int(depth))
        timeout = str(raw.get("CONNECT_TIMEOUT", DEFAULT_TIMEOUT))
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 600:
            raise InvalidArgument(f"rbd driver: CONNECT_TIMEOUT {timeout!r} is not a number of seconds "
                                  "in (0, 600]", HINT)
        out["CONNECT_TIMEOUT"] = f"{seconds:g}"
        return out

    # ------------------------------------------------------------------ connection

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking call in a worker thread that a timeout can abandon, on this driver's limiter."""
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self.limiter)

    def _rados_conf(self) -> dict[str, str]:
        t = f"{self.timeout:g}"
        lag = f"{min(1.0, self.timeout / 3):g}"
        conf = {"rados_osd_op_timeout": t, "rados_mon_op_timeout": t, "client_mount_timeout": t,
                "objecter_timeout": lag, "objecter_tick_interval": lag}
        if self.keyring:
            conf["keyring"] = self.keyring
        return conf

    async def start(self) -> None:
        """Connect and check the pool (and namespace); a failure is an OSError saying which."""
        if self.ioctx is not None:
            return  # librados reconnects by itself; a backend back from ERROR keeps its connection
        lock = threading.Lock()
        state: dict[str, Any] = {"abandoned": False, "result": None}

        def connect() -> tuple[Any, Any]:
            cluster, ioctx = self._connect()
            with lock:
                if state["abandoned"]:  # the caller gave up meanwhile: do not leak a connection
                    threading.Thread(target=cluster.shutdown, daemon=True).start()
                else:
                    state["result"] = (cluster, ioctx)
            return cluster, ioctx

        try:
            self.cluster, self.ioctx = await self._run(connect)
        except trio.Cancelled:
            with lock:
                state["abandoned"] = True
                late = state["result"]
            if late is not None:
                threading.Thread(target=late[0].shutdown, daemon=True).start()
            raise

    def _connect(self) -> tuple[Any, Any]:
        where = f"the Ceph cluster of {self.conf_file}"
        try:
            cluster = rados.Rados(conffile=self.conf_file, rados_id=self.client_id, conf=self._rados_conf())
        except rados.Error as e:
            raise OSError(errno.EINVAL, f"cannot use {self.conf_file}: {e}") from None
        try:
            try:
                cluster.connect(timeout=max(1, round(self.timeout)))
            except (rados.TimedOut, rados.InterruptedOrTimeoutError):
                raise OSError(errno.ETIMEDOUT, f"no monitor of {where} answered within {self.timeout:g}s "
                              "(check mon_host there)") from None
            except (rados.PermissionError, rados.PermissionDeniedError) as e:
                raise OSError(errno.EACCES, f"{where} refused client.{self.client_id}: {e} "
                              "(check CLIENT_ID and KEYRING)") from None
            except rados.Error as e:
                raise os_error(e, f"cannot connect to {where} as client.{self.client_id}") from None
            if not call("list pools", cluster.pool_exists, self.pool):
                raise OSError(errno.ENOENT, f"pool {self.pool!r} does not exist in {where} "
                              f"(ceph osd pool create {self.pool}; rbd pool init {self.pool})")
            ioctx = call(f"open pool {self.pool}", cluster.open_ioctx, self.pool)
            try:
                if self.namespace:
                    if not call("list namespaces", rbd.RBD().namespace_exists, ioctx, self.namespace):
                        raise OSError(errno.ENOENT, f"namespace {self.namespace!r} does not exist in pool "
                                      f"{self.pool!r} (rbd namespace create {self.pool}/{self.namespace})")
                    ioctx.set_namespace(self.namespace)
            except BaseException:
                ioctx.close()
                raise
        except BaseException:
            cluster.shutdown()
            raise
        return cluster, ioctx

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

    def _io(self) -> Any:
        if self.ioctx is None:
            raise OSError(errno.ENOTCONN, f"rbd driver: not connected to pool {self.pool!r}")
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
            raise os_error(e, f"pool {self.pool} does not answer") from None
        cmd = json.dumps({"prefix": "df", "detail": "detail", "format": "json"})
        ret, out, message = call("ceph df", self.cluster.mon_command, cmd, b"")
        if ret < 0:
            raise OSError(-ret, f"ceph df: {message or os.strerror(-ret)}")
        for pool in json.loads(out).get("pools", []):
            if pool.get("name") == self.pool:
                stats = pool["stats"]
                break
        else:
            raise OSError(errno.ENOENT, f"pool {self.pool!r} is gone")
        used = int(stats.get("stored", stats.get("bytes_used", 0)))
        avail = int(stats["max_avail"])
        quota = int(stats.get("quota_bytes") or 0)
        if quota:
            return Capacity(total=quota, free=max(0, min(quota - used, avail)), used=used)
        return Capacity(total=used + avail, free=avail, used=used)

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
        lock = threading.Lock()
        state: dict[str, Any] = {"abandoned": False, "image": None}

        def _open() -> tuple[Any, int]:
            image = call(f"open {key}", rbd.Image, self._io(), key, read_only=not writable)
            try:
                size = call(f"size of {key}", image.size)
            except BaseException:
                image.close()
                raise
            with lock:
                if state["abandoned"]:
                    image.close()
                else:
                    state["image"] = image
            return image, size

        try:
            image, size = await self._run(_open)
        except trio.Cancelled:
            with lock:
                state["abandoned"] = True
                late = state["image"]
            if late is not None:
                threading.Thread(target=late.close, daemon=True).start()
            raise
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
        if depth <= self.max_depth:
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
                if (pool, namespace) != (self.pool, self.namespace):  # a parent in another pool
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
            if (pool, namespace) != (self.pool, self.namespace):
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
