"""The service layer: the only place with rules (permissions, state, capacity, naming).

The FUSE filesystem, the control API and through it the CLIs all call this module and nothing
below it. Every driver call runs under the backend's timeout; a timeout or an I/O failure turns the
backend to ERROR, after which its files answer EIO while the rest of the tree keeps working.

Ordering rules that keep the pool store consistent after a crash (no await inside a transaction):
- create: the driver allocates under a fresh key first, then one transaction adds the rows; a crash
  in between leaves an unnamed key that `reconcile()` sweeps.
- delete: one transaction removes the rows, then the driver deletes the key (same sweep).
- data: fsync makes the bytes durable on the backend first, then commits the size.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import json
import logging
import os
import posixpath
import pwd
import socket
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import __version__, placement
from . import errors as err
from .drivers import driver_class
from .drivers.base import Capacity, Driver, Handle, Progress
from .names import AUTO, check_backend_name, check_name, parse_address
from .sizes import format_size, parse_size
from .store import ROOT_INO, Attachment, Backend, Image, Node, PoolStore, Tx, now_ns

log = logging.getLogger(__name__)

STATES = ("INIT", "READY", "DISABLED", "ERROR")
ROLES = ("SAN", "REPOSITORY")
COPY_CHUNK = 4 * 2**20
STREAM_DEPTH = 4  # chunks in flight when a whole image streams (get, read, push, copies)
SNAPSHOT_TTL = 1.0  # seconds: how stale placement's view of other hosts' changes may be
HEARTBEAT = 2.0  # seconds between a daemon's signs of life in the pool store
HOST_TIMEOUT = 10.0  # a host silent this long is presumed dead: its write leases may be broken
VIEW_FRESH = 90.0  # seconds a host's monitor view of a backend counts (3 default monitor passes)
# errnos that mean the backend itself is in trouble (not the request)
BACKEND_FAULTS = {errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                  errno.ECONNREFUSED, errno.ECONNRESET, errno.ENETUNREACH, errno.ENODEV}
BACKEND_KEYS = {"NAME", "TM", "TM_RAW", "CAPACITY", "COST", "ROLE", "TAGS", "CLUSTER", "TIMEOUT",
                "USER", "GROUP", "PERMISSIONS", "OVERCOMMIT", "RESERVED", "PRIORITY"}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks. `origin` is 'fs' when the kernel already checked permissions (default_permissions)."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    origin: str = "api"

    @property
    def is_root(self) -> bool:
        return self.uid == 0


ROOT = Caller(0, 0, origin="internal")


@dataclass(slots=True)
class Attr:
    """What stat shows for a namespace entry."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    backend_id: int | None


@dataclass(eq=False, slots=True)
class OpenImage:
    """One image's open state, shared by every open file on it; size is live while open."""

    image_id: int
    backend_id: int
    key: str
    handle: Handle
    size: int
    node: Node  # kept current by setattr: getattr of an open image needs no query
    mtime_ns: int
    refs: int = 0
    dirty: bool = False  # size or mtime not yet in the pool store
    unlinked: bool = False  # removed from the namespace while open: data goes at last close

    @property
    def ino(self) -> int:
        return self.node.ino


@dataclass(eq=False, slots=True)
class OpenFile:
    image: OpenImage
    writable: bool
    append: bool = False
    origin: str = "fs"  # who opened it: writes from elsewhere must reach the kernel's caches


@dataclass
class BackendRuntime:
    driver: Driver
    started: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)


