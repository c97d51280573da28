"""Every Prometheus metric of the daemon, defined here once; the other modules only observe.

Names follow Prometheus's naming guide: the `tm2fs_` prefix, base units in the name (`_seconds`,
`_bytes`), `_total` on counters. Labels are bounded sets: FUSE operations, driver actions, route
templates (never a raw path), backend names.

Two kinds of figures:
- events (FUSE requests, driver calls, API requests, pool-store transactions) are counted as they
  happen, in histograms and counters of `REGISTRY`. The hot paths observe through a labelled
  child built once (`FUSE_SECONDS.labels("read").observe_ns`), never a per-request label lookup.
  FUSE requests and driver calls are all observed on the trio thread, and a read or write through
  the mount records into both: they use `LoopHistogram`, plain integers without locks, which
  costs about half of prometheus_client's thread-safe Histogram per observation (measured here:
  ~0.3 µs against ~0.6 µs, clock reads included), exported through the same registry.
- the pool's state (each backend's state, capacity, images, attachments; leases; heartbeats) is
  not kept in sync by hand: the core reads it at scrape time into a `PoolFigures`, and
  `exposition` turns that into metric families for that one scrape (a custom collector).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__

#: the daemon's own registry (not the library's global one: nothing else registers into it)
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# FUSE requests and driver calls: from a page-cache hit (tens of µs) to a slow backend
FAST = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# API requests and pool-store transactions: up to a whole-image copy behind an API request
SLOW = (1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class LoopChild:
    """One label set's buckets (not cumulative: each observation adds to one) and sum."""

    __slots__ = ("bounds_ns", "counts", "total_ns")

    def __init__(self, bounds_ns: tuple[int, ...]) -> None:
        self.bounds_ns = bounds_ns
        self.counts = [0] * (len(bounds_ns) + 1)  # the last one: above every bound (+Inf)
        self.total_ns = 0

    def observe_ns(self, ns: int) -> None:
        self.counts[bisect_left(self.bounds_ns, ns)] += 1  # the first bound >= ns: le semantics
        self.total_ns += ns

    def observe(self, seconds: float) -> None:
        self.observe_ns(round(seconds * 1e9))


