"""PostgreSQL work per placement: transactions and statements one daemon makes per `auto:` allocate.

A throwaway PostgreSQL (with pg_stat_statements preloaded), one real daemon on it, a few dir
backends with CAPACITY limits, then K sequential allocations of new 1 GiB images to `auto:`
through the control API, as `tm2 allocate auto:...` sends them (one call each). Counted on the
server, never in the daemon: transactions from pg_stat_database (xact_commit + xact_rollback of
the pool's database), statements from pg_stat_statements (BEGIN/COMMIT/ROLLBACK counted apart).
The measuring session uses another database, so it is not counted.

Two series: `auto:img-N` (a flat name) and `auto:vm-N/disk.0` (a new folder made as mkdir -p, as
a new VM's first disk). The background (heartbeat every 2 s, monitor) is measured over an idle
interval as long as both series in the same run, and subtracted at its rate. Each window ends
with an 11 s wait: a backend flushes its transaction counts at most once a second, and an idle
one within 10 s (PGSTAT_IDLE_INTERVAL).

    .venv/bin/python benchmarks/placement_tx.py [--count 200] [--backends 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon
from tests.servers.postgres import PostgresServer
from tm2fs.client import Client

SETTLE = 11.0  # > PGSTAT_IDLE_INTERVAL (10 s): pending transaction counts are flushed by then
IMAGE = "1G"
CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "START TRANSACTION", "END")


@dataclass
class Counts:
    at: float
    xacts: int
    calls: Counter[str] = field(default_factory=Counter)  # normalized statement -> calls

    def __sub__(self, other: Counts) -> Counts:
        calls = Counter(self.calls)
        calls.subtract(other.calls)
        return Counts(self.at - other.at, self.xacts - other.xacts, calls)

    def minus_rate(self, idle: Counts) -> Counts:
        """This window's counts less the idle background over the same length of time."""
        k = self.at / idle.at
        calls = Counter({q: n - idle.calls[q] * k for q, n in self.calls.items()})
        return Counts(self.at, self.xacts - idle.xacts * k, calls)

    def statements(self) -> tuple[float, float]:
        control = sum(n for q, n in self.calls.items() if q.upper().startswith(CONTROL))
        return sum(self.calls.values()) - control, control

    def blocks(self) -> float:
        """Transactions ended by COMMIT or ROLLBACK. The others are statements run outside any
        BEGIN, each a transaction of its own; an empty query (`;`, SQLAlchemy's pool_pre_ping
        on psycopg at every connection checkout) is one, and pg_stat_statements does not list it."""
        return sum(n for q, n in self.calls.items() if q.upper() in ("COMMIT", "ROLLBACK"))


def counts(conn: psycopg.Connection, db: str) -> Counts:
    xacts = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                         "WHERE datname = %s", (db,)).fetchone()[0]
    rows = conn.execute("SELECT s.query, s.calls FROM pg_stat_statements s "
                        "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s", (db,))
    calls: Counter[str] = Counter()
    for query, n in rows:
        calls[" ".join(query.split())] += n
    return Counts(time.monotonic(), xacts, calls)


def place(client: Client, addresses: list[str]) -> list[float]:
    times = []
    for address in addresses:
        t = time.perf_counter()
        client.call("POST", "/v1/images/allocate", {"address": address, "size": IMAGE})
        times.append(time.perf_counter() - t)
    return times


def report(name: str, window: Counts, times: list[float], top: int) -> tuple[float, float, float]:
    k = len(times)
    statements, control = window.statements()
    ordered = sorted(times)
    rate = k / sum(times)
    print(f"\n{name}: {k} placements, {rate:.1f} placements/s, "
          f"p50 {statistics.median(ordered) * 1e3:.1f} ms, "
          f"p99 {ordered[max(0, int(k * 0.99) - 1)] * 1e3:.1f} ms")
    print(f"  per placement: {window.xacts / k:.1f} transactions, {statements / k:.1f} statements "
          f"(+ {control / k:.1f} BEGIN/COMMIT/ROLLBACK)")
    blocks = window.blocks() / k
    print(f"  transactions: {blocks:.1f} BEGIN..COMMIT/ROLLBACK blocks, "
          f"{window.xacts / k - blocks:.1f} outside a block (autocommit; an empty `;` query, "
          "SQLAlchemy's pool_pre_ping, is one)")
    print("  most frequent statements per placement:")
    for query, n in sorted(window.calls.items(), key=lambda qn: -qn[1])[:top]:
        if n / k >= 0.05:
            print(f"  {n / k:6.2f}  {query[:150]}")
    return window.xacts / k, statements / k, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="placements per series")
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--top", type=int, default=12, help="statements listed per series")
    args = parser.parse_args()
    k = args.count
    settings = {"shared_preload_libraries": "pg_stat_statements",
                "pg_stat_statements.track_utility": "on"}
    with PostgresServer(settings) as pg, tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        db = "tm2fs"
        stats = psycopg.connect(f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres",
                                autocommit=True)
        stats.execute("CREATE EXTENSION pg_stat_statements")
        with Daemon(Path(tmp), db_url=pg.url, extra=("--monitor-interval", "30",
                                                     "--no-default-backend")) as d:
            client = Client(str(d.sock))
            capacity = (2 * k + 10) // args.backends + 8  # GiB: the cheapest ones fill up
            for i in range(args.backends):
                client.call("POST", "/v1/backends", {"NAME": f"b{i}", "TM": "dir", "COST": i + 1,
                                                     "CAPACITY": f"{capacity}G"})
            print(f"PostgreSQL {stats.info.server_version // 10000}, one daemon (monitor every "
                  f"30 s, heartbeat every 2 s), {args.backends} dir backends of CAPACITY "
                  f"{capacity}G and COST 1..{args.backends}; {IMAGE} images, policy cost, "
                  "one client in sequence")
            place(client, [f"auto:warm-{i}" for i in range(5)])
            time.sleep(SETTLE)
            c0 = counts(stats, db)
            flat = place(client, [f"auto:img-{i}" for i in range(k)])
            time.sleep(SETTLE)
            c1 = counts(stats, db)
            folder = place(client, [f"auto:vm-{i}/disk.0" for i in range(k)])
            time.sleep(SETTLE)
            c2 = counts(stats, db)
            time.sleep(c2.at - c0.at)
            c3 = counts(stats, db)
            client.close()
            placed = len(client_images(d))
        stats.close()
    idle = c3 - c2
    print(f"idle background over {idle.at:.0f} s: {idle.xacts / idle.at:.2f} transactions/s, "
          f"{idle.statements()[0] / idle.at:.2f} statements/s (subtracted at that rate)")
    assert placed == 2 * k + 5, f"{placed} images, expected {2 * k + 5}"
    t, s, p = report("auto:img-N", (c1 - c0).minus_rate(idle), flat, args.top)
    report("auto:vm-N/disk.0 (new folder)", (c2 - c1).minus_rate(idle), folder, args.top)
    print(f"\nplacement: {t:.1f} transactions, {s:.1f} statements per placement, "
          f"{p:.1f} placements/s")


def client_images(d: Daemon) -> list[str]:
    """Every image file on the mount (a check that all placements landed)."""
    return [str(p) for p in d.mnt.rglob("*") if p.is_file()]


if __name__ == "__main__":
    main()