class Service:
    """The pool, its images and their namespace, as the rules allow them to change."""

    def __init__(self, store: PoolStore, state_dir: Path, host: str | None = None,
                 mountpoint: str | None = None) -> None:
        self.store = store
        self.state_dir = Path(state_dir)
        self.host = host or socket.gethostname()
        self.mountpoint = os.path.abspath(mountpoint) if mountpoint else None
        self._runtime: dict[int, BackendRuntime] = {}
        self._backends: dict[int, Backend] = {}
        #: placement's snapshot: (taken at, pool, attribute names); see _placement_pool
        self._pool_cache: tuple[float, placement.Pool, set[str]] | None = None
        self._open: dict[int, OpenImage] = {}  # by image id
        self._open_ino: dict[int, OpenImage] = {}  # the same, by inode (the kernel's getattr)
        #: images whose last close is still running: an open waits, or it could read the backend
        #: before a staging driver (legacy) has pushed the changes back
        self._closing: dict[int, trio.Event] = {}
        #: backends whose FREE/USED changed since their last monitor (the monitor loop re-reads them)
        self.stale: set[int] = set()
        #: called with (ino, parent_ino, name) after a change not made through the mount
        self.listeners: list[Callable[[int | None, int | None, str | None], None]] = []
        #: write leases (one writing host per image) matter only where hosts share the store
        self.leases = store.shared
        self.host_timeout = HOST_TIMEOUT
        self._writers: dict[int, int] = {}  # image id -> files open for writing on this host
        #: this host's own view: backends it cannot reach (by id, why), and their overlays
        self._local_error: dict[int, str] = {}
        self._seen: dict[int, tuple[Backend, Backend]] = {}
        self._reload()

    # ------------------------------------------------------------------ backends: runtime

    def _reload(self) -> None:
        with self.store.read() as tx:
            backends = {b.id: self._as_seen_here(b) for b in tx.backends()}
        if backends.keys() != self._backends.keys() or any(
                b is not self._backends[i] for i, b in backends.items()):
            self._pool_cache = None  # a backend changed (state, capacity, attributes...)
        self._backends = backends
        for bid in list(self._runtime):
            if bid not in self._backends:
                del self._runtime[bid]

    def _as_seen_here(self, b: Backend) -> Backend:
        """The backend as this host sees it: a host-local backend of another host is REMOTE
        here, and one this host cannot reach is ERROR here, whatever other hosts see."""
        owner = b.tm_raw.get("HOST") if b.tm == "dir" else None
        if owner and owner != self.host:
            state, error = "REMOTE", f"local to host {owner}"
        elif b.id in self._local_error and b.state != "DISABLED":
            state, error = "ERROR", self._local_error[b.id]
        else:
            return b
        seen = self._seen.get(b.id)
        if seen is None or seen[0] is not b or seen[1].error != error:
            seen = (b, dataclasses.replace(b, state=state, error=error))
            self._seen[b.id] = seen
        return seen[1]

    def _runtime_for(self, b: Backend) -> BackendRuntime:
        rt = self._runtime.get(b.id)
        if rt is None or rt.driver.tm_raw != b.tm_raw:
            rt = BackendRuntime(driver_class(b.tm)(b.tm_raw, self.state_dir))
            self._runtime[b.id] = rt
        return rt

    def _backend(self, backend_id: int) -> Backend:
        b = self._backends.get(backend_id)
        if b is None:
            self._reload()
            b = self._backends.get(backend_id)
            if b is None:
                raise err.NotFound(f"backend {backend_id} does not exist")
        return b

    def find_backend(self, ref: str | int) -> Backend:
        """A backend by name or ID, as every command accepts them alike."""
        self._reload()
        text = str(ref)
        if text.isdigit():
            b = self._backends.get(int(text))
        else:
            b = next((b for b in self._backends.values() if b.name == text), None)
        if b is None:
            raise err.NotFound(f"no backend {text!r}",
                               "`onestoragebackend list` shows the backends")
        return b

    def _usable(self, b: Backend, write: bool) -> None:
        """State rules: ERROR answers EIO, DISABLED is read-only, INIT is not yet checked."""
        if b.state == "READY":
            return
        if b.state == "DISABLED":
            if write:
                raise err.ReadOnly(f"backend {b.name} is DISABLED (read-only)",
                                   f"`onestoragebackend enable {b.name}` allows changes again")
            return
        if b.state == "ERROR":
            raise err.BackendUnavailable(f"backend {b.name} is in ERROR: {b.error}",
                                         "the monitor retries; `onestoragebackend show` has details")
        if b.state == "REMOTE":
            raise err.Remote(f"backend {b.name} is {b.error}", "use that host's mount or API")
        raise err.BackendUnavailable(f"backend {b.name} is {b.state}, not yet checked")

    @asynccontextmanager
    async def _call(self, b: Backend, what: str) -> AsyncIterator[Driver]:
        """Run a driver call under the backend's timeout; trouble turns the backend to ERROR."""
        rt = self._runtime_for(b)
        try:
            with trio.fail_after(b.timeout):
                if not rt.started:
                    await rt.driver.start()
                    rt.started = True
                yield rt.driver
        except trio.TooSlowError:
            self._set_error(b, f"{what} timed out after {b.timeout:g}s")
            raise err.BackendUnavailable(
                f"backend {b.name}: {what} timed out after {b.timeout:g}s") from None
        except OSError as e:
            raise self._os_error(b, what, e) from None

    @asynccontextmanager
    async def _data(self, backend_id: int, what: str) -> AsyncIterator[None]:
        """A data-path call: bounded by the backend's timeout (which only a driver whose calls
        can be abandoned, e.g. through a worker thread, needs), OSErrors mapped."""
        b = self._backends.get(backend_id) or self._backend(backend_id)
        try:
            with trio.fail_after(b.timeout):
                yield
        except trio.TooSlowError:
            self._set_error(b, f"{what} timed out after {b.timeout:g}s")
            raise err.BackendUnavailable(
                f"backend {b.name}: {what} timed out after {b.timeout:g}s") from None
        except OSError as e:
            raise self._os_error(b, what, e) from None

    def _os_error(self, b: Backend, what: str, e: OSError) -> err.Tm2Error:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return err.NoSpace(f"backend {b.name} is full", "free space or grow the backend")
        if e.errno == errno.EFBIG:
            return err.FileTooBig(f"backend {b.name}: {what}: file too large")
        if e.errno in BACKEND_FAULTS or e.errno is None:
            self._set_error(b, f"{what}: {e.strerror or e}")
            return err.BackendUnavailable(f"backend {b.name}: {what} failed: {e.strerror or e}")
        return err.Tm2Error(f"backend {b.name}: {what} failed: {e.strerror or e}")

    def _set_error(self, b: Backend, message: str) -> None:
        """This host cannot use the backend: ERROR here at once; ERROR for the pool too unless
        another live host still reaches it (its files keep working there)."""
        log.error("backend %s (%d) -> ERROR: %s", b.name, b.id, message)
        self._local_error[b.id] = message
        rt = self._runtime.get(b.id)
        if rt:
            rt.started = False
        with self.store.begin() as tx:
            tx.set_host_backend(self.host, b.id, "ERROR", message)
            current = tx.backend(b.id)
            if current and current.state != "DISABLED" and not self._reached_elsewhere(tx, b.id):
                tx.update_backend(b.id, state="ERROR", error=message)
            elif current:
                tx.update_backend(b.id, error=message)
        self._reload()
        self._changed(b.root_ino, None, None)

    def _reached_elsewhere(self, tx: Tx, backend_id: int) -> bool:
        """Whether another live host's monitor found the backend READY lately."""
        now = time.time()
        alive = {h["name"] for h in tx.hosts() if now - h["heartbeat"] < self.host_timeout}
        return any(v["backend_id"] == backend_id and v["host"] != self.host and v["host"] in alive
                   and v["state"] == "READY" and now - v["checked"] < VIEW_FRESH
                   for v in tx.host_backends())

    def _changed(self, ino: int | None, parent: int | None, name: str | None,
                 caller: Caller | None = None) -> None:
        """After a change: the other hosts hear of it; this host's kernel too, unless it made it."""
        if self.store.shared:
            self.store.notify(json.dumps({"h": self.host, "i": ino, "p": parent, "n": name}))
        if caller is not None and caller.origin == "fs":
            return  # the kernel made this change itself: its caches are right
        for listener in self.listeners:
            listener(ino, parent, name)

    def remote_change(self, payload: str) -> None:
        """Another host changed the pool: drop what this host caches of it (the kernel's entries
        and attributes, open images' sizes, the backends, placement's snapshot)."""
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if data.get("h") == self.host:
            return
        ino, parent, name = data.get("i"), data.get("p"), data.get("n")
        self._pool_cache = None
        roots = {b.root_ino for b in self._backends.values()}
        if parent == ROOT_INO or ino in roots or ino == ROOT_INO:
            self._reload()
        oi = self._open_ino.get(ino) if ino is not None else None
        if oi is not None and not oi.dirty:
            with self.store.read() as tx:
                im, n = tx.image(oi.image_id), tx.node(oi.ino)
            if im is not None and n is not None:
                oi.size, oi.node, oi.mtime_ns = im.size, n, n.mtime_ns
        for listener in self.listeners:
            listener(ino, parent, name)

    # ------------------------------------------------------------------ hosts and write leases

    def register_host(self) -> None:
        t = time.time()
        with self.store.begin() as tx:
            tx.upsert_host(self.host, state="ONLINE", heartbeat=t, started=t,
                           mountpoint=self.mountpoint, version=__version__)

    def heartbeat(self) -> None:
        with self.store.begin() as tx:
            tx.upsert_host(self.host, state="ONLINE", heartbeat=time.time())

    def unregister_host(self) -> None:
        """A clean stop: OFFLINE, and the leases of open files go (attachments keep theirs)."""
        with self.store.begin() as tx:
            tx.upsert_host(self.host, state="OFFLINE", heartbeat=time.time())
            attached = {a.image_id for a in tx.attachments(host=self.host)}
            for image_id, _, _ in tx.leases(holder=self.host):
                if image_id not in attached:
                    tx.delete_lease(image_id, self.host)

    def list_hosts(self) -> list[dict[str, Any]]:
        """Every host of the pool: alive or not, what it sees of each backend, leases held."""
        now = time.time()
        with self.store.read() as tx:
            hosts = tx.hosts()
            views = tx.host_backends()
            leases = tx.leases()
        names = {b.id: b.name for b in self._backends.values()}
        out = []
        for h in hosts:
            age = now - h["heartbeat"]
            out.append({
                "NAME": h["name"], "STATE": h["state"] if h["state"] != "ONLINE" or
                age < self.host_timeout else "UNREACHABLE", "HEARTBEAT_AGE": round(age, 1),
                "MOUNTPOINT": h["mountpoint"], "VERSION": h["version"], "STARTED": h["started"],
                "BACKENDS": {names.get(v["backend_id"], v["backend_id"]): v["state"]
                             for v in views if v["host"] == h["name"]},
                "LEASES": sum(1 for _, holder, _ in leases if holder == h["name"]),
            })
        return out

    def _holder_alive(self, tx: Tx, holder: str) -> tuple[bool, str]:
        beat = tx.host_heartbeat(holder)
        if beat is None:
            return False, "an unknown host"
        age = time.time() - beat
        return age < self.host_timeout, f"last heartbeat {age:.0f} s ago"

    def _lease(self, tx: Tx, image_id: int, holder: str, name: str) -> None:
        """Take (or keep) an image's write lease for `holder`, inside the caller's transaction."""
        if not self.leases:
            return
        current = tx.lease(image_id)
        if current is None:
            tx.insert_lease(image_id, holder)
            return
        if current[0] == holder:
            return
        alive, beat = self._holder_alive(tx, current[0])
        raise err.Busy(f"{name} is being written on host {current[0]} ({beat})",
                       "open it read-only, or wait" if alive else
                       f"if {current[0]} is dead: `tm2 break-lease` (logged), then retry")

    def _acquire(self, image_id: int, name: str) -> None:
        """The write lease for this host; two hosts racing for it: one gets Busy."""
        try:
            with self.store.begin() as tx:
                self._lease(tx, image_id, self.host, name)
        except err.Exists:
            raise err.Busy(f"{name} is being opened for writing on another host") from None

    def _release_writer(self, image_id: int) -> None:
        left = self._writers.get(image_id, 0) - 1
        if left > 0:
            self._writers[image_id] = left
            return
        self._writers.pop(image_id, None)
        with self.store.begin() as tx:
            if not tx.attachments(image_id=image_id, host=self.host):
                tx.delete_lease(image_id, self.host)

    def _not_leased_elsewhere(self, tx: Tx, image_id: int, name: str) -> None:
        """Resizing or deleting an image another host writes would pull it from under it."""
        if self.leases:
            current = tx.lease(image_id)
            if current is not None and current[0] != self.host:
                alive, beat = self._holder_alive(tx, current[0])
                raise err.Busy(f"{name} is being written on host {current[0]} ({beat})",
                               None if alive else "`tm2 break-lease` if that host is dead")

    def break_lease(self, address: str, caller: Caller, force: bool = False) -> dict[str, Any]:
        """Take the write lease from a host that died holding it (or, with force, from any)."""
        self._require_root(caller, "break write leases")
        _, n = self._image_node(address, caller)
        with self.store.begin() as tx:
            current = tx.lease(n.image_id)  # type: ignore[arg-type]
            if current is None:
                raise err.NotFound(f"{address} has no write lease")
            holder, since = current
            alive, beat = self._holder_alive(tx, holder)
            if holder == self.host and self._writers.get(n.image_id):  # type: ignore[arg-type]
                raise err.Busy(f"{address} is open for writing on this host")
            if alive and not force:
                raise err.Busy(f"host {holder} holding {address} is alive ({beat})",
                               "stop the writer there; --force breaks it anyway")
            tx.delete_lease(n.image_id)  # type: ignore[arg-type]
        log.warning("broke the write lease of %s held by host %s since %s (%s)", address, holder,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)), beat)
        return {"IMAGE": address, "HOLDER": holder, "SINCE": since}

    # ------------------------------------------------------------------ backends: admin

    def _require_root(self, caller: Caller, what: str) -> None:
        if not caller.is_root:
            raise err.PermissionDenied(f"only root may {what}", "run the command as root")

    def _backend_values(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Template attributes -> column values, each checked; unknown keys are custom attributes."""
        spec = {str(k).upper(): v for k, v in spec.items()}
        values: dict[str, Any] = {}
        if "NAME" in spec:
            values["name"] = check_backend_name(str(spec["NAME"]))
        if "CAPACITY" in spec:
            cap = spec["CAPACITY"]
            values["capacity"] = None if cap in (None, "", "unlimited") else parse_size(cap)
        if "COST" in spec:
            try:
                values["cost"] = int(spec["COST"])
            except (TypeError, ValueError):
                raise err.InvalidArgument(f"COST {spec['COST']!r} is not a whole number") from None
            if values["cost"] < 0:
                raise err.InvalidArgument("COST must be 0 or more")
        if "ROLE" in spec:
            role = str(spec["ROLE"]).upper()
            if role not in ROLES:
                raise err.InvalidArgument(f"ROLE {spec['ROLE']!r} is not one of {', '.join(ROLES)}")
            values["role"] = role
        if "TAGS" in spec:
            tags = spec["TAGS"]
            if isinstance(tags, str):
                tags = [t.strip() for t in tags.split(",") if t.strip()]
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise err.InvalidArgument("TAGS must be a comma-separated list of words")
            for t in tags:
                if not t.replace("-", "").replace("_", "").replace(".", "").isalnum():
                    raise err.InvalidArgument(f"tag {t!r} may use letters, digits, '-', '_', '.'")
            values["tags"] = sorted(set(tags), key=tags.index)
        if "CLUSTER" in spec:
            values["cluster"] = check_name(str(spec["CLUSTER"]), "cluster")
        if "OVERCOMMIT" in spec:
            values["overcommit"] = _number(spec["OVERCOMMIT"], "OVERCOMMIT", 1, 100)
        if "RESERVED" in spec:
            text = str(spec["RESERVED"]).strip()
            share = _number(text.rstrip("%"), "RESERVED", 0, 90)
            values["reserved"] = share / 100 if text.endswith("%") or share >= 1 else share
            if values["reserved"] > 0.9:
                raise err.InvalidArgument("RESERVED must be at most 90%")
        if "PRIORITY" in spec:
            values["priority"] = int(_number(spec["PRIORITY"], "PRIORITY", -10**6, 10**6))
        if "TIMEOUT" in spec:
            try:
                timeout = float(spec["TIMEOUT"])
            except (TypeError, ValueError):
                raise err.InvalidArgument(f"TIMEOUT {spec['TIMEOUT']!r} is not a number") from None
            if not 0 < timeout <= 3600:
                raise err.InvalidArgument("TIMEOUT must be between 0 and 3600 seconds")
            values["timeout"] = timeout
        attrs = {k: v for k, v in spec.items() if k not in BACKEND_KEYS}
        for k, v in attrs.items():
            if not k.replace("_", "").isalnum():
                raise err.InvalidArgument(f"attribute name {k!r} may use letters, digits and '_'")
            if not isinstance(v, str | int | float | None):
                raise err.InvalidArgument(f"attribute {k} must be a single value")
        if attrs:
            values["attrs"] = attrs
        return values

    def _owner(self, spec: dict[str, Any], caller: Caller) -> tuple[int | None, int | None, int | None]:
        spec = {str(k).upper(): v for k, v in spec.items()}
        uid = gid = mode = None
        if "USER" in spec:
            uid = _uid(spec["USER"])
        if "GROUP" in spec:
            gid = _gid(spec["GROUP"])
        if "PERMISSIONS" in spec:
            mode = _permissions(spec["PERMISSIONS"])
        return uid, gid, mode

    def _tm_raw(self, value: Any) -> dict[str, Any]:
        if value in (None, ""):
            return {}
        if isinstance(value, dict):
            return {str(k).upper(): v for k, v in value.items()}
        if isinstance(value, str):
            from .template import parse_template

            return parse_template(value)
        raise err.InvalidArgument("TM_RAW must be KEY=VALUE pairs")

    async def create_backend(self, caller: Caller, spec: dict[str, Any]) -> dict[str, Any]:
        """Validate everything, reach the storage once, then add the row: a bad spec adds nothing."""
        self._require_root(caller, "create backends")
        upper = {str(k).upper(): v for k, v in spec.items()}
        for required in ("NAME", "TM"):
            if not upper.get(required):
                raise err.InvalidArgument(f"{required} is missing from the backend template",
                                          "e.g. NAME=ssd1 TM=dir")
        values = self._backend_values(upper)
        tm = str(upper["TM"])
        cls = driver_class(tm)
        with self.store.read() as tx:
            if tx.backend_by_name(values["name"]):
                raise err.Exists(f"a backend named {values['name']!r} exists",
                                 "choose another NAME or `onestoragebackend update` that one")
        raw = self._tm_raw(upper.get("TM_RAW"))
        owner = raw.get("HOST") if tm == "dir" else None
        if owner and owner != self.host:
            raise err.InvalidArgument(f"a backend local to host {owner} is created on that host",
                                      f"run the command on {owner} (its daemon checks the PATH)")
        tm_raw = cls.validate(raw, self.state_dir, values["name"])
        uid, gid, mode = self._owner(upper, caller)
        driver = cls(tm_raw, self.state_dir)
        try:
            with trio.fail_after(values.get("timeout", 30.0)):
                await driver.start()
                cap = await driver.monitor()
        except (OSError, trio.TooSlowError) as e:
            await _quietly(driver.stop())
            reason = "timed out" if isinstance(e, trio.TooSlowError) else (e.strerror or str(e))
            raise err.InvalidArgument(f"backend {values['name']} is not reachable: {reason}",
                                      "check TM_RAW; nothing was created") from None
        total, free, used = _capped(cap, values.get("capacity"))
        t = now_ns()
        with self.store.begin() as tx:
            if tx.backend_by_name(values["name"]):
                raise err.Exists(f"a backend named {values['name']!r} exists")
            bid = tx.insert_backend(
                tm=tm, tm_raw=tm_raw, state="READY", total=total, free=free, used=used,
                monitored=time.time(), root_ino=0, **values)
            root = tx.insert_node(
                parent=ROOT_INO, name=values["name"], backend_id=bid,
                mode=stat.S_IFDIR | (0o755 if mode is None else mode),
                uid=caller.uid if uid is None else uid, gid=caller.gid if gid is None else gid,
                atime_ns=t, mtime_ns=t, ctime_ns=t)
            tx.update_backend(bid, root_ino=root)
            tx.update_node(ROOT_INO, mtime_ns=t, ctime_ns=t)
        self._reload()
        self._runtime[bid] = BackendRuntime(driver, started=True)
        log.info("backend %s (%d) created, TM=%s", values["name"], bid, tm)
        self._changed(ROOT_INO, ROOT_INO, values["name"])
        return self.backend_info(bid)

    async def update_backend(self, caller: Caller, ref: str | int,
                             spec: dict[str, Any]) -> dict[str, Any]:
        """Merge attributes into a backend; an empty value removes a custom attribute."""
        self._require_root(caller, "update backends")
        b = self.find_backend(ref)
        upper = {str(k).upper(): v for k, v in spec.items()}
        if "TM" in upper and upper["TM"] != b.tm:
            raise err.InvalidArgument("TM cannot change", "create a new backend and move images")
        values = self._backend_values(upper)
        if "attrs" in values:
            attrs = dict(b.attrs)
            for k, v in values["attrs"].items():
                if v in (None, ""):
                    attrs.pop(k, None)
                else:
                    attrs[k] = v
            values["attrs"] = attrs
        if "TM_RAW" in upper:
            raw = dict(b.tm_raw)
            raw.update(self._tm_raw(upper["TM_RAW"]))
            values["tm_raw"] = driver_class(b.tm).validate(raw, self.state_dir, b.name)
        uid, gid, mode = self._owner(upper, caller)
        with self.store.begin() as tx:
            if "name" in values and values["name"] != b.name:
                if tx.backend_by_name(values["name"]):
                    raise err.Exists(f"a backend named {values['name']!r} exists")
                tx.update_node(b.root_ino, name=values["name"])
            root = tx.node(b.root_ino)
            assert root is not None
            node_values: dict[str, Any] = {}
            if uid is not None:
                node_values["uid"] = uid
            if gid is not None:
                node_values["gid"] = gid
            if mode is not None:
                node_values["mode"] = stat.S_IFDIR | mode
            if node_values:
                tx.update_node(b.root_ino, ctime_ns=now_ns(), **node_values)
            if values:
                tx.update_backend(b.id, **values)
        self._reload()
        if "tm_raw" in values or "capacity" in values:
            await self.monitor_backend(b.id)
        self._changed(b.root_ino, ROOT_INO, b.name)
        if values.get("name", b.name) != b.name:
            self._changed(None, ROOT_INO, values["name"])
        return self.backend_info(b.id)

    async def set_enabled(self, caller: Caller, ref: str | int, enabled: bool) -> dict[str, Any]:
        """DISABLED backends keep serving reads; enabling re-checks the backend at once."""
        self._require_root(caller, "enable or disable backends")
        b = self.find_backend(ref)
        with self.store.begin() as tx:
            tx.update_backend(b.id, state="INIT" if enabled else "DISABLED")
        self._reload()
        if enabled:
            await self.monitor_backend(b.id)
        log.info("backend %s %s", b.name, "enabled" if enabled else "disabled")
        self._changed(b.root_ino, ROOT_INO, b.name)
        return self.backend_info(b.id)

    async def delete_backend(self, caller: Caller, ref: str | int, force: bool = False) -> None:
        """Refused while the backend holds images, unless forced (then their data goes too)."""
        self._require_root(caller, "delete backends")
        b = self.find_backend(ref)
        with self.store.read() as tx:
            images = tx.images(b.id)
            attached = tx.attachments(backend_id=b.id)
        if images and not force:
            raise err.Busy(f"backend {b.name} holds {len(images)} image(s)",
                           "delete them first, or `onestoragebackend delete --force` removes them")
        if attached and not force:
            raise err.Busy(f"backend {b.name} has {len(attached)} attachment(s)")
        if any(oi.backend_id == b.id for oi in self._open.values()):
            raise err.Busy(f"backend {b.name} has open files", "close them first")
        with self.store.begin() as tx:
            tx.delete_backend(b.id)
            tx.update_node(ROOT_INO, mtime_ns=now_ns(), ctime_ns=now_ns())
        rt = self._runtime.pop(b.id, None)
        if rt and images:
            for im in images:
                try:
                    with trio.fail_after(b.timeout):
                        await rt.driver.delete(im.key)
                except (OSError, trio.TooSlowError) as e:
                    log.error("backend %s: could not delete image data %s: %s", b.name, im.key, e)
        if rt:
            await _quietly(rt.driver.stop())
        self._reload()
        log.info("backend %s (%d) deleted", b.name, b.id)
        self._changed(None, ROOT_INO, b.name)

    async def monitor_backend(self, backend_id: int) -> None:
        """Refresh capacity and state; the only way out of ERROR is a monitor that succeeds."""
        b = self._backend(backend_id)
        if b.state == "REMOTE":
            with self.store.begin() as tx:
                tx.set_host_backend(self.host, b.id, "REMOTE", b.error)
            return
        rt = self._runtime_for(b)
        async with rt.lock:
            try:
                with trio.fail_after(b.timeout):
                    if not rt.started:
                        await rt.driver.start()
                        rt.started = True
                    cap = await rt.driver.monitor()
            except (OSError, trio.TooSlowError, err.Tm2Error) as e:
                reason = (f"monitor timed out after {b.timeout:g}s"
                          if isinstance(e, trio.TooSlowError) else f"monitor: {e}")
                if b.state != "ERROR" or b.error != reason:
                    self._set_error(b, reason)
                else:
                    with self.store.begin() as tx:
                        tx.set_host_backend(self.host, b.id, "ERROR", reason)
                return
        total, free, used = _capped(cap, b.capacity)
        with self.store.begin() as tx:
            current = tx.backend(b.id)
            if current is None:
                return
            state = "DISABLED" if current.state == "DISABLED" else "READY"
            tx.update_backend(b.id, state=state, error=None, total=total, free=free, used=used,
                              monitored=time.time(), updated=current.updated)
            tx.set_host_backend(self.host, b.id, "READY", None)
        if b.state == "ERROR":
            log.info("backend %s (%d) is READY again", b.name, b.id)
        self._local_error.pop(b.id, None)
        self._reload()

    async def monitor_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for bid in list(self._backends):
                nursery.start_soon(self.monitor_backend, bid)

    async def stop(self) -> None:
        """Close every open image (making it durable) and stop the drivers."""
        for oi in list(self._open.values()):
            try:
                self._persist(oi)
                async with self._data(oi.backend_id, "close"):
                    await oi.handle.aclose()
            except (OSError, err.Tm2Error) as e:
                log.error("closing image %d: %s", oi.image_id, e)
        self._open.clear()
        self._open_ino.clear()
        for rt in self._runtime.values():
            await _quietly(rt.driver.stop())

    # ------------------------------------------------------------------ views

    def list_backends(self) -> list[dict[str, Any]]:
        self._reload()
        with self.store.read() as tx:
            counters = tx.counters()
            roots = tx.nodes([b.root_ino for b in self._backends.values()])
        return [_backend_view(b, roots.get(b.root_ino), counters.get(b.id, (0, 0, 0)))
                for b in self._backends.values()]

    def backend_info(self, ref: str | int, detail: bool = False) -> dict[str, Any]:
        b = self.find_backend(ref)
        with self.store.read() as tx:
            counters = tx.counters().get(b.id, (0, 0, 0))
            view = _backend_view(b, tx.node(b.root_ino), counters)
            if detail:
                view["HOSTS"] = {v["host"]: v["state"] for v in tx.host_backends()
                                 if v["backend_id"] == b.id}
                view["IMAGES"] = [self._image_view(tx, im) for im in tx.images(b.id)]
                view["ATTACHMENTS"] = [_attachment_view(a) for a in tx.attachments(backend_id=b.id)]
        return view

    def _image_view(self, tx: Tx, im: Image) -> dict[str, Any]:
        n = tx.node_by_image(im.id)
        oi = self._open.get(im.id)
        return {"ID": im.id, "PATH": self._node_path(tx, n.ino) if n else None,
                "SIZE": oi.size if oi else im.size, "KEY": im.key, "CREATED": im.created}

    def _node_path(self, tx: Tx, ino: int) -> str:
        parts: list[str] = []
        n = tx.node(ino)
        while n is not None and n.ino != ROOT_INO:
            parts.append(n.name)
            n = tx.node(n.parent) if n.parent is not None else None
        return "/".join(reversed(parts))

    # ------------------------------------------------------------------ namespace helpers

    def _attr(self, tx: Tx, n: Node) -> Attr:
        size = 0
        mtime = n.mtime_ns
        if n.image_id is not None:
            oi = self._open.get(n.image_id)
            if oi is not None:
                size, mtime = oi.size, oi.mtime_ns
            else:
                im = tx.image(n.image_id)
                size = im.size if im else 0
        elif n.target is not None:
            size = len(n.target.encode())
        return Attr(n.ino, n.mode, 1 if not n.is_dir else 2, n.uid, n.gid, size,
                    n.atime_ns, mtime, n.ctime_ns, n.backend_id)

    def _get(self, tx: Tx, ino: int) -> Node:
        n = tx.node(ino)
        if n is None:
            raise err.NotFound(f"inode {ino} does not exist")
        return n

    def _check(self, caller: Caller, n: Node, want: int) -> None:
        """POSIX permission check for callers the kernel did not check (the API's)."""
        if caller.origin in ("fs", "internal") or caller.is_root:
            return
        if caller.uid == n.uid:
            bits = (n.mode >> 6) & 7
        elif n.gid == caller.gid or n.gid in caller.groups:
            bits = (n.mode >> 3) & 7
        else:
            bits = n.mode & 7
        if want & ~bits:
            raise err.PermissionDenied(f"permission denied on {n.name or '/'}")

    def _dir_for_change(self, tx: Tx, parent: int, caller: Caller) -> tuple[Node, Backend]:
        """The directory an entry is added to or removed from, with its backend's write rules."""
        p = self._get(tx, parent)
        if not p.is_dir:
            raise err.NotADirectory(f"{p.name} is not a directory")
        if p.ino == ROOT_INO:
            raise err.NotPermitted(
                "the top level holds only backends",
                "add one with `onestoragebackend create`; put images inside a backend directory")
        b = self._backend(p.backend_id)  # type: ignore[arg-type]
        self._usable(b, write=True)
        self._check(caller, p, 3)
        return p, b

    def _lookup(self, tx: Tx, parent: int, name: str) -> Node:
        n = tx.child(parent, name)
        if n is None:
            raise err.NotFound(f"{name} does not exist")
        return n

    def _sticky(self, caller: Caller, parent: Node, n: Node) -> None:
        if (parent.mode & stat.S_ISVTX and caller.origin == "api" and not caller.is_root
                and caller.uid not in (n.uid, parent.uid)):
            raise err.NotPermitted(f"{n.name}: sticky directory")

    # ------------------------------------------------------------------ namespace (FUSE view)

    def getattr(self, ino: int) -> Attr:
        oi = self._open_ino.get(ino)
        if oi is not None:  # hot: the kernel asks during I/O; unlinked-but-open has nlink 0
            n = oi.node
            return Attr(n.ino, n.mode, 0 if oi.unlinked else 1, n.uid, n.gid, oi.size,
                        n.atime_ns, oi.mtime_ns, n.ctime_ns, n.backend_id)
        with self.store.read() as tx:
            return self._attr(tx, self._get(tx, ino))

    def parent_of(self, ino: int) -> int:
        with self.store.read() as tx:
            n = self._get(tx, ino)
        return n.parent if n.parent is not None else ROOT_INO

    def lookup(self, parent: int, name: str) -> Attr:
        with self.store.read() as tx:
            n = tx.child(parent, name)
            if n is None:
                raise err.NotFound(f"{name} does not exist")
            return self._attr(tx, n)

    def readdir(self, ino: int, after_ino: int = 0, limit: int = 1000) -> list[tuple[str, Attr]]:
        """Entries after the given inode, in inode order (a stable cookie for readdir)."""
        with self.store.read() as tx:
            d = self._get(tx, ino)
            if not d.is_dir:
                raise err.NotADirectory(f"{d.name} is not a directory")
            return [(c.name, self._attr(tx, c)) for c in tx.children(ino, after_ino, limit)]

    def readlink(self, ino: int) -> str:
        with self.store.read() as tx:
            n = self._get(tx, ino)
            if n.target is None:
                raise err.InvalidArgument(f"{n.name} is not a symlink")
            return n.target

    def mkdir(self, parent: int, name: str, mode: int, caller: Caller) -> Attr:
        check_name(name)
        t = now_ns()
        with self.store.begin() as tx:
            p, _ = self._dir_for_change(tx, parent, caller)
            if tx.child(parent, name):
                raise err.Exists(f"{name} exists")
            gid = p.gid if p.mode & stat.S_ISGID else caller.gid
            setgid = stat.S_ISGID if p.mode & stat.S_ISGID else 0
            ino = tx.insert_node(parent=parent, name=name, backend_id=p.backend_id,
                                 mode=stat.S_IFDIR | (mode & 0o7777) | setgid, uid=caller.uid,
                                 gid=gid, atime_ns=t, mtime_ns=t, ctime_ns=t)
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)
            attr = self._attr(tx, self._get(tx, ino))
        self._changed(parent, parent, name, caller)
        return attr

    async def create(self, parent: int, name: str, mode: int, caller: Caller,
                     size: int = 0, reservation: int | None = None) -> Attr:
        """A new image: space is reserved (or placement reserved it), the driver allocates under a
        fresh key, then one transaction adds the rows and drops the reservation."""
        try:
            check_name(name)
            with self.store.read() as tx:
                p, b = self._dir_for_change(tx, parent, caller)
                if tx.child(parent, name):
                    raise err.Exists(f"{name} exists")
            key = uuid.uuid4().hex
            reservation = self._reserve(b.id, size, key, reservation)
            async with self._call(b, "allocate") as driver:
                await driver.allocate(key, size)
        except BaseException:
            self._unreserve(reservation)
            raise
        t = now_ns()
        try:
            with self.store.begin() as tx:
                if tx.child(parent, name):
                    raise err.Exists(f"{name} exists")
                tx.delete_reservation(reservation)
                image_id = tx.insert_image(b.id, key, size)
                gid = p.gid if p.mode & stat.S_ISGID else caller.gid
                ino = tx.insert_node(parent=parent, name=name, backend_id=b.id,
                                     mode=stat.S_IFREG | (mode & 0o7777), uid=caller.uid, gid=gid,
                                     atime_ns=t, mtime_ns=t, ctime_ns=t, image_id=image_id)
                tx.update_node(parent, mtime_ns=t, ctime_ns=t)
                attr = self._attr(tx, self._get(tx, ino))
        except BaseException:
            self._unreserve(reservation)
            with trio.CancelScope(shield=True):
                await _quietly(self._runtime_for(b).driver.delete(key))
            raise
        self.stale.add(b.id)
        self._changed(parent, parent, name, caller)
        return attr

    def _reserve(self, backend_id: int, size: int, key: str | None = None,
                 placed: int | None = None) -> int:
        """Promise `size` bytes of a backend's virtual space, atomically: the check and the
        promise are one transaction holding the backend's row, so concurrent creates (other
        processes, other hosts) can never together pass its limits. `key` names the data being
        made (no host's sweep takes it for a leftover); `placed`: placement reserved already."""
        if placed is not None:
            if key is not None:
                with self.store.begin() as tx:
                    tx.set_reservation_key(placed, key)
            return placed
        with self.store.begin() as tx:
            b = tx.lock_backend(backend_id)
            if b is None:
                raise err.NotFound(f"backend {backend_id} does not exist")
            why = placement.room(b, tx.allocated(b.id)).refusal(size)
            if why:
                raise err.NoSpace(f"backend {b.name} cannot take {format_size(size)} more: {why}",
                                  "free space, raise OVERCOMMIT or CAPACITY, or use auto: placement")
            reservation = tx.insert_reservation(b.id, size, self.host, key)
        self._pool_changed(backend_id, size)
        return reservation

    def _unreserve(self, reservation: int | None) -> None:
        """Give a promise back (a failed create); gone already is fine."""
        if reservation is not None:
            with self.store.begin() as tx:
                tx.delete_reservation(reservation)
            self._pool_cache = None

    def _fits(self, b: Backend, size: int) -> None:
        limit = b.total if b.capacity is None else min(b.capacity, b.total or b.capacity)
        if limit is not None and size > limit:
            raise err.FileTooBig(f"{size} bytes do not fit backend {b.name} "
                                 f"(capacity {limit} bytes)", "choose a smaller size or backend")

    async def unlink(self, parent: int, name: str, caller: Caller) -> None:
        """Remove a file or symlink; an image's data goes now, or at last close if it is open."""
        with self.store.begin() as tx:
            p, b = self._dir_for_change(tx, parent, caller)
            n = self._lookup(tx, parent, name)
            if n.is_dir:
                raise err.IsADirectory(f"{name} is a directory", "use rmdir")
            self._sticky(caller, p, n)
            im = None
            if n.image_id is not None:
                self._check_detached(tx, n, name, caller)
                self._not_leased_elsewhere(tx, n.image_id, name)
                im = tx.image(n.image_id)
                oi = self._open.get(n.image_id)
                if oi is not None:
                    oi.unlinked = True
                    im = None  # data goes at last close
                else:
                    tx.delete_image(n.image_id)
            link = tx.attachment_by_link(n.ino)
            if link:
                tx.delete_attachment(link.id)
                self._drop_attachment_lease(tx, link.image_id, link.host)
            tx.delete_node(n.ino)
            t = now_ns()
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)
        if im is not None:
            await self._delete_data(b, im.key)
        self._changed(n.ino, parent, name, caller)

    def _check_detached(self, tx: Tx, n: Node, name: str, caller: Caller) -> None:
        """An attached image is not deleted. On the mount POSIX wins for links on the mount
        itself (`rm -rf` of a VM folder holding disk and link must work: the links dangle and
        their attachments end); an attachment recorded for a path elsewhere still refuses."""
        attached = tx.attachments(image_id=n.image_id)
        if caller.origin == "fs":
            attached = [a for a in attached if a.link_ino is None]
        if attached:
            raise err.Busy(f"{name} is attached at {attached[0].path} on {attached[0].host}",
                           "detach it first (`tm2 detach` or remove its link)")

    async def _delete_data(self, b: Backend, key: str) -> None:
        """After the rows are gone: a failure here leaves a key that reconcile() sweeps."""
        self.stale.add(b.id)
        self._pool_cache = None
        try:
            async with self._call(b, "delete") as driver:
                await driver.delete(key)
        except err.Tm2Error as e:
            log.error("backend %s: image data %s left behind (%s); reconcile removes it",
                      b.name, key, e.message)

    def rmdir(self, parent: int, name: str, caller: Caller) -> None:
        with self.store.begin() as tx:
            p, _ = self._dir_for_change(tx, parent, caller)
            n = self._lookup(tx, parent, name)
            if not n.is_dir:
                raise err.NotADirectory(f"{name} is not a directory")
            self._sticky(caller, p, n)
            if tx.has_children(n.ino):
                raise err.NotEmpty(f"{name} is not empty")
            tx.delete_node(n.ino)
            t = now_ns()
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)
        self._changed(n.ino, parent, name, caller)

    async def rename(self, parent: int, name: str, new_parent: int, new_name: str,
                     caller: Caller, noreplace: bool = False, exchange: bool = False) -> None:
        """A metadata update inside one backend; across backends EXDEV, so `mv` copies."""
        check_name(new_name)
        if exchange:
            raise err.Unsupported("RENAME_EXCHANGE is not supported")
        dropped: tuple[Backend, str] | None = None
        with self.store.begin() as tx:
            p, b = self._dir_for_change(tx, parent, caller)
            np, nb = self._dir_for_change(tx, new_parent, caller)
            n = self._lookup(tx, parent, name)
            if b.id != nb.id:
                raise err.CrossBackend(f"{name}: rename across backends",
                                       "copy then delete (mv does this by itself)")
            self._sticky(caller, p, n)
            if n.is_dir:  # not into itself
                a = np
                while a.parent is not None:
                    if a.ino == n.ino:
                        raise err.InvalidArgument(f"cannot move {name} into itself")
                    a = self._get(tx, a.parent)
            old = tx.child(new_parent, new_name)
            if old is not None and old.ino != n.ino:
                if noreplace:
                    raise err.Exists(f"{new_name} exists")
                self._sticky(caller, np, old)
                if old.is_dir != n.is_dir:
                    raise (err.IsADirectory if old.is_dir else err.NotADirectory)(
                        f"{new_name}: cannot replace a {'directory' if old.is_dir else 'file'}")
                if old.is_dir and tx.has_children(old.ino):
                    raise err.NotEmpty(f"{new_name} is not empty")
                if old.image_id is not None:
                    self._check_detached(tx, old, new_name, caller)
                    oi = self._open.get(old.image_id)
                    if oi is not None:
                        oi.unlinked = True
                    else:
                        im = tx.image(old.image_id)
                        tx.delete_image(old.image_id)
                        dropped = (nb, im.key) if im else None
                link = tx.attachment_by_link(old.ino)
                if link:
                    tx.delete_attachment(link.id)
                    self._drop_attachment_lease(tx, link.image_id, link.host)
                tx.delete_node(old.ino)
            elif old is not None:
                return  # rename onto itself
            t = now_ns()
            tx.update_node(n.ino, parent=new_parent, name=new_name, ctime_ns=t)
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)
            if new_parent != parent:
                tx.update_node(new_parent, mtime_ns=t, ctime_ns=t)
            link = tx.attachment_by_link(n.ino)
            if link:  # the attachment's recorded path follows its link
                tx.set_attachment_path(link.id, self._mount_path(tx, n.ino))
        if dropped:
            await self._delete_data(*dropped)
        self._changed(n.ino, parent, name, caller)
        self._changed(None, new_parent, new_name, caller)

    def _mount_path(self, tx: Tx, ino: int) -> str:
        rel = self._node_path(tx, ino)
        return f"{self.mountpoint}/{rel}" if self.mountpoint else rel

    def symlink(self, parent: int, name: str, target: str, caller: Caller) -> Attr:
        """A symlink to an image on the mount is an attachment: it counts in NBVM until removed."""
        check_name(name)
        if not target or "\0" in target or len(target.encode()) > 4095:
            raise err.InvalidArgument("symlink target is empty, too long or has a NUL byte")
        t = now_ns()
        with self.store.begin() as tx:
            p, _ = self._dir_for_change(tx, parent, caller)
            if tx.child(parent, name):
                raise err.Exists(f"{name} exists")
            ino = tx.insert_node(parent=parent, name=name, backend_id=p.backend_id,
                                 mode=stat.S_IFLNK | 0o777, uid=caller.uid, gid=caller.gid,
                                 atime_ns=t, mtime_ns=t, ctime_ns=t, target=target)
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)
            img = self._resolve_target(tx, parent, target)
            if img is not None:
                path = self._mount_path(tx, ino)
                stale = tx.attachment_at(self.host, path)
                if stale:
                    tx.delete_attachment(stale.id)
                self._lease(tx, img.image_id, self.host, img.name)  # type: ignore[arg-type]
                tx.insert_attachment(img.image_id, self.host, path, link_ino=ino)  # type: ignore[arg-type]
                log.info("attached image %d at %s", img.image_id, path)
            attr = self._attr(tx, self._get(tx, ino))
        self._changed(parent, parent, name, caller)
        return attr

    def _resolve_target(self, tx: Tx, parent: int, target: str) -> Node | None:
        """The image a symlink points at, if it points into this tree (no symlinks followed)."""
        if target.startswith("/"):
            if not self.mountpoint or not target.startswith(self.mountpoint + "/"):
                return None
            parts = posixpath.normpath(target[len(self.mountpoint) + 1:]).split("/")
            ino = ROOT_INO
        else:
            base = self._node_path(tx, parent)
            joined = posixpath.normpath(posixpath.join("/", base, target))
            parts = joined.strip("/").split("/")
            ino = ROOT_INO
        n: Node | None = None
        for part in parts:
            if part in ("", "."):
                continue
            n = tx.child(ino, part)
            if n is None:
                return None
            ino = n.ino
        return n if n is not None and n.image_id is not None else None

    async def setattr(self, ino: int, caller: Caller, *, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None) -> Attr:
        """chmod, chown, truncate and utimens, with POSIX's rules on who may do what."""
        with self.store.read() as tx:
            n = self._get(tx, ino)
        if n.ino == ROOT_INO:
            raise err.NotPermitted("the top level cannot be changed")
        b = self._backend(n.backend_id)  # type: ignore[arg-type]
        self._usable(b, write=True)
        owner = caller.is_root or caller.uid == n.uid or caller.origin == "internal"
        if (mode is not None or uid is not None) and not owner and caller.origin == "api":
            raise err.NotPermitted(f"{n.name}: only the owner or root may chmod or chown")
        if uid is not None and uid != n.uid and not caller.is_root and caller.origin == "api":
            raise err.NotPermitted(f"{n.name}: only root may change the owner")
        if size is not None:
            if not n.is_file:
                raise (err.IsADirectory if n.is_dir else err.InvalidArgument)(
                    f"{n.name} is not an image")
            if caller.origin == "api":
                self._check(caller, n, 2)
            await self._resize(b, n, size)
        values: dict[str, Any] = {}
        if mode is not None:
            values["mode"] = (n.mode & ~0o7777) | (mode & 0o7777)
        if uid is not None:
            values["uid"] = uid
        if gid is not None:
            values["gid"] = gid
        if atime_ns is not None:
            values["atime_ns"] = atime_ns
        if mtime_ns is not None:
            values["mtime_ns"] = mtime_ns
            oi = self._open.get(n.image_id) if n.image_id is not None else None
            if oi:
                oi.mtime_ns = mtime_ns
        values["ctime_ns"] = now_ns()
        with self.store.begin() as tx:
            tx.update_node(ino, **values)
            fresh = self._get(tx, ino)
            attr = self._attr(tx, fresh)
        oi = self._open_ino.get(ino)
        if oi is not None:
            oi.node = fresh
        self._changed(ino, None, None, caller)
        return attr

    async def _resize(self, b: Backend, n: Node, size: int) -> None:
        from .sizes import MAX_SIZE

        if size < 0 or size > MAX_SIZE:
            raise err.InvalidArgument(f"size {size} is out of range")
        with self.store.read() as tx:
            im = tx.image(n.image_id)  # type: ignore[arg-type]
            if im is not None and n.image_id not in self._writers:
                self._not_leased_elsewhere(tx, im.id, n.name)
        assert im is not None
        # growth is promised like a new image; the promise ends once the new size is committed
        reservation = self._reserve(b.id, size - im.size) if size > im.size else None
        try:
            oi = self._open.get(n.image_id)  # type: ignore[arg-type]
            t = now_ns()
            if oi is not None:
                async with self._data(b.id, "resize"):
                    await oi.handle.atruncate(size)
                oi.size, oi.mtime_ns, oi.dirty = size, t, True
                self._persist(oi)
                return
            async with self._call(b, "resize") as driver:
                await driver.resize(im.key, size)
            self.stale.add(b.id)
            with self.store.begin() as tx:
                tx.set_image_size(im.id, size)
                tx.update_node(n.ino, mtime_ns=t)
        finally:
            self._unreserve(reservation)

    def statfs(self, ino: int) -> Capacity:
        """A backend directory shows its backend's capacity; the top level the pool's sum."""
        with self.store.read() as tx:
            n = self._get(tx, ino)
        if n.backend_id is not None:
            b = self._backend(n.backend_id)
            return Capacity(b.total, b.free, b.used)
        bs = list(self._backends.values())
        known = [b for b in bs if b.total is not None]
        return Capacity(sum(b.total for b in known),  # type: ignore[misc]
                        sum(b.free or 0 for b in known), sum(b.used or 0 for b in known))

    # ------------------------------------------------------------------ data path

    async def open(self, ino: int, caller: Caller, writable: bool, truncate: bool = False,
                   append: bool = False) -> OpenFile:
        while (closing := self._closing.get(ino)) is not None:
            await closing.wait()  # a driver that stages copies is still pushing the last close
        with self.store.read() as tx:
            n = self._get(tx, ino)
            if n.is_dir:
                raise err.IsADirectory(f"{n.name} is a directory")
            if n.image_id is None:
                raise err.InvalidArgument(f"{n.name} is not an image")
            self._check(caller, n, 6 if writable else 4)
            im = tx.image(n.image_id)
        assert im is not None
        b = self._backend(im.backend_id)
        self._usable(b, write=writable or truncate)
        if writable and self.leases:
            if not self._writers.get(im.id):
                self._acquire(im.id, n.name)
            self._writers[im.id] = self._writers.get(im.id, 0) + 1
        try:
            return await self._open_image(b, im, n, caller, writable, truncate, append)
        except BaseException:
            if writable and self.leases:
                self._release_writer(im.id)
            raise

    async def _open_image(self, b: Backend, im: Image, n: Node, caller: Caller, writable: bool,
                          truncate: bool, append: bool) -> OpenFile:
        oi = self._open.get(im.id)
        if oi is None:
            async with self._call(b, "open") as driver:
                handle = await driver.open(im.key, writable=b.state == "READY")
            oi = self._open.get(im.id)  # another open may have raced us
            if oi is None:
                oi = OpenImage(im.id, b.id, im.key, handle, im.size, n, n.mtime_ns)
                self._open[im.id] = oi
                self._open_ino[n.ino] = oi
            else:
                handle.close()
        oi.refs += 1
        if truncate and oi.size:
            try:
                await self._resize(b, n, 0)
            except BaseException:
                await self.release(OpenFile(oi, writable))
                raise
        return OpenFile(oi, writable, append, caller.origin)

    async def read(self, of: OpenFile, offset: int, size: int) -> bytes:
        oi = of.image
        b = self._backends.get(oi.backend_id)
        if b is None or b.state not in ("READY", "DISABLED"):
            self._usable(self._backend(oi.backend_id), write=False)
        if offset >= oi.size:
            return b""
        async with self._data(oi.backend_id, "read"):
            return await oi.handle.apread(offset, min(size, oi.size - offset))

    async def write(self, of: OpenFile, offset: int, data: bytes) -> int:
        oi = of.image
        b = self._backends.get(oi.backend_id)
        if b is None or b.state != "READY":
            self._usable(self._backend(oi.backend_id), write=True)
        if not of.writable:
            raise err.PermissionDenied("file is not open for writing")
        if of.append:
            offset = oi.size
        end = offset + len(data)
        if end > oi.size and b is not None:
            self._fits(b, end)
        async with self._data(oi.backend_id, "write"):
            n = await oi.handle.apwrite(offset, data)
        if offset + n > oi.size:
            oi.size = offset + n
        oi.mtime_ns = now_ns()
        oi.dirty = True
        return n

    def _persist(self, oi: OpenImage) -> None:
        if not oi.dirty or oi.unlinked:
            return
        self.stale.add(oi.backend_id)
        with self.store.begin() as tx:
            tx.set_image_size(oi.image_id, oi.size)
            tx.update_node(oi.ino, mtime_ns=oi.mtime_ns, ctime_ns=oi.mtime_ns)
            tx.notify(json.dumps({"h": self.host, "i": oi.ino}))  # others cache the old size
        oi.dirty = False

    async def flush(self, of: OpenFile) -> None:
        """close(2): the size and times reach the pool store (the data's durability is fsync's)."""
        self._persist(of.image)

    async def fsync(self, of: OpenFile) -> None:
        """The data reaches the backend's durable state, then the size is committed."""
        oi = of.image
        async with self._data(oi.backend_id, "fsync"):
            await oi.handle.aflush()
        self._persist(oi)

    async def release(self, of: OpenFile) -> None:
        oi = of.image
        if of.writable and of.origin != "fs":
            self._changed(oi.ino, None, None)  # the mount's cached size and pages are stale
        if of.writable and self.leases:
            self._release_writer(oi.image_id)
        oi.refs -= 1
        if oi.refs > 0:
            return
        del self._open[oi.image_id]
        self._open_ino.pop(oi.ino, None)
        self._closing[oi.ino] = closed = trio.Event()
        try:
            self._persist(oi)
        finally:
            try:
                async with self._data(oi.backend_id, "close"):
                    await oi.handle.aclose()
            except err.Tm2Error as e:
                log.error("closing image %d: %s", oi.image_id, e.message)
            finally:
                del self._closing[oi.ino]
                closed.set()
        if oi.unlinked:
            with self.store.begin() as tx:
                im = tx.image(oi.image_id)
                tx.delete_image(oi.image_id)
            if im is not None:
                await self._delete_data(self._backend(oi.backend_id), im.key)

    # ------------------------------------------------------------------ TM2 actions (addresses)

    def _resolve(self, address: str, caller: Caller) -> tuple[Backend, list[str], Node | None]:
        """BACKEND:PATH -> backend, path components and the node if it exists."""
        ref, parts = parse_address(address)
        b = self.find_backend(ref)
        with self.store.read() as tx:
            n: Node | None = self._get(tx, b.root_ino)
            for i, part in enumerate(parts):
                assert n is not None
                if not n.is_dir:
                    raise err.NotADirectory(f"{'/'.join(parts[:i])} is not a directory")
                self._check(caller, n, 1)
                child = tx.child(n.ino, part)
                if child is None:
                    if i < len(parts) - 1:
                        raise err.NotFound(f"{b.name}:{'/'.join(parts[:i + 1])} does not exist",
                                           "create the directory first (mkdir on the mount)")
                    return b, parts, None
                n = child
        return b, parts, n

    def _image_node(self, address: str, caller: Caller) -> tuple[Backend, Node]:
        b, _, n = self._resolve(address, caller)
        if n is None:
            raise err.NotFound(f"{address} does not exist",
                               f"`ls` the backend directory or `onestoragebackend show {b.name}`")
        if n.is_dir:
            raise err.IsADirectory(f"{address} is a directory, not an image")
        if n.image_id is None:
            raise err.InvalidArgument(f"{address} is a symlink, not an image")
        return b, n

    def _parent_of(self, address: str, caller: Caller) -> tuple[Backend, int, str]:
        b, parts, n = self._resolve(address, caller)
        if n is not None:
            raise err.Exists(f"{address} exists", "delete it first or choose another name")
        parent = b.root_ino
        if len(parts) > 1:
            _, _, pn = self._resolve(f"{b.id}:{'/'.join(parts[:-1])}", caller)
            assert pn is not None
            if not pn.is_dir:
                raise err.NotADirectory(f"{'/'.join(parts[:-1])} is not a directory")
            parent = pn.ino
        return b, parent, parts[-1]

    def address_of(self, ino: int) -> str:
        """BACKEND:PATH of a namespace entry (e.g. where placement put it)."""
        with self.store.read() as tx:
            backend_name, _, path = self._node_path(tx, ino).partition("/")
        return f"{backend_name}:{path}"

    def image_info(self, address: str, caller: Caller) -> dict[str, Any]:
        b, n = self._image_node(address, caller)
        with self.store.read() as tx:
            im = tx.image(n.image_id)  # type: ignore[arg-type]
            attached = tx.attachments(image_id=n.image_id)
            view = self._image_view(tx, im)  # type: ignore[arg-type]
        view.update(BACKEND=b.name, BACKEND_ID=b.id, ADDRESS=f"{b.name}:{view['PATH'].partition('/')[2]}",
                    INO=n.ino,
                    ATTACHMENTS=[_attachment_view(a) for a in attached])
        return view

    async def allocate(self, address: str, size: int | str, caller: Caller, mode: int = 0o600,
                       place: dict[str, Any] | None = None) -> dict[str, Any]:
        size = parse_size(size)
        address, reservation = self._target(address, caller, size, place)
        try:
            _, parent, name = self._parent_of(address, caller)
        except BaseException:
            self._unreserve(reservation)
            raise
        await self.create(parent, name, mode, caller, size=size, reservation=reservation)
        log.info("allocated %s (%d bytes)", address, size)
        return self.image_info(address, caller)

    # ------------------------------------------------------------------ placement

    def place(self, caller: Caller, size: int | str, *, role: str | None = None,
              requirements: str | None = None, rank: str | None = None,
              policy: str | None = None, reserve: bool = False,
              ) -> tuple[list[placement.Verdict], Backend | None, int | None]:
        """Choose a backend for a new image of `size`. Without `reserve`: every backend's
        verdict (the explanation). With it: the chosen backend and the reservation holding its
        space. The decision is made on a snapshot of the pool (at most SNAPSHOT_TTL old, with
        this daemon's own reservations applied); the reservation re-checks under the backend's
        lock, and if another host got there first the next candidate is tried."""
        size = parse_size(size)
        pool, known = self._placement_pool()
        req = placement.request(size, role, requirements, rank, policy, known)
        may_use = None
        if not caller.is_root:
            with self.store.read() as tx:
                roots = tx.nodes([b.root_ino for b, _, _ in pool])
            may_use = lambda b: self._may(caller, roots.get(b.root_ino), 3)  # noqa: E731
        if not reserve:
            return placement.decide(req, pool, may_use), None, None
        for v in placement.ranked(req, pool, may_use):
            try:
                reservation = self._reserve(v.backend.id, size)
            except err.NoSpace:
                self._pool_cache = None  # the snapshot promised room another host took
                continue
            log.info("placed %s on backend %s (%s)", format_size(size), v.backend.name,
                     req.ranking)
            return [v], v.backend, reservation
        verdicts = placement.decide(req, self._placement_pool()[0], may_use)
        raise placement.no_room(req, [v for v in verdicts if v.reason is not None])

    def _placement_pool(self) -> tuple[placement.Pool, set[str]]:
        """Backends as placement sees them, and every attribute name expressions may use."""
        cached = self._pool_cache
        if cached is not None and time.monotonic() - cached[0] < SNAPSHOT_TTL:
            return cached[1], cached[2]
        self._reload()
        backends = list(self._backends.values())
        with self.store.read() as tx:
            counters = tx.counters()
        before = {entry[0].id: entry for entry in cached[1]} if cached else {}
        pool = []
        for b in backends:
            nbimage, nbvm, allocated = counters.get(b.id, (0, 0, 0))
            old = before.get(b.id)
            if (old is not None and old[0] is b and old[2].allocated == allocated
                    and old[1]["NBIMAGE"] == nbimage and old[1]["NBVM"] == nbvm):
                pool.append(old)  # nothing changed: no new dict for it
                continue
            r = placement.room(b, allocated)
            pool.append((b, placement.attributes(b, r, nbimage, nbvm), r))
        known = {*placement.ATTRIBUTES, *(str(k).upper() for b in backends for k in b.attrs)}
        self._pool_cache = (time.monotonic(), pool, known)
        return pool, known

    def _pool_changed(self, backend_id: int, reserved: int) -> None:
        """Keep the placement snapshot true to this daemon's own changes: a reservation is
        applied in place (bursts of placements need no re-read); anything else drops it."""
        cached = self._pool_cache
        if cached is None:
            return
        if reserved <= 0:
            self._pool_cache = None
            return
        pool = cached[1]
        for i, (b, attrs, r) in enumerate(pool):
            if b.id == backend_id:
                r = placement.room(b, r.allocated + reserved)
                pool[i] = (b, {**attrs, "ALLOCATED": r.allocated, "AVAILABLE": r.available}, r)
                return

    def explain(self, caller: Caller, size: int | str, **options: Any) -> list[dict[str, Any]]:
        """Every backend's verdict for a new image of `size`, in order: the dry run of placement."""
        verdicts, _, _ = self.place(caller, size, **options)
        return [v.view(i + 1 if v.reason is None else None) for i, v in enumerate(verdicts)]

    def _may(self, caller: Caller, n: Node | None, want: int) -> bool:
        if caller.is_root:
            return True
        try:
            self._check(caller, n, want)  # type: ignore[arg-type]
        except err.Tm2Error:
            return False
        return n is not None

    def _target(self, address: str, caller: Caller, size: int,
                place: dict[str, Any] | None, role: str = "SAN") -> tuple[str, int | None]:
        """`auto:PATH` -> the placed backend's `NAME:PATH` (its missing folders made, like
        `mkdir -p`) and the reservation; any other address as it is."""
        ref, parts = parse_address(address)
        if ref != AUTO:
            return address, None
        options = {k: v for k, v in (place or {}).items() if v not in (None, "")}
        options.setdefault("role", role)
        _, b, reservation = self.place(caller, size, reserve=True, **options)
        assert b is not None
        try:
            parent = b.root_ino
            for part in parts[:-1]:
                with self.store.read() as tx:
                    child = tx.child(parent, part)
                parent = child.ino if child else self.mkdir(parent, part, 0o755, caller).ino
        except BaseException:
            self._unreserve(reservation)
            raise
        return f"{b.name}:{'/'.join(parts)}", reservation

    def get_size(self, address: str, caller: Caller) -> int:
        _, n = self._image_node(address, caller)
        return self.getattr(n.ino).size

    async def resize(self, address: str, size: int | str, caller: Caller,
                     shrink: bool = False) -> dict[str, Any]:
        """Grow by default; shrinking loses data, so it must be asked for."""
        size = parse_size(size)
        _, n = self._image_node(address, caller)
        current = self.getattr(n.ino).size
        if size < current and not shrink:
            raise err.InvalidArgument(
                f"{address} is {current} bytes; {size} would shrink it and lose data",
                "pass --shrink if that is what you want")
        await self.setattr(n.ino, caller, size=size)
        return self.image_info(address, caller)

    async def delete(self, address: str, caller: Caller) -> None:
        _, _, n = self._resolve(address, caller)
        if n is None:
            raise err.NotFound(f"{address} does not exist")
        if n.is_dir:
            raise err.IsADirectory(f"{address} is a directory", "remove it with rm -r on the mount")
        await self.unlink(n.parent, n.name, caller)  # type: ignore[arg-type]
        log.info("deleted %s", address)

    async def clone(self, src: str, dst: str, caller: Caller, progress: Progress | None = None,
                    place: dict[str, Any] | None = None) -> dict[str, Any]:
        """Inside one backend the driver clones (reflink/COW where it can); across, a copy."""
        sb, sn = self._image_node(src, caller)
        self._usable(sb, write=False)
        self._check(caller, sn, 4)
        with self.store.read() as tx:
            im = tx.image(sn.image_id)  # type: ignore[arg-type]
        assert im is not None
        oi = self._open.get(im.id)
        if oi is not None:  # make what is written so far visible to the driver
            await self.fsync(OpenFile(oi, False))
        size = oi.size if oi else im.size
        dst, reservation = self._target(dst, caller, size, place)
        try:
            db, parent, name = self._parent_of(dst, caller)
            with self.store.read() as tx:
                self._dir_for_change(tx, parent, caller)
        except BaseException:
            self._unreserve(reservation)
            raise
        if sb.id != db.id:
            return await self._copy_across(src, sn, dst, parent, name, caller, progress,
                                           reservation)
        key = uuid.uuid4().hex
        reservation = self._reserve(db.id, size, key, reservation)
        try:
            async with self._call(sb, "clone") as driver:
                await driver.clone(im.key, key, progress)
        except BaseException:
            self._unreserve(reservation)
            raise
        t = now_ns()
        try:
            with self.store.begin() as tx:
                if tx.child(parent, name):
                    raise err.Exists(f"{dst} exists")
                tx.delete_reservation(reservation)
                image_id = tx.insert_image(db.id, key, size)
                tx.insert_node(parent=parent, name=name, backend_id=db.id,
                               mode=stat.S_IFREG | (sn.mode & 0o777), uid=caller.uid,
                               gid=caller.gid, atime_ns=t, mtime_ns=t, ctime_ns=t,
                               image_id=image_id)
                tx.update_node(parent, mtime_ns=t, ctime_ns=t)
        except BaseException:
            self._unreserve(reservation)
            with trio.CancelScope(shield=True):
                await _quietly(self._runtime_for(db).driver.delete(key))
            raise
        self.stale.add(db.id)
        self._changed(parent, parent, name, caller)
        log.info("cloned %s -> %s", src, dst)
        return self.image_info(dst, caller)

    async def _copy_across(self, src: str, sn: Node, dst: str, parent: int, name: str,
                           caller: Caller, progress: Progress | None,
                           reservation: int | None = None) -> dict[str, Any]:
        """Stream between two backends' handles; zero chunks are skipped so thin stays thin."""
        try:
            src_of = await self.open(sn.ino, caller, writable=False)
        except BaseException:
            self._unreserve(reservation)
            raise
        try:
            size = src_of.image.size
            attr = await self.create(parent, name, sn.mode & 0o777, caller, size=size,
                                     reservation=reservation)
            dst_of = await self.open(attr.ino, caller, writable=True)
            try:
                await copy_data(self, src_of, dst_of, size, progress)
                await self.fsync(dst_of)
            except BaseException:
                await self.release(dst_of)
                with trio.CancelScope(shield=True):
                    await _quietly(self.unlink(parent, name, ROOT))
                raise
            await self.release(dst_of)
        finally:
            await self.release(src_of)
        log.info("copied %s -> %s across backends", src, dst)
        return self.image_info(dst, caller)

    async def open_address(self, address: str, caller: Caller, writable: bool,
                           create: bool = False, exclusive: bool = False,
                           truncate: bool = False, size: int = 0,
                           place: dict[str, Any] | None = None) -> OpenFile:
        """For read/write/get/push through the API: open (creating if asked, `size` bytes, on a
        placed backend for `auto:` addresses, base images going to REPOSITORY ones) by address."""
        if create and parse_address(address)[0] == AUTO:
            address, reservation = self._target(address, caller, size, place, role="REPOSITORY")
        else:
            reservation = None
        try:
            _, _, n = self._resolve(address, caller)
            if n is None and create:
                _, parent, name = self._parent_of(address, caller)
        except BaseException:
            self._unreserve(reservation)
            raise
        if n is None:
            if not create:
                raise err.NotFound(f"{address} does not exist")
            attr = await self.create(parent, name, 0o600, caller, size=size,
                                     reservation=reservation)
            return await self.open(attr.ino, caller, writable=True)
        self._unreserve(reservation)
        if exclusive:
            raise err.Exists(f"{address} exists", "delete it first or choose another name")
        if n.image_id is None:
            raise (err.IsADirectory if n.is_dir else err.InvalidArgument)(
                f"{address} is not an image")
        return await self.open(n.ino, caller, writable=writable, truncate=truncate)

    def attach(self, address: str, path: str, caller: Caller,
               host: str | None = None) -> dict[str, Any]:
        """Record that an image is in use at a path on a host (the link itself is the caller's)."""
        if not path.startswith("/") or "\0" in path:
            raise err.InvalidArgument(f"attach path {path!r} must be absolute")
        b, n = self._image_node(address, caller)
        self._check(caller, n, 4)
        self._usable(b, write=False)
        host = host or self.host
        with self.store.begin() as tx:
            if tx.attachment_at(host, path):
                raise err.Exists(f"{path} on {host} is already an attachment",
                                 "detach it first")
            self._lease(tx, n.image_id, host, address)  # type: ignore[arg-type]
            aid = tx.insert_attachment(n.image_id, host, posixpath.normpath(path))  # type: ignore[arg-type]
        log.info("attached %s at %s:%s", address, host, path)
        return {"ID": aid, "IMAGE": address, "HOST": host, "PATH": path}

    def detach(self, address: str, path: str, caller: Caller, host: str | None = None) -> None:
        _, n = self._image_node(address, caller)
        self._check(caller, n, 4)
        host = host or self.host
        with self.store.begin() as tx:
            a = tx.attachment_at(host, posixpath.normpath(path))
            if a is None or a.image_id != n.image_id:
                raise err.NotFound(f"{address} is not attached at {path} on {host}")
            if a.link_ino is not None:
                raise err.Busy(f"{path} is a link on the mount", "remove the link: rm PATH")
            tx.delete_attachment(a.id)
            self._drop_attachment_lease(tx, a.image_id, host)
        log.info("detached %s from %s:%s", address, host, path)

    def _drop_attachment_lease(self, tx: Tx, image_id: int, host: str) -> None:
        """The lease goes with the host's last attachment, unless it still writes the image."""
        if (self.leases and not tx.attachments(image_id=image_id, host=host)
                and not (host == self.host and self._writers.get(image_id))):
            tx.delete_lease(image_id, host)

    def local_path(self, address: str, caller: Caller) -> str | None:
        """Where the image's bytes can be reached on this host without the mount, if anywhere."""
        b, n = self._image_node(address, caller)
        with self.store.read() as tx:
            im = tx.image(n.image_id)  # type: ignore[arg-type]
        return self._runtime_for(b).driver.local_path(im.key) if im else None

    # ------------------------------------------------------------------ recovery

    async def reconcile(self) -> dict[str, int]:
        """After a crash: drop unnamed images, sweep unknown keys, true sizes, stale links."""
        fixed = {"orphans": 0, "leftovers": 0, "sizes": 0, "links": 0, "reservations": 0,
                 "leases": 0}
        with self.store.begin() as tx:
            for rid, *_ in tx.reservations(host=self.host):  # creates cut short by the crash
                tx.delete_reservation(rid)
                fixed["reservations"] += 1
            orphans = tx.orphan_images()
            for im in orphans:
                tx.delete_image(im.id)
            for a in tx.attachments(host=self.host):
                if a.link_ino is not None and tx.node(a.link_ino) is None:
                    tx.delete_attachment(a.id)
                    fixed["links"] += 1
            # no file is open after a restart: the leases of this host's attachments remain
            attached = {a.image_id for a in tx.attachments(host=self.host)}
            for image_id, _, _ in tx.leases(holder=self.host):
                if image_id not in attached:
                    tx.delete_lease(image_id, self.host)
                    fixed["leases"] += 1
        for im in orphans:
            b = self._backends.get(im.backend_id)
            if b:
                await self._delete_data(b, im.key)
        fixed["orphans"] = len(orphans)
        for b in list(self._backends.values()):
            if b.state not in ("READY", "DISABLED"):
                continue
            try:
                async with self._call(b, "reconcile") as driver:
                    keys = await driver.keys()
                    with self.store.read() as tx:
                        # creates in progress on any host first: one that commits between the
                        # two reads is then seen in one or the other, never in neither
                        known = tx.reserved_keys(b.id)
                        images = tx.images(b.id)
                    known |= {im.key for im in images}
                    for key in keys or []:
                        if key not in known and _is_key(key):
                            await driver.delete(key)
                            fixed["leftovers"] += 1
                    for im in images:
                        if im.id in self._open:
                            continue
                        try:
                            real = await driver.size(im.key)
                        except err.Unsupported:
                            break  # e.g. a legacy script set on a remote host: sizes stay as kept
                        if real != im.size:
                            with self.store.begin() as tx:
                                tx.set_image_size(im.id, real)
                            fixed["sizes"] += 1
            except err.Tm2Error as e:
                log.error("reconcile of backend %s failed: %s", b.name, e.message)
        if any(fixed.values()):
            log.info("reconciled the pool store: %s", fixed)
        return fixed

    async def ensure_default_backend(self) -> None:
        """The embedded default: a `local` directory backend under the state directory."""
        self._reload()
        if not self._backends:
            await self.create_backend(ROOT, {"NAME": "local", "TM": "dir", "ROLE": "SAN",
                                             "PERMISSIONS": "0777"})