class LoopHistogram(Collector):
    """A histogram observed and collected on the trio thread only (no locks; see the module
    docstring), registered in REGISTRY."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds_ns = tuple(round(b * 1e9) for b in buckets)
        self.les = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self.children: dict[tuple[str, ...], LoopChild] = {}
        REGISTRY.register(self)

    def labels(self, *values: str) -> LoopChild:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = LoopChild(self.bounds_ns)
        return child

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            running, buckets = 0, []
            for le, n in zip(self.les, child.counts, strict=True):
                running += n
                buckets.append((le, float(running)))
            family.add_metric(list(values), buckets, child.total_ns / 1e9)
        yield family


Info("tm2fs_build", "The running daemon's version", registry=REGISTRY).info({"version": __version__})

FUSE_SECONDS = LoopHistogram(
    "tm2fs_fuse_request_duration_seconds",
    "Time the daemon took to answer a FUSE request, by operation (lookup, read, write, ...)",
    ["operation"], FAST)

DRIVER_SECONDS = LoopHistogram(
    "tm2fs_driver_call_duration_seconds",
    "Time a backend's driver took for a call that succeeded, by backend and action "
    "(read, write, open, close, allocate, clone, monitor, ...)",
    ["backend", "action"], FAST)

DRIVER_TIMEOUTS = Counter(
    "tm2fs_driver_timeouts",
    "Driver calls abandoned after the backend's TIMEOUT (each turns the backend ERROR here)",
    ["backend", "action"], registry=REGISTRY)

API_REQUESTS = Counter(
    "tm2fs_api_requests",
    "Control-API requests answered, by method, route template and HTTP status",
    ["method", "route", "status"], registry=REGISTRY)

API_SECONDS = Histogram(
    "tm2fs_api_request_duration_seconds",
    "Time to the head of a control-API answer (a streamed body is not included), by route",
    ["method", "route"], buckets=SLOW, registry=REGISTRY)

STORE_SECONDS = Histogram(
    "tm2fs_store_transaction_duration_seconds",
    "Time one pool-store transaction took on the store worker (a write batch counts once), "
    "from its BEGIN to its commit",
    ["kind"], buckets=SLOW, registry=REGISTRY)

UNMATCHED = "(unmatched)"  # the route label of a request no route matched (404, 405)


@dataclass(frozen=True, slots=True)
class BackendFigures:
    name: str
    id: int
    tm: str
    role: str
    state: str
    capacity: int | None  # None: the driver does not know (yet)
    free: int | None
    used: int | None
    allocated: int | None  # None: the pool store did not answer this scrape
    images: int | None
    attachments: int | None


@dataclass(frozen=True, slots=True)
class PoolFigures:
    """The pool as one scrape sees it; None where the pool store did not answer."""

    states: tuple[str, ...]  # every state a backend can be in (a state set lists them all)
    backends: list[BackendFigures]
    open_images: int
    host_timeout: float
    store_up: bool
    leases_held: int | None = None
    heartbeat_ages: dict[str, float] | None = None


def pool_families(p: PoolFigures) -> Iterator[Metric]:
    """The pool's gauges for one scrape."""
    state = StateSetMetricFamily("tm2fs_backend_state", "Each backend's state as this host sees "
                                 "it (REMOTE: local to another host)", labels=["backend"])
    info = GaugeMetricFamily("tm2fs_backend_info", "Each backend's ID, driver and role",
                             labels=["backend", "id", "tm", "role"])
    sizes = {k: GaugeMetricFamily(f"tm2fs_backend_{k}_bytes", doc, labels=["backend"])
             for k, doc in (("capacity", "Size of the backend (as capped by its CAPACITY)"),
                            ("free", "Free space the driver reports"),
                            ("used", "Used space the driver reports"),
                            ("allocated", "Sum of its images' sizes and pending reservations"))}
    images = GaugeMetricFamily("tm2fs_backend_images", "Images on the backend (NBIMAGE)",
                               labels=["backend"])
    attachments = GaugeMetricFamily("tm2fs_backend_attachments",
                                    "Attachments of its images on any host (NBVM)",
                                    labels=["backend"])
    for b in p.backends:
        state.add_metric([b.name], {s: s == b.state for s in p.states})
        info.add_metric([b.name, str(b.id), b.tm, b.role], 1)
        for k, value in (("capacity", b.capacity), ("free", b.free), ("used", b.used),
                         ("allocated", b.allocated)):
            if value is not None:
                sizes[k].add_metric([b.name], value)
        if b.images is not None and b.attachments is not None:
            images.add_metric([b.name], b.images)
            attachments.add_metric([b.name], b.attachments)
    yield from (state, info, *sizes.values(), images, attachments)
    yield GaugeMetricFamily("tm2fs_store_up", "Whether the pool store answered this scrape's "
                            "read in time (else its figures are missing)", value=int(p.store_up))
    yield GaugeMetricFamily("tm2fs_open_images", "Images open on this host (by the mount or "
                            "the API)", value=p.open_images)
    yield GaugeMetricFamily("tm2fs_host_timeout_seconds", "Heartbeat age past which a host is "
                            "presumed dead", value=p.host_timeout)
    if p.leases_held is not None:
        yield GaugeMetricFamily("tm2fs_leases_held", "Write leases this host holds (shared pool "
                                "stores only)", value=p.leases_held)
    if p.heartbeat_ages is not None:
        ages = GaugeMetricFamily("tm2fs_host_heartbeat_age_seconds", "Time since each host of "
                                 "the pool last wrote its heartbeat", labels=["host"])
        for host, age in sorted(p.heartbeat_ages.items()):
            ages.add_metric([host], age)
        yield ages


class _Scrape:
    """A collector for one scrape: the registry's metrics and the pool's gauges."""

    def __init__(self, pool: PoolFigures) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from pool_families(self.pool)


def exposition(pool: PoolFigures, accept: str = "") -> tuple[bytes, str]:
    """The body and content type of a scrape (OpenMetrics if the scraper asks for it)."""
    encode, content_type = choose_encoder(accept)
    return encode(_Scrape(pool)), content_type  # type: ignore[arg-type]
