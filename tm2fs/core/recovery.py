"""After a crash: the pool store and the backends brought back in line, before the mount opens.

Creates cut short leave reservations (dropped) and keys no image names (swept, unless a create in
progress on another host holds them); pushes, writes and copies cut short leave hidden images
(dropped with their data); unlinks cut short leave images no entry names (dropped with
their data); sizes are re-read from the drivers; links on the mount that vanished end their
attachments; leases of files that were open go (those of attachments stay).
"""

from __future__ import annotations

import logging
from functools import partial

from .. import errors as err
from ..drivers import driver_class
from ..model import ROOT, Backend
from ..store import Tx
from . import ownership
from .admin import Admin
from .backends import Backends
from .pool import Pool

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, pool: Pool, backends: Backends, admin: Admin) -> None:
        self.pool = pool
        self.backends = backends
        self.admin = admin

    async def reconcile(self) -> dict[str, int]:
        fixed = {"orphans": 0, "leftovers": 0, "sizes": 0, "links": 0, "reservations": 0,
                 "leases": 0}
        host = self.pool.host

        def work(tx: Tx) -> list:
            for rid, *_ in tx.reservations(host=host):  # creates cut short by the crash
                tx.delete_reservation(rid)
                fixed["reservations"] += 1
            orphans = tx.orphan_images()
            for im in orphans:
                tx.delete_image(im.id)
            for a in tx.attachments(host=host):
                if a.link_ino is not None and tx.node(a.link_ino) is None:
                    tx.delete_attachment(a.id)
                    fixed["links"] += 1
            # no file is open after a restart: the leases of this host's attachments remain
            attached = {a.image_id for a in tx.attachments(host=host)}
            for image_id, _, _ in tx.leases(holder=host):
                if image_id not in attached:
                    tx.delete_lease(image_id, host)
                    fixed["leases"] += 1
            return orphans

        orphans = await self.pool.write(work)
        incomplete = await self._drop_incomplete()  # counted as orphans: no name names them
        for im in orphans:
            b = self.backends.by_id.get(im.backend_id)
            if b:
                await self.backends.delete_data(b, im.key)
        fixed["orphans"] = len(orphans) + incomplete
        for b in list(self.backends.by_id.values()):
            if b.state in ("READY", "DISABLED"):
                try:
                    await self._sweep(b.id, fixed)
                except err.Tm2Error as e:
                    log.error("reconcile of backend %s failed: %s", b.name, e.message)
        if any(fixed.values()):
            log.info("reconciled the pool store: %s", fixed)
        return fixed

    async def _drop_incomplete(self) -> int:
        """Pushes, writes and copies this host was making when it died: their hidden images
        (`Images.create(hidden=True)`) go, rows then data. Other hosts' are theirs to finish."""
        mine = f"{self.pool.host}/"

        def work(tx: Tx) -> list[tuple[int, str]]:
            gone = []
            for n in tx.detached_nodes():
                if n.name.startswith(mine) and n.image_id is not None:
                    im = tx.image(n.image_id)
                    tx.delete_node(n.ino)
                    tx.delete_image(n.image_id)
                    if im is not None:
                        gone.append((im.backend_id, im.key))
            return gone

        gone = await self.pool.write(work)
        for backend_id, key in gone:
            b = self.backends.by_id.get(backend_id)
            if b:
                await self.backends.delete_data(b, key)
        return len(gone)

    async def _sweep(self, backend_id: int, fixed: dict[str, int]) -> None:
        b = self.backends.get(backend_id)
        async with self.backends.call(b, "reconcile") as driver:
            keys = await driver.keys()

        def known_keys(tx: Tx) -> tuple[set[str], list]:
            # creates in progress on any host first: one that commits between the two reads is
            # then seen in one or the other, never in neither
            known = tx.reserved_keys(b.id)
            images = tx.images(b.id)
            return known | {im.key for im in images}, images

        known, images = await self.pool.read(known_keys)
        if keys is not None and not await self._owned(b, known):
            keys = None
        async with self.backends.call(b, "reconcile") as driver:
            for key in keys or []:
                if key not in known and ownership.is_key(key):
                    await driver.delete(key)
                    fixed["leftovers"] += 1
        for im in images:
            if im.id in self.pool.open:
                continue
            try:
                async with self.backends.call(b, "reconcile") as driver:
                    real = await driver.size(im.key)
            except err.Unsupported:
                return  # e.g. a legacy script set on a remote host: sizes stay as kept
            if real != im.size:
                await self.pool.write(partial(Tx.set_image_size, image_id=im.id, size=real))
                fixed["sizes"] += 1

    async def _owned(self, b: Backend, known: set[str]) -> bool:
        """Whether the sweep may delete in the backend's directory: its marker names this
        backend of this pool (a directory without one gets it if it holds only `known` keys)."""
        directory = self.admin.storage_dir(b.tm, b.tm_raw)
        if directory is None or not driver_class(b.tm).marked:
            return True
        pool_id = await self.admin.pool_id()
        try:
            why = await ownership.in_thread(
                lambda: ownership.claim(directory, pool_id, b.id, known), b.timeout,
                f"reading the marker of backend {b.name}")
        except (OSError, err.Tm2Error) as e:
            why = getattr(e, "message", None) or str(e)
        if why is not None:
            log.error("backend %s: leftovers in %s not swept, nothing deleted there: %s",
                      b.name, directory, why)
        return why is None

    async def ensure_default_backend(self) -> None:
        """The embedded default: a `local` directory backend under the state directory, shared
        as /tmp is (sticky: everyone creates, only an entry's owner removes or renames it)."""
        if not self.backends.by_id:
            await self.admin.create(ROOT, {"NAME": "local", "TM": "dir", "ROLE": "SAN",
                                           "PERMISSIONS": "1777"})
