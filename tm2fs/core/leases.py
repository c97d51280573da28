"""Hosts and write leases: many hypervisors on one pool store.

Each daemon beats a heartbeat into the pool store; a host silent for `host_timeout` is presumed
dead, and only then may its write leases be broken. A write lease names the one host that may
write an image (a file open for writing, an attachment): other hosts may read it, not write,
resize or delete it. Leases matter only where hosts share the store (PostgreSQL).

The `*_in` methods run inside a transaction, on the store worker thread: they read no memory but
what their caller captured for them.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .. import __version__
from .. import errors as err
from ..model import Caller
from ..store import Tx
from .backends import Backends
from .permissions import require_root
from .pool import Pool

log = logging.getLogger(__name__)

HEARTBEAT = 2.0  # seconds between a daemon's signs of life in the pool store


class Leases:
    def __init__(self, pool: Pool, backends: Backends, mountpoint: str | None) -> None:
        self.pool = pool
        self.backends = backends
        self.host = pool.host
        self.mountpoint = mountpoint
        self.enabled = pool.store.shared
        self.writers: dict[int, int] = {}  # image id -> files open for writing on this host
        self.registered = False

    @property
    def host_timeout(self) -> float:
        return self.backends.host_timeout

    # ------------------------------------------------------------------ hosts

    async def register(self) -> None:
        t = time.time()
        await self.pool.write(lambda tx: tx.upsert_host(
            self.host, state="ONLINE", heartbeat=t, started=t, mountpoint=self.mountpoint,
            version=__version__, clusters=json.dumps(sorted(self.pool.clusters))))
        self.registered = True

    async def heartbeat(self) -> None:
        await self.pool.write(lambda tx: tx.upsert_host(self.host, state="ONLINE",
                                                        heartbeat=time.time()))

    async def unregister(self) -> None:
        """A clean stop: OFFLINE, and the leases of open files go (attachments keep theirs)."""
        if not self.registered:
            return

        def work(tx: Tx) -> None:
            tx.upsert_host(self.host, state="OFFLINE", heartbeat=time.time())
            attached = {a.image_id for a in tx.attachments(host=self.host)}
            for image_id, _, _ in tx.leases(holder=self.host):
                if image_id not in attached:
                    tx.delete_lease(image_id, self.host)

        await self.pool.write(work)

    async def list_hosts(self) -> list[dict[str, Any]]:
        """Every host of the pool: alive or not, what it sees of each backend, leases held."""
        hosts, views, leases = await self.pool.read(
            lambda tx: (tx.hosts(), tx.host_backends(), tx.leases()))
        now = time.time()
        names = {b.id: b.name for b in self.backends.by_id.values()}
        out = []
        for h in hosts:
            age = now - h["heartbeat"]
            out.append({
                "NAME": h["name"], "STATE": h["state"] if h["state"] != "ONLINE" or
                age < self.host_timeout else "UNREACHABLE", "HEARTBEAT_AGE": round(age, 1),
                "MOUNTPOINT": h["mountpoint"], "VERSION": h["version"], "STARTED": h["started"],
                "CLUSTERS": json.loads(h["clusters"]),
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

    # ------------------------------------------------------------------ leases

    def take_in(self, tx: Tx, image_id: int, holder: str, name: str) -> None:
        """Take (or keep) an image's write lease for `holder`, inside the caller's transaction."""
        if not self.enabled:
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

    def take_over_in(self, tx: Tx, image_id: int, holder: str, name: str) -> str | None:
        """Hand the write lease to `holder` from the host that holds it for an attachment (a live
        migration: the VM's source host keeps its attachment until it detaches, the destination
        writes from now on); the host it was taken from, or None if there was nothing to take.
        A lease held only by open files (no attachment there) is not handed over: that host
        is writing through its mount, not running the VM being migrated."""
        if not self.enabled:
            return None
        current = tx.lease(image_id)
        if current is None or current[0] == holder:
            self.take_in(tx, image_id, holder, name)
            return None
        if not tx.attachments(image_id=image_id, host=current[0]):
            raise err.Busy(f"{name} is written on host {current[0]} by open files, not an "
                           "attachment: there is no VM to take over", "close it there first")
        tx.delete_lease(image_id, current[0])
        tx.insert_lease(image_id, holder)
        return current[0]

    def not_elsewhere_in(self, tx: Tx, image_id: int, name: str) -> None:
        """Resizing or deleting an image another host writes would pull it from under it."""
        if self.enabled:
            current = tx.lease(image_id)
            if current is not None and current[0] != self.host:
                alive, beat = self._holder_alive(tx, current[0])
                raise err.Busy(f"{name} is being written on host {current[0]} ({beat})",
                               None if alive else "`tm2 break-lease` if that host is dead")

    @staticmethod
    def no_native_in(tx: Tx, image_id: int, name: str) -> None:
        """A VM attached natively (`tm2 attach --native`) writes the image without the mount: a
        second writer beside it (the mount, `tm2 write`) would race it, a staging driver's copy
        (`legacy`) would land over its writes, and a replacement would delete the very data it
        has open. Any host, leases or not. Reading stays allowed."""
        native = [a for a in tx.attachments(image_id=image_id) if a.native]
        if native:
            raise err.Busy(f"{name} is attached natively to a VM at {native[0].host}:"
                           f"{native[0].path}, which writes it without the mount",
                           "read it, or `tm2 detach` it first")

    def drop_attachment_lease_in(self, tx: Tx, image_id: int, host: str, writing: bool) -> None:
        """The lease goes with the host's last attachment, unless this host still writes it."""
        if (self.enabled and not tx.attachments(image_id=image_id, host=host)
                and not (host == self.host and writing)):
            tx.delete_lease(image_id, host)

    async def open_for_writing(self, image_id: int, name: str) -> None:
        """Count a writer here; the first one takes the write lease (two hosts racing: one gets
        Busy)."""
        if not self.enabled:
            return
        if not self.writers.get(image_id):
            try:
                await self.pool.write(lambda tx: self.take_in(tx, image_id, self.host, name))
            except err.Exists:
                raise err.Busy(f"{name} is being opened for writing on another host") from None
        self.writers[image_id] = self.writers.get(image_id, 0) + 1

    async def closed_for_writing(self, image_id: int) -> None:
        """The last writer here gone: the lease goes, unless an attachment here keeps it."""
        if not self.enabled:
            return
        left = self.writers.get(image_id, 0) - 1
        if left > 0:
            self.writers[image_id] = left
            return
        self.writers.pop(image_id, None)

        def work(tx: Tx) -> None:
            if not tx.attachments(image_id=image_id, host=self.host):
                tx.delete_lease(image_id, self.host)

        await self.pool.write(work)

    async def break_lease(self, address: str, image_id: int, caller: Caller,
                          force: bool = False) -> dict[str, Any]:
        """Take the write lease from a host that died holding it (or, with force, from any)."""
        require_root(caller, "break write leases")
        writing_here = bool(self.writers.get(image_id))

        def work(tx: Tx) -> tuple[str, float, str]:
            current = tx.lease(image_id)
            if current is None:
                raise err.NotFound(f"{address} has no write lease")
            holder, since = current
            alive, beat = self._holder_alive(tx, holder)
            if holder == self.host and writing_here:
                raise err.Busy(f"{address} is open for writing on this host")
            if alive and not force:
                raise err.Busy(f"host {holder} holding {address} is alive ({beat})",
                               "stop the writer there; --force breaks it anyway")
            tx.delete_lease(image_id)
            return holder, since, beat

        holder, since, beat = await self.pool.write(work)
        log.warning("broke the write lease of %s held by host %s since %s (%s)", address, holder,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)), beat)
        return {"IMAGE": address, "HOLDER": holder, "SINCE": since}
