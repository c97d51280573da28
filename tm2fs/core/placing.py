"""Placement at run time: the snapshot decisions are made on, and the reservations that hold space.

The decision (`placement.py`, pure) runs on a snapshot of the pool at most SNAPSHOT_TTL old, with
this daemon's own reservations applied in place, so a burst of placements needs no re-read. The
promise is a reservation: one transaction that re-checks the backend's room while holding its row
(FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite) and inserts it, so concurrent creates on any
host can never together pass a backend's limits. If another host took the room, the next
candidate is tried.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import errors as err
from .. import placement
from ..model import Backend, Caller
from ..names import check_name
from ..sizes import format_size, parse_size
from ..store import Tx
from .backends import Backends
from .permissions import EXEC, WRITE, may
from .pool import Pool

log = logging.getLogger(__name__)

SNAPSHOT_TTL = 1.0  # seconds: how stale placement's view of other hosts' changes may be


class Placing:
    def __init__(self, pool: Pool, backends: Backends) -> None:
        self.pool = pool
        self.backends = backends
        #: (taken at, pool, attribute names)
        self._snapshot: tuple[float, placement.Pool, set[str]] | None = None
        #: (read at, backend id -> (NBIMAGE, NBVM, ALLOCATED)): kept when only backend rows
        #: change (a monitor pass on any host), so that costs no aggregate query
        self._counters: tuple[float, dict[int, tuple[int, int, int]]] | None = None
        pool.backend_hooks.append(self._backends_changed)

    def _backends_changed(self) -> None:
        self._snapshot = None

    def forget(self) -> None:
        self._snapshot = self._counters = None

    async def place(self, caller: Caller, size: int | str, *, role: str | None = None,
                    requirements: str | None = None, rank: str | None = None,
                    policy: str | None = None, cluster: str | None = None,
                    key: str | None = None,
                    ) -> tuple[list[placement.Verdict], Backend | None, int | None]:
        """Choose a backend for a new image of `size`, among the backends of this host's
        clusters unless `cluster` names others ("a,b", or "*" for any). Without `key`: every
        backend's verdict (the explanation). With it: the chosen backend and the reservation
        holding its space for the data being made under that key."""
        size = parse_size(size)
        pool, known = await self._pool()
        req = placement.request(size, role, requirements, rank, policy, known,
                                self._clusters(cluster))
        may_use = None
        if not caller.is_root:
            nodes = self.pool.nodes
            may_use = lambda b: may(caller, nodes.get(b.root_ino), WRITE | EXEC)  # noqa: E731
        if key is None:
            return placement.decide(req, pool, may_use), None, None
        for v in placement.ranked(req, pool, may_use):
            try:
                reservation = await self.reserve(v.backend.id, size, key)
            except err.NoSpace:
                self.forget()  # the snapshot promised room another host took
                continue
            log.info("placed %s on backend %s (%s)", format_size(size), v.backend.name,
                     req.ranking)
            return [v], v.backend, reservation
        verdicts = placement.decide(req, (await self._pool())[0], may_use)
        for v in verdicts:
            if v.reason is None:  # the snapshot said it fits; its reservation said otherwise
                v.reason = "its room was just taken (by another host or client)"
        raise placement.no_room(req, verdicts)

    def _clusters(self, cluster: str | None) -> frozenset[str] | None:
        if cluster is None:
            return self.pool.clusters
        if cluster.strip() == "*":
            return None
        return frozenset(check_name(c.strip(), "cluster") for c in cluster.split(","))

    async def explain(self, caller: Caller, size: int | str, **options: Any) -> list[dict[str, Any]]:
        """Every backend's verdict for a new image of `size`, in order: the dry run."""
        verdicts, _, _ = await self.place(caller, size, **options)
        return [v.view(i + 1 if v.reason is None else None) for i, v in enumerate(verdicts)]

    async def _pool(self) -> tuple[placement.Pool, set[str]]:
        """Backends as placement sees them, and every attribute name expressions may use."""
        cached = self._snapshot
        if cached is not None and time.monotonic() - cached[0] < SNAPSHOT_TTL:
            return cached[1], cached[2]
        if self._counters is not None and time.monotonic() - self._counters[0] < SNAPSHOT_TTL:
            taken, counters = self._counters
        else:
            taken, counters = time.monotonic(), await self.pool.read(Tx.counters)
            self._counters = taken, counters
        backends = list(self.backends.by_id.values())
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
        self._snapshot = (taken, pool, known)
        return pool, known

    async def reserve(self, backend_id: int, size: int, key: str | None) -> int:
        """Promise `size` bytes of a backend's virtual space, atomically. `key` names the data
        being made, so no host's sweep takes it for a leftover."""
        host = self.pool.host

        def work(tx: Tx) -> int:
            if size <= 0:  # promises no space: only the key is recorded, no lock, no sum
                return tx.insert_reservation(backend_id, 0, host, key)
            b = tx.lock_backend(backend_id)
            if b is None:
                raise err.NotFound(f"backend {backend_id} does not exist")
            why = placement.room(b, tx.allocated(b.id)).refusal(size)
            if why:
                raise err.NoSpace(f"backend {b.name} cannot take {format_size(size)} more: {why}",
                                  "free space, raise OVERCOMMIT or CAPACITY, or use auto: placement")
            return tx.insert_reservation(b.id, size, host, key)

        reservation = await self.pool.write(work)
        self._reserved(backend_id, size)
        return reservation

    async def unreserve(self, reservation: int | None) -> None:
        """Give a promise back (a failed create); gone already is fine."""
        if reservation is not None:
            self.forget()
            await self.pool.write(lambda tx: tx.delete_reservation(reservation))

    def _reserved(self, backend_id: int, size: int) -> None:
        """Keep the snapshot true to this daemon's own reservation, in place."""
        if self._counters is not None:
            nbimage, nbvm, allocated = self._counters[1].get(backend_id, (0, 0, 0))
            self._counters[1][backend_id] = (nbimage, nbvm, allocated + size)
        cached = self._snapshot
        if cached is None:
            return
        for i, (b, attrs, r) in enumerate(cached[1]):
            if b.id == backend_id:
                r = placement.room(b, r.allocated + size)
                cached[1][i] = (b, {**attrs, "ALLOCATED": r.allocated, "AVAILABLE": r.available}, r)
                return
