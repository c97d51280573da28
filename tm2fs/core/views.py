"""What the CLIs and the metrics show of backends: one row per backend with its true counters
(NBIMAGE, NBVM, ALLOCATED are counted in the pool store at the time of asking), one backend in
detail, and the pool's gauges for a scrape."""

from __future__ import annotations

import time
from typing import Any

from .. import errors as err
from .. import metrics, placement
from ..model import ROOT, STATES, Backend, Caller, Node
from ..store import Tx
from .actions import attachment_view
from .backend_spec import Names
from .backends import Backends
from .permissions import sees
from .pool import Pool

SCRAPE_STORE_TIMEOUT = 5.0  # seconds; Prometheus gives a scrape 10 s by default


class Views:
    def __init__(self, pool: Pool, backends: Backends) -> None:
        self.pool = pool
        self.backends = backends
        self.names = Names()

    async def list(self) -> list[dict[str, Any]]:
        counters = await self.pool.read(Tx.counters)
        return [await self._row(b, counters.get(b.id, (0, 0, 0)))
                for b in self.backends.by_id.values()]

    async def show(self, ref: str | int, detail: bool = False,
                   caller: Caller = ROOT) -> dict[str, Any]:
        """One backend; in detail, with the images and attachments whose names the caller may
        see (as `ls` would show them), and their keys only to root."""
        b = self.backends.find(ref)
        if not detail:
            counters = await self.pool.read(Tx.counters)
            return await self._row(b, counters.get(b.id, (0, 0, 0)))

        def work(tx: Tx) -> tuple:
            return (tx.counters().get(b.id, (0, 0, 0)), tx.host_backends(),
                    tx.attachments(backend_id=b.id))

        counters, views, attached = await self.pool.read(work)
        view = await self._row(b, counters)
        view["HOSTS"] = {v["host"]: v["state"] for v in views if v["backend_id"] == b.id}
        shown = {im.id for im in self.pool.images.values()
                 if im.backend_id == b.id and not self._incomplete(im.id)
                 and self._sees(caller, im.id)}
        view["IMAGES"] = [self.image_row(i, caller) for i in sorted(shown)]
        view["ATTACHMENTS"] = [attachment_view(a) for a in attached
                               if a.image_id in shown or a.uid == caller.uid]
        return view

    async def figures(self) -> metrics.PoolFigures:
        """The pool at scrape time. States and sizes come from memory; the counters (exactly
        as `list` shows them: attachments are not in memory, ALLOCATED includes the pending
        reservations of every host), this host's leases and every host's heartbeat from one
        read of the pool store. If the store does not answer within SCRAPE_STORE_TIMEOUT, the
        scrape has the memory part and says so (tm2fs_store_up 0)."""
        host = self.pool.host

        def work(tx: Tx) -> tuple[dict[int, tuple[int, int, int]], int, dict[str, float]]:
            return (tx.counters(), len(tx.leases(holder=host)),
                    {h["name"]: h["heartbeat"] for h in tx.hosts()})

        counters: dict[int, tuple[int, int, int]] | None = None
        leases = ages = None
        try:
            counters, leases, beats = await self.pool.read(work, timeout=SCRAPE_STORE_TIMEOUT)
            now = time.time()
            ages = {name: max(0.0, now - beat) for name, beat in beats.items()}
        except err.Tm2Error:
            pass
        rows = []
        for b in self.backends.by_id.values():
            c = counters.get(b.id, (0, 0, 0)) if counters is not None else (None, None, None)
            rows.append(metrics.BackendFigures(b.name, b.id, b.tm, b.role, b.state, b.total,
                                               b.free, b.used, c[2], c[0], c[1]))
        return metrics.PoolFigures((*STATES, "REMOTE"), rows, len(self.pool.open),
                                   self.backends.host_timeout, counters is not None, leases, ages)

    def _incomplete(self, image_id: int) -> bool:
        """A push, write or copy on its way (`Images.create(hidden=True)`): not shown."""
        n = self.pool.nodes.get(self.pool.image_ino.get(image_id, 0))
        return n is not None and n.parent is None

    def _sees(self, caller: Caller, image_id: int) -> bool:
        ino = self.pool.image_ino.get(image_id)
        n = self.pool.nodes.get(ino) if ino is not None else None
        return caller.is_root or (n is not None and sees(caller, n, self.pool.nodes.get))

    def image_row(self, image_id: int, caller: Caller = ROOT) -> dict[str, Any]:
        im = self.pool.images[image_id]
        ino = self.pool.image_ino.get(image_id)
        return {"ID": im.id, "PATH": self.pool.path(ino) if ino is not None else None,
                "SIZE": self.pool.image_size(im.id), "KEY": im.key if caller.is_root else None,
                "CREATED": im.created}

    async def _row(self, b: Backend, counters: tuple[int, int, int]) -> dict[str, Any]:
        root: Node | None = self.pool.nodes.get(b.root_ino)
        uid = root.uid if root else 0
        gid = root.gid if root else 0
        return {
            "ID": b.id, "NAME": b.name, "STATE": b.state, "TM": b.tm, "TM_RAW": b.tm_raw,
            "CAPACITY": b.total, "FREE": b.free, "USED": b.used, "ALLOCATED": counters[2],
            "AVAILABLE": placement.room(b, counters[2]).available,
            "CAPACITY_LIMIT": b.capacity, "OVERCOMMIT": b.overcommit, "RESERVED": b.reserved,
            "PRIORITY": b.priority, "COST": b.cost, "ROLE": b.role, "TAGS": b.tags,
            "NBIMAGE": counters[0], "NBVM": counters[1], "USER": await self.names.user(uid),
            "GROUP": await self.names.group(gid), "UID": uid, "GID": gid,
            "PERMISSIONS": f"{(root.mode if root else 0) & 0o7777:04o}",
            "CLUSTER": b.cluster, "TIMEOUT": b.timeout, "ERROR": b.error, "ATTRS": b.attrs,
            "CREATED": b.created, "UPDATED": b.updated, "MONITORED": b.monitored,
        }
