"""Placement: which backend takes a new image. Pure decisions over a snapshot of the pool.

The same capacity arithmetic (`Room`) serves the decision here and the atomic check the service
makes inside the transaction that reserves the space, so the two can never disagree about what
fits. Like OpenNebula's scheduler, a decision filters (state, role, permission, requirements,
capacity) and then ranks (higher first); unlike it, every backend gets a stated reason, which
`tm2 place --explain` prints.

Capacity, as Cinder's capacity filter does it:
- the reserved share (RESERVED, a fraction of the total) is never promised;
- virtual space (the sizes of all images plus pending reservations, ALLOCATED) may reach
  (total - reserved) x OVERCOMMIT, so thin images can promise more than the disks hold;
- real space must still be there: (FREE - reserved) x OVERCOMMIT must cover the new image.
Unknown totals (a driver that cannot say) are not limits.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import errors as err
from .expressions import Rank, Requirements, parse_rank, parse_requirements
from .model import Backend
from .sizes import format_size

POLICIES = ("cost", "packing", "striping", "fixed")
DEFAULT_POLICY = "cost"
ROLES = ("SAN", "REPOSITORY", "ANY")
MB = 2**20
#: attributes every backend has in expressions (custom attributes come on top)
ATTRIBUTES = ("ID", "NAME", "STATE", "TM", "ROLE", "COST", "PRIORITY", "CAPACITY", "FREE", "USED",
              "ALLOCATED", "AVAILABLE", "OVERCOMMIT", "RESERVED", "TAGS", "NBIMAGE", "NBVM",
              "CLUSTER", "TIMEOUT", "FREE_MB", "USED_MB", "TOTAL_MB")


@dataclass(frozen=True, slots=True)
class Room:
    """What a backend can still promise."""

    limit: int | None  # virtual: (total - reserved) x overcommit
    allocated: int  # virtual in use: images + pending reservations
    real_free: int | None  # FREE - reserved
    overcommit: float

    @property
    def available(self) -> int | None:
        """The largest new image that fits now; None = no known limit."""
        bounds = []
        if self.limit is not None:
            bounds.append(self.limit - self.allocated)
        if self.real_free is not None:
            bounds.append(int(self.real_free * self.overcommit))
        return max(0, min(bounds)) if bounds else None

    def fits(self, size: int) -> bool:
        return ((self.limit is None or self.allocated + size <= self.limit)
                and (self.real_free is None or self.real_free * self.overcommit >= size))

    def refusal(self, size: int) -> str | None:
        """Why `size` more bytes do not fit, or None if they do."""
        if self.limit is not None and self.allocated + size > self.limit:
            return (f"virtual space: {format_size(self.allocated)} allocated + {format_size(size)} "
                    f"> limit {format_size(self.limit)} (overcommit {self.overcommit:g})")
        if self.real_free is not None and self.real_free * self.overcommit < size:
            return (f"real space: {format_size(max(0, self.real_free))} free after the reserved "
                    f"share, x{self.overcommit:g} < {format_size(size)}")
        return None


def room(b: Backend, allocated: int) -> Room:
    reserve = int((b.total or 0) * b.reserved)
    limit = None if b.total is None else int((b.total - reserve) * b.overcommit)
    real = None if b.free is None else b.free - reserve
    return Room(limit, allocated, real, b.overcommit)


def attributes(b: Backend, r: Room, nbimage: int = 0, nbvm: int = 0) -> dict[str, Any]:
    """The backend as expressions see it (sizes in bytes; *_MB as OpenNebula's scheduler has)."""
    out: dict[str, Any] = {str(k).upper(): v for k, v in b.attrs.items()}
    out.update(
        ID=b.id, NAME=b.name, STATE=b.state, TM=b.tm, ROLE=b.role, COST=b.cost,
        PRIORITY=b.priority, CAPACITY=b.total, FREE=b.free, USED=b.used, ALLOCATED=r.allocated,
        AVAILABLE=r.available, OVERCOMMIT=b.overcommit, RESERVED=b.reserved, TAGS=b.tags,
        NBIMAGE=nbimage, NBVM=nbvm, CLUSTER=b.cluster, TIMEOUT=b.timeout,
        FREE_MB=None if b.free is None else b.free // MB,
        USED_MB=None if b.used is None else b.used // MB,
        TOTAL_MB=None if b.total is None else b.total // MB,
    )
    return out


@dataclass(frozen=True)
class Request:
    """What a new image asks for."""

    size: int
    role: str = "SAN"  # SAN for VM disks, REPOSITORY for base images, ANY
    requirements: Requirements = field(default_factory=lambda: parse_requirements(""))
    rank: Rank | None = None  # a custom rank expression, else the policy
    policy: str = DEFAULT_POLICY
    clusters: frozenset[str] | None = None  # backends of these clusters only; None: any

    @property
    def ranking(self) -> str:
        return f"rank {self.rank.text}" if self.rank else f"policy {self.policy}"


def request(size: int, role: str | None = None, requirements: str | None = None,
            rank: str | None = None, policy: str | None = None,
            known: Collection[str] = ATTRIBUTES, clusters: frozenset[str] | None = None,
            ) -> Request:
    """Parse and check a request; bad input is refused before anything is reserved."""
    role = (role or "SAN").upper()
    if role not in ROLES:
        raise err.InvalidArgument(f"role {role!r} is not one of {', '.join(ROLES)}")
    policy = (policy or DEFAULT_POLICY).lower()
    if policy not in POLICIES:
        raise err.InvalidArgument(f"unknown placement policy {policy!r}",
                                  f"policies: {', '.join(POLICIES)}; or give --rank EXPR")
    return Request(size=size, role=role, requirements=parse_requirements(requirements or "", known),
                   rank=parse_rank(rank, known) if rank and rank.strip() else None, policy=policy,
                   clusters=clusters)


@dataclass(slots=True)
class Verdict:
    """One backend's outcome: a candidate with its rank, or the reason it was filtered out."""

    backend: Backend
    attrs: dict[str, Any]
    reason: str | None = None  # None = candidate
    rank: str = ""  # what the ranking saw, for people
    matched: bool = False  # the requirements hold (whatever else filtered it)

    def view(self, position: int | None) -> dict[str, Any]:
        return {"ID": self.backend.id, "NAME": self.backend.name, "STATE": self.backend.state,
                "ROLE": self.backend.role, "COST": self.backend.cost,
                "AVAILABLE": self.attrs.get("AVAILABLE"),
                "RANK": None if self.reason else self.rank,
                "ORDER": position, "VERDICT": self.reason or "candidate"}


Pool = list[tuple[Backend, dict[str, Any], Room]]
SortKey = Callable[[Mapping[str, Any]], tuple[float, ...]]


def _avail(a: Mapping[str, Any]) -> float:
    v = a["AVAILABLE"]
    return math.inf if v is None else v


def _neg_avail(a: Mapping[str, Any]) -> float:
    v = a["AVAILABLE"]
    return -math.inf if v is None else -v


#: sort keys, lowest first (the negation of the rank users read); unknown AVAILABLE = unlimited
_SORT: dict[str, SortKey] = {
    "cost": lambda a: (a["COST"], _neg_avail(a)),
    "packing": lambda a: (_avail(a),),
    "striping": lambda a: (_neg_avail(a),),
    "fixed": lambda a: (-a["PRIORITY"], _neg_avail(a)),
}


def _describe(req: Request, key: tuple[float, ...], attrs: Mapping[str, Any]) -> str:
    if req.rank is not None:
        return f"{-key[0]:g}"
    avail = f"AVAILABLE {format_size(attrs['AVAILABLE'])}"
    return {"cost": f"COST {attrs['COST']}, {avail}", "fixed": f"PRIORITY {attrs['PRIORITY']}, {avail}"
            }.get(req.policy, avail)


def _sort_key(req: Request) -> SortKey:
    if req.rank is not None:
        value = req.rank.value
        return lambda a: (-value(a),)
    return _SORT[req.policy]


def ranked(req: Request, pool: Pool,
           may_use: Callable[[Backend], bool] | None = None) -> Iterator[Verdict]:
    """The candidates, best first (ties: lowest ID), produced lazily. Placing an image usually
    needs only the first: one streaming pass finds it without keeping anything alive (a list of
    thousands of keys would wake the garbage collector over the whole pool: 4x the p99); the
    rest are ranked only if the first could not be reserved."""
    matches, role, size, key = req.requirements.matches, req.role, req.size, _sort_key(req)
    clusters = req.clusters

    def eligible(b: Backend, attrs: dict[str, Any], r: Room) -> bool:
        return (b.state == "READY" and (role == "ANY" or b.role == role)
                and (clusters is None or b.cluster in clusters) and matches(attrs)
                and r.fits(size) and (may_use is None or may_use(b)))

    best: tuple[tuple[float, ...], int] | None = None
    first = None
    for b, attrs, r in pool:  # eligible(), inlined: this loop is the decision's whole cost
        if (b.state == "READY" and (role == "ANY" or b.role == role)
                and (clusters is None or b.cluster in clusters) and matches(attrs)
                and r.fits(size) and (may_use is None or may_use(b))):
            k = (key(attrs), b.id)
            if best is None or k < best:
                best, first = k, (b, attrs)
    if best is None or first is None:
        return
    yield Verdict(first[0], first[1], rank=_describe(req, best[0], first[1]), matched=True)
    heap = [(key(attrs), b.id, b, attrs) for b, attrs, r in pool
            if b.id != best[1] and eligible(b, attrs, r)]
    heapq.heapify(heap)
    while heap:
        order, _, b, attrs = heapq.heappop(heap)
        yield Verdict(b, attrs, rank=_describe(req, order, attrs), matched=True)


def decide(req: Request, pool: Pool,
           may_use: Callable[[Backend], bool] | None = None) -> list[Verdict]:
    """Every backend's verdict, for explanations: the candidates in order, then the filtered
    ones in pool order, each with its reason."""
    candidates = list(ranked(req, pool, may_use))
    chosen = {v.backend.id for v in candidates}
    rejected = []
    for b, attrs, r in pool:
        if b.id in chosen:
            continue
        v = Verdict(b, attrs, matched=req.requirements.matches(attrs))
        if b.state != "READY":
            v.reason = f"state is {b.state}" + (f" ({b.error})" if b.error else "")
        elif req.role != "ANY" and b.role != req.role:
            v.reason = f"role is {b.role}, not {req.role}"
        elif req.clusters is not None and b.cluster not in req.clusters:
            v.reason = (f"cluster is {b.cluster}, not {', '.join(sorted(req.clusters))} "
                        "(--cluster NAME or --cluster '*' to place elsewhere)")
        elif may_use is not None and not may_use(b):
            v.reason = "permission denied (no write access to the backend directory)"
        elif not v.matched:
            v.reason = f"requirements: {req.requirements.explain(attrs)}"
        else:
            v.reason = r.refusal(req.size) or "filtered"
        rejected.append(v)
    return candidates + rejected


def no_room(req: Request, verdicts: list[Verdict]) -> err.Tm2Error:
    """The error when nothing took the image: say why, by backend, and where to look."""
    if not any(v.matched for v in verdicts) and req.requirements.text.strip():
        return err.InvalidArgument(
            f"requirements {req.requirements.text!r} match no backend",
            "`onestoragebackend list` shows the backends and their attributes")
    reasons = "; ".join(f"{v.backend.name}: {v.reason}" for v in verdicts[:5])
    more = f" (and {len(verdicts) - 5} more)" if len(verdicts) > 5 else ""
    return err.NoSpace(f"no backend can take {format_size(req.size)}: {reasons}{more}" if verdicts
                       else "there are no backends",
                       "`tm2 place SIZE --explain` shows every backend's verdict")