async def read_chunks(service: Service, of: OpenFile, offset: int, size: int) -> list[bytes]:
    """Up to STREAM_DEPTH chunks from `offset`, read at once: a driver with asynchronous I/O
    (rbd) overlaps them, so a whole-image stream is not one round trip per chunk. The batch is
    the bounded queue: at most STREAM_DEPTH x COPY_CHUNK bytes are held."""
    end = min(offset + size, of.image.size)
    starts = range(offset, end, COPY_CHUNK)[:STREAM_DEPTH]
    out = [b""] * len(starts)

    async def one(i: int, start: int) -> None:
        out[i] = await service.read(of, start, min(COPY_CHUNK, end - start))

    async with trio.open_nursery() as nursery:
        for i, start in enumerate(starts):
            nursery.start_soon(one, i, start)
    return out


async def write_chunks(service: Service, of: OpenFile, offset: int, chunks: list[bytes]) -> int:
    """Write consecutive chunks at once (as read_chunks reads them); all-zero chunks are skipped
    so thin images stay thin. Returns the offset after the last chunk."""
    async with trio.open_nursery() as nursery:
        for chunk in chunks:
            if chunk and chunk.count(0) != len(chunk):
                nursery.start_soon(service.write, of, offset, chunk)
            offset += len(chunk)
    return offset


