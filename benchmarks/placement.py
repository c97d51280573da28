"""One placement decision with 10 / 1,000 / 10,000 backends: p50 and p99.

Three figures per pool size:
- `decide`: the decision alone (filter + rank with a 3-term requirement, the best candidate)
  over an in-memory pool;
- `place`: a whole placement in the service, as `tm2 allocate auto:` makes it: the decision on
  the daemon's pool snapshot (re-read from the SQLite pool store when older than SNAPSHOT_TTL,
  so the slow re-reads are in the p99), then the reservation, a committed transaction;
- `explain`: `tm2 place --explain`: every backend's verdict with its reason.

    .venv/bin/python benchmarks/placement.py [--runs 200]
"""

from __future__ import annotations

import argparse
import random
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tm2fs import placement
from tm2fs.core import ROOT, Service
from tm2fs.store import ROOT_INO, PoolStore

G = 2**30
REQUIREMENTS = "TAGS @> SSD & FREE > 20G & COST < 8"


def specs(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        total = rng.choice([1, 2, 4, 8]) * 2**40
        out.append(dict(name=f"b{i}", state=rng.choices(["READY", "DISABLED"], [9, 1])[0],
                        tm="dir", tm_raw={}, total=total, free=rng.randrange(total // 10, total),
                        used=0, cost=rng.randrange(1, 11), role="SAN",
                        tags=[rng.choice(["SSD", "HDD7K"]), "ISCSI"], attrs={"RACK": f"r{i % 40}"}))
    return out


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def bench_decide(n: int, runs: int) -> tuple[float, float, float, float]:
    from tm2fs.store import Backend

    pool = []
    for i, s in enumerate(specs(n)):
        b = Backend(id=i + 1, capacity=None, overcommit=1.0, reserved=0.0, priority=0,
                    cluster="default", timeout=30.0, error=None, root_ino=0, created=0.0,
                    updated=0.0, monitored=None, **s)
        r = placement.room(b, allocated=0)
        pool.append((b, placement.attributes(b, r), r))
    req = placement.request(50 * G, requirements=REQUIREMENTS)
    times, explain = [], []
    for _ in range(runs):
        t = time.perf_counter()
        best = next(placement.ranked(req, pool))
        times.append(time.perf_counter() - t)
    for _ in range(max(10, runs // 10)):
        t = time.perf_counter()
        verdicts = placement.decide(req, pool)
        explain.append(time.perf_counter() - t)
    assert verdicts[0].backend is best.backend
    return (*percentiles(times), *percentiles(explain))


def bench_service(n: int, runs: int, tmp: str) -> tuple[float, float]:
    store = PoolStore(f"sqlite:///{tmp}/pool-{n}.db")
    with store.begin() as tx:
        for s in specs(n):
            bid = tx.insert_backend(root_ino=0, **s)
            root = tx.insert_node(parent=ROOT_INO, name=s["name"], backend_id=bid,
                                  mode=stat.S_IFDIR | 0o755, uid=0, gid=0)
            tx.update_backend(bid, root_ino=root)
    service = Service(store, Path(tmp) / "state", host="bench")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        _, chosen, _ = service.place(ROOT, 50 * G, requirements=REQUIREMENTS, reserve=True)
        times.append(time.perf_counter() - t)
    assert chosen is not None
    store.close()
    return percentiles(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(f"requirements: {REQUIREMENTS}; policy cost; {args.runs} runs each (explain: a tenth)")
    print(f"{'backends':>9} {'decide p50':>11} {'decide p99':>11} {'place p50':>10} {'place p99':>10} "
          f"{'explain p50':>12} {'explain p99':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (10, 1000, 10000):
            d50, d99, e50, e99 = bench_decide(n, args.runs)
            s50, s99 = bench_service(n, args.runs, tmp)
            print(f"{n:>9} {d50 * 1e3:>9.3f}ms {d99 * 1e3:>9.3f}ms {s50 * 1e3:>8.3f}ms "
                  f"{s99 * 1e3:>8.3f}ms {e50 * 1e3:>10.3f}ms {e99 * 1e3:>10.3f}ms")


if __name__ == "__main__":
    main()
