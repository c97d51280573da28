"""Backend administration (root only): create, update, enable/disable, delete.

A bad template adds nothing: everything is checked and the storage reached once before the row
is added. Drivers' `validate` may touch admin-given paths (a hung NFS server), so it runs in a
worker thread under the backend's timeout, never on the loop.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import trio

from .. import errors as err
from ..drivers import driver_class
from ..model import ROOT_INO, Caller, now_ns
from ..store import Tx
from . import backend_spec as spec_
from . import links, ownership
from .backends import Backends, Runtime, capped, quietly
from .permissions import require_root
from .pool import Pool

log = logging.getLogger(__name__)

VALIDATE_TIMEOUT = 30.0


class Admin:
    def __init__(self, pool: Pool, backends: Backends, state_dir: Path,
                 mountpoint: str | None = None) -> None:
        self.pool = pool
        self.backends = backends
        self.state_dir = state_dir
        self.mountpoint = mountpoint
        self._pool_id: str | None = None

    async def pool_id(self) -> str:
        """The pool's identity, as the markers in backends' directories name it."""
        if self._pool_id is None:
            self._pool_id = await self.pool.read(lambda tx: tx.pool_id())
        return self._pool_id

    def storage_dir(self, tm: str, tm_raw: dict[str, Any]) -> str | None:
        return driver_class(tm).storage_dir(tm_raw, self.pool.host)

    async def _check_storage(self, tm: str, tm_raw: dict[str, Any], name: str, timeout: float,
                             backend_id: int | None = None, known: set[str] | None = None,
                             ) -> str | None:
        """Refuse a directory that is a system one or overlaps another backend's or the state
        directory; with `known`, also one whose content is not this backend's (a marker naming
        another backend, image files it did not make). The backend's directory, if it has one."""
        directory = self.storage_dir(tm, tm_raw)
        if directory is None:
            return None
        others = [(b.name, d) for b in self.pool.backend_rows.values()
                  if b.id != backend_id and (d := self.storage_dir(b.tm, b.tm_raw)) is not None]
        ids = set(self.pool.backend_rows)
        pool_id = await self.pool_id()
        what = f"{tm} backend {name}: {'STORE' if 'STORE' in tm_raw else 'PATH'}"
        marked = driver_class(tm).marked

        def check() -> None:
            ownership.check_place(what, directory, others, self.state_dir, self.mountpoint)
            if known is None or not marked or not os.path.isdir(directory):
                return
            why = ownership.refusal(directory, pool_id, backend_id, known, lambda b: b not in ids)
            if why is not None:
                raise err.InvalidArgument(
                    f"{what} {directory!r} is not this backend's: {why}",
                    "give the backend an empty directory of its own; nothing was changed")

        await ownership.in_thread(check, timeout, f"checking the directory of backend {name}")
        return directory

    def _recheck(self, tx: Tx, tm: str, tm_raw: dict[str, Any], name: str,
                 backend_id: int | None = None) -> None:
        """In the transaction, as written: a backend another host or call added since the
        check also counts (the check with real paths ran before, in a thread)."""
        directory = self.storage_dir(tm, tm_raw)
        if directory is None:
            return
        for other in tx.backends():
            d = self.storage_dir(other.tm, other.tm_raw)
            how = None if d is None or other.id == backend_id else ownership.spelled_relation(
                directory, d)
            if d is not None and how is not None:
                raise ownership.overlap(f"{tm} backend {name}: PATH", directory, how, other.name, d)

    async def _mark(self, tm: str, name: str, backend_id: int, directory: str | None,
                    timeout: float) -> None:
        """The marker that lets the crash sweep work in the directory (if this one fails, the
        next start writes it)."""
        if directory is None or not driver_class(tm).marked:
            return
        pool_id = await self.pool_id()
        try:
            await ownership.in_thread(
                lambda: ownership.write_marker(directory, pool_id, backend_id), timeout,
                f"marking the directory of backend {name}")
        except (OSError, err.Tm2Error) as e:
            log.error("backend %s: could not write its marker in %s: %s", name, directory, e)

    async def _validate(self, tm: str, raw: dict[str, Any], name: str,
                        timeout: float) -> dict[str, Any]:
        cls = driver_class(tm)
        return await ownership.in_thread(lambda: cls.validate(raw, self.state_dir, name), timeout,
                                         f"checking TM_RAW of {name}")

    async def _unmark(self, name: str, backend_id: int, directory: str | None,
                      timeout: float) -> None:
        """Drop the backend's marker from a directory it no longer uses."""
        if directory is None:
            return
        pool_id = await self.pool_id()
        try:
            await ownership.in_thread(
                lambda: ownership.remove_marker(directory, pool_id, backend_id), timeout,
                f"unmarking the directory of backend {name}")
        except (OSError, err.Tm2Error) as e:
            log.error("backend %s: could not remove its marker in %s: %s", name, directory, e)

    async def create(self, caller: Caller, spec: dict[str, Any]) -> int:
        """Validate everything, reach the storage once, then add the row."""
        require_root(caller, "create backends")
        upper = spec_.upper(spec)
        for required in ("NAME", "TM"):
            if not upper.get(required):
                raise err.InvalidArgument(f"{required} is missing from the backend template",
                                          "e.g. NAME=ssd1 TM=dir")
        values = spec_.values(upper)
        tm = str(upper["TM"])
        driver_class(tm)  # an unknown TM is refused before anything else
        name = values["name"]
        if any(b.name == name for b in self.pool.backend_rows.values()):
            raise err.Exists(f"a backend named {name!r} exists",
                             "choose another NAME or `onestoragebackend update` that one")
        raw = spec_.tm_raw(upper.get("TM_RAW"))
        owner_host = raw.get("HOST") if tm == "dir" else None
        if owner_host and owner_host != self.pool.host:
            raise err.InvalidArgument(f"a backend local to host {owner_host} is created on that host",
                                      f"run the command on {owner_host} (its daemon checks the PATH)")
        timeout = values.get("timeout", VALIDATE_TIMEOUT)
        # before validate makes the directory, if TM_RAW names it; after, as completed
        await self._check_storage(tm, raw, name, timeout)
        tm_raw = await self._validate(tm, raw, name, timeout)
        directory = await self._check_storage(tm, tm_raw, name, timeout, known=set())
        uid, gid, mode = await spec_.owner(upper)
        driver = driver_class(tm)(tm_raw, self.state_dir)
        try:
            with trio.fail_after(timeout):
                await driver.start()
                cap = await driver.monitor()
        except (OSError, trio.TooSlowError) as e:
            await quietly(driver.stop())
            reason = "timed out" if isinstance(e, trio.TooSlowError) else (e.strerror or str(e))
            raise err.InvalidArgument(f"backend {name} is not reachable: {reason}",
                                      "check TM_RAW; nothing was created") from None
        total, free, used = capped(cap, values.get("capacity"))
        t = now_ns()

        def work(tx: Tx) -> int:
            if tx.backend_by_name(name):
                raise err.Exists(f"a backend named {name!r} exists")
            self._recheck(tx, tm, tm_raw, name)
            bid = tx.insert_backend(tm=tm, tm_raw=tm_raw, state="READY", total=total, free=free,
                                    used=used, monitored=time.time(), root_ino=0, **values)
            root = tx.insert_node(
                parent=ROOT_INO, name=name, backend_id=bid,
                mode=stat.S_IFDIR | (0o755 if mode is None else mode),
                uid=caller.uid if uid is None else uid, gid=caller.gid if gid is None else gid,
                atime_ns=t, mtime_ns=t, ctime_ns=t)
            tx.update_backend(bid, root_ino=root)
            tx.update_node(ROOT_INO, mtime_ns=t, ctime_ns=t)
            return bid

        try:
            bid = await self.pool.write(work)
        except BaseException:
            with trio.CancelScope(shield=True):
                await quietly(driver.stop())
            raise
        self.backends.runtimes[bid] = Runtime(driver, started=True)
        await self._mark(tm, name, bid, directory, timeout)
        log.info("backend %s (%d) created, TM=%s", name, bid, tm)
        return bid

    async def update(self, caller: Caller, ref: str | int, spec: dict[str, Any]) -> int:
        """Merge attributes into a backend; an empty value removes a custom attribute."""
        require_root(caller, "update backends")
        b = self.backends.find(ref)
        upper = spec_.upper(spec)
        if "TM" in upper and upper["TM"] != b.tm:
            raise err.InvalidArgument("TM cannot change", "create a new backend and move images")
        values = spec_.values(upper)
        if "attrs" in values:
            attrs = dict(b.attrs)
            for k, v in values["attrs"].items():
                if v in (None, ""):
                    attrs.pop(k, None)
                else:
                    attrs[k] = v
            values["attrs"] = attrs
        directory, moved = None, False
        if "TM_RAW" in upper:
            raw = dict(b.tm_raw)
            raw.update(spec_.tm_raw(upper["TM_RAW"]))
            await self._check_storage(b.tm, raw, b.name, b.timeout, b.id)
            values["tm_raw"] = await self._validate(b.tm, raw, b.name, b.timeout)
            # a new directory must hold nothing but this backend's images
            moved = self.storage_dir(b.tm, values["tm_raw"]) != self.storage_dir(b.tm, b.tm_raw)
            known = {im.key for im in self.pool.images.values() if im.backend_id == b.id}
            directory = await self._check_storage(b.tm, values["tm_raw"], b.name, b.timeout,
                                                  b.id, known if moved else None)
        uid, gid, mode = await spec_.owner(upper)
        node_values: dict[str, Any] = {}
        if uid is not None:
            node_values["uid"] = uid
        if gid is not None:
            node_values["gid"] = gid
        if mode is not None:
            node_values["mode"] = stat.S_IFDIR | mode
        new_name = values.get("name", b.name)

        def work(tx: Tx) -> None:
            if new_name != b.name:
                if tx.backend_by_name(new_name):
                    raise err.Exists(f"a backend named {new_name!r} exists")
                links.follow_backend_rename(tx, b.id, links.Move(b.name, new_name,
                                                                 self.mountpoint))
                tx.update_node(b.root_ino, name=new_name)
            if "tm_raw" in values:
                self._recheck(tx, b.tm, values["tm_raw"], b.name, b.id)
            if node_values:
                tx.update_node(b.root_ino, ctime_ns=now_ns(), **node_values)
            if values:
                tx.update_backend(b.id, **values)

        await self.pool.write(work)
        if directory is not None and moved:
            await self._mark(b.tm, b.name, b.id, directory, b.timeout)
        if moved:  # the old directory may serve another backend now
            await self._unmark(b.name, b.id, self.storage_dir(b.tm, b.tm_raw), b.timeout)
        if "tm_raw" in values or "capacity" in values:
            await self.backends.monitor(b.id)
        return b.id

    async def set_enabled(self, caller: Caller, ref: str | int, enabled: bool) -> int:
        """DISABLED backends keep serving reads; enabling re-checks the backend at once."""
        require_root(caller, "enable or disable backends")
        b = self.backends.find(ref)
        await self.pool.write(
            lambda tx: tx.update_backend(b.id, state="INIT" if enabled else "DISABLED"))
        if enabled:
            await self.backends.monitor(b.id)
        log.info("backend %s %s", b.name, "enabled" if enabled else "disabled")
        return b.id

    async def delete(self, caller: Caller, ref: str | int, force: bool = False) -> None:
        """Refused while the backend holds images, unless forced (then their data goes too)."""
        require_root(caller, "delete backends")
        b = self.backends.find(ref)
        images = [im for im in self.pool.images.values() if im.backend_id == b.id]
        attached = await self.pool.read(lambda tx: tx.attachments(backend_id=b.id))
        if images and not force:
            raise err.Busy(f"backend {b.name} holds {len(images)} image(s)",
                           "delete them first, or `onestoragebackend delete --force` removes them")
        if attached and not force:
            raise err.Busy(f"backend {b.name} has {len(attached)} attachment(s)")
        if any(oi.backend_id == b.id for oi in self.pool.open.values()):
            raise err.Busy(f"backend {b.name} has open files", "close them first")

        def work(tx: Tx) -> None:
            tx.delete_backend(b.id)
            tx.update_node(ROOT_INO, mtime_ns=now_ns(), ctime_ns=now_ns())

        rt = self.backends.runtimes.get(b.id)
        await self.pool.write(work)
        if rt is not None:
            for im in images:
                try:
                    with trio.fail_after(b.timeout):
                        await rt.driver.delete(im.key)
                except (OSError, trio.TooSlowError) as e:
                    log.error("backend %s: could not delete image data %s: %s", b.name, im.key, e)
        await self.backends.stop_retired()  # the delta retired its runtime
        await self._unmark(b.name, b.id, self.storage_dir(b.tm, b.tm_raw), b.timeout)
        log.info("backend %s (%d) deleted", b.name, b.id)