async def copy_data(service: Service, src: OpenFile, dst: OpenFile, size: int,
                    progress: Progress | None = None) -> None:
    """Copy through the data path, STREAM_DEPTH chunks in flight, leaving holes for zeros."""
    done = 0
    while done < size:
        chunks = await read_chunks(service, src, done, size - done)
        if not chunks or not chunks[0]:
            break
        done = await write_chunks(service, dst, done, chunks)
        if progress:
            progress(done)


def _is_key(key: str) -> bool:
    return len(key) == 32 and all(c in "0123456789abcdef" for c in key)


def _capped(cap: Capacity, limit: int | None) -> tuple[int | None, int | None, int | None]:
    """The admin's CAPACITY caps what the driver reports."""
    total, free, used = cap.total, cap.free, cap.used
    if limit is not None:
        total = limit if total is None else min(total, limit)
        room = max(0, limit - (used or 0))
        free = room if free is None else min(free, room)
    return total, free, used


def _backend_view(b: Backend, root: Node | None, counters: tuple[int, int, int]) -> dict[str, Any]:
    uid = root.uid if root else 0
    gid = root.gid if root else 0
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return {
        "ID": b.id, "NAME": b.name, "STATE": b.state, "TM": b.tm, "TM_RAW": b.tm_raw,
        "CAPACITY": b.total, "FREE": b.free, "USED": b.used, "ALLOCATED": counters[2],
        "AVAILABLE": placement.room(b, counters[2]).available,
        "CAPACITY_LIMIT": b.capacity, "OVERCOMMIT": b.overcommit, "RESERVED": b.reserved,
        "PRIORITY": b.priority, "COST": b.cost, "ROLE": b.role, "TAGS": b.tags,
        "NBIMAGE": counters[0], "NBVM": counters[1], "USER": user, "GROUP": group,
        "UID": uid, "GID": gid, "PERMISSIONS": f"{(root.mode if root else 0) & 0o7777:04o}",
        "CLUSTER": b.cluster, "TIMEOUT": b.timeout, "ERROR": b.error, "ATTRS": b.attrs,
        "CREATED": b.created, "UPDATED": b.updated, "MONITORED": b.monitored,
    }


