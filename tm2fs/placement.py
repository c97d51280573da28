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

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import errors as err
from .expressions import Rank, Requirements, parse_rank, parse_requirements
from .sizes import format_size
from .store import Backend

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

    @property
    def ranking(self) -> str:
        return f"rank {self.rank.text}" if self.rank else f"policy {self.policy}"


def request(size: int, role: str | None = None, requirements: str | None = None,
            rank: str | None = None, policy: str | None = None,
            known: Collection[str] = ATTRIBUTES) -> Request:
    """Parse and check a request; bad input is refused before anything is reserved."""
    role = (role or "SAN").upper()
    if role not in ROLES:
        raise err.InvalidArgument(f"role {role!r} is not one of {', '.join(ROLES)}")
    policy = (policy or DEFAULT_POLICY).lower()
    if policy not in POLICIES:
        raise err.InvalidArgument(f"unknown placement policy {policy!r}",
                                  f"policies: {', '.join(POLICIES)}; or give --rank EXPR")
    return Request(size=size, role=role, requirements=parse_requirements(requirements or "", known),
                   rank=parse_rank(rank, known) if rank and rank.strip() else None, policy=policy)


@dataclass(slots=True)
class Verdict:
    """One backend's outcome: a candidate with its rank, or the reason it was filtered out."""

    backend: Backend
    attrs: dict[str, Any]
    reason: str | None = None  # None = candidate
    rank: tuple[float, ...] = ()
    matched: bool = False  # the requirements hold (whatever else filtered it)

    def view(self, position: int | None) -> dict[str, Any]:
        return {"ID": self.backend.id, "NAME": self.backend.name, "STATE": self.backend.state,
                "ROLE": self.backend.role, "COST": self.backend.cost,
                "AVAILABLE": self.attrs.get("AVAILABLE"),
                "RANK": None if self.reason else _rank_text(self.rank),
                "ORDER": position, "VERDICT": self.reason or "candidate"}


def _rank_text(rank: tuple[float, ...]) -> str:
    return ", ".join(f"{v:g}" for v in rank)


def _policy_key(policy: str) -> Callable[[Mapping[str, Any]], tuple[float, ...]]:
    """Higher ranks first; an unknown AVAILABLE counts as unlimited."""
    def avail(a: Mapping[str, Any]) -> float:
        v = a.get("AVAILABLE")
        return math.inf if v is None else float(v)

    return {
        "cost": lambda a: (-float(a["COST"]), avail(a)),
        "packing": lambda a: (-avail(a),),
        "striping": lambda a: (avail(a),),
        "fixed": lambda a: (float(a["PRIORITY"]), avail(a)),
    }[policy]


def decide(req: Request, pool: Iterable[tuple[Backend, dict[str, Any], Room]],
           may_use: Callable[[Backend], bool]) -> list[Verdict]:
    """Every backend's verdict: candidates first, best rank first (ties: lowest ID), then the
    filtered ones in pool order."""
    key = _policy_key(req.policy)
    candidates: list[Verdict] = []
    rejected: list[Verdict] = []
    for b, attrs, r in pool:
        v = Verdict(b, attrs)
        if b.state != "READY":
            v.reason = f"state is {b.state}" + (f" ({b.error})" if b.error else "")
        elif req.role != "ANY" and b.role != req.role:
            v.reason = f"role is {b.role}, not {req.role}"
        elif not may_use(b):
            v.reason = "permission denied (no write access to the backend directory)"
        if req.requirements.matches(attrs):
            v.matched = True
        elif v.reason is None:
            v.reason = f"requirements: {req.requirements.explain(attrs)}"
        if v.reason is None:
            v.reason = r.refusal(req.size)
        if v.reason is None:
            v.rank = (req.rank.value(attrs),) if req.rank else key(attrs)
            candidates.append(v)
        else:
            rejected.append(v)
    candidates.sort(key=lambda v: (tuple(-x for x in v.rank), v.backend.id))
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