def _attachment_view(a: Attachment) -> dict[str, Any]:
    return {"ID": a.id, "IMAGE_ID": a.image_id, "HOST": a.host, "PATH": a.path,
            "ON_MOUNT": a.link_ino is not None, "CREATED": a.created}


def _number(value: Any, what: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise err.InvalidArgument(f"{what} {value!r} is not a number") from None
    if not low <= number <= high:
        raise err.InvalidArgument(f"{what} must be between {low:g} and {high:g}, not {number:g}")
    return number


def _uid(value: Any) -> int:
    return _account_id(value, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _gid(value: Any) -> int:
    return _account_id(value, lambda name: grp.getgrnam(name).gr_gid, "group")


def _account_id(value: Any, lookup: Callable[[str], int], what: str) -> int:
    """A user or group by number or by name on this host."""
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return lookup(text)
    except KeyError:
        raise err.InvalidArgument(f"no {what} {text!r} on this host") from None


def _permissions(value: Any) -> int:
    """Octal (`0755`, `755`) or OpenNebula's `um- u-- ---` form."""
    text = str(value).strip()
    if text and all(c in "01234567" for c in text) and len(text) <= 4:
        return int(text, 8)
    parts = text.split()
    if len(parts) == 3 and all(len(p) == 3 for p in parts):
        mode = 0
        for i, p in enumerate(parts):
            bits = (4 if p[0] == "u" else 0) | (2 if p[1] == "m" else 0) | (1 if p[2] == "a" else 0)
            if any(c not in "-uma" for c in p):
                break
            mode |= bits << (6 - 3 * i)
        else:
            return mode | 0o111 if mode else mode
    raise err.InvalidArgument(f"PERMISSIONS {value!r} is not octal (0755) or like 'um- u-- ---'")


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception as e:  # cleanup after a failure: the first error is the one to report
        log.debug("cleanup step failed: %s", e)
