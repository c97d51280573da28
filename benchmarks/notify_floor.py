"""The floor under "every host hears every change" (issue #12): CPU per change heard, with bare
listeners that do nothing but receive and parse, against tm2fs daemons hearing the same changes.

Starts a throwaway PostgreSQL; N bare listener processes (psycopg LISTEN, json.loads of each
payload, nothing else); one sender that commits C transactions, each NOTIFYing a payload the size
of a placement's. CPU (user+system, /proc) of the listeners and of PostgreSQL is divided by C:
whatever a design does with a change, hearing it on N hosts costs at least this.

    .venv/bin/python benchmarks/notify_floor.py [--listeners 10,30,100] [--changes 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.scale import cpu_seconds, postgres_pids
from tests.servers.postgres import PostgresServer

CHANNEL = "tm2fs"
LISTENER = """
import json, sys, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
conn.execute("LISTEN tm2fs")
print("ready", flush=True)
start = time.process_time()
for note in conn.notifies():
    if json.loads(note.payload).get("end"):
        break
print(time.process_time() - start, flush=True)
sys.stdin.readline()  # stay connected until PostgreSQL's CPU is read
"""
# a placement's notification: the new entry, its parent folder and the image, as rows
PAYLOAD = json.dumps({"h": "hostA", "rn": [[12345, 3, "disk.0", 2, 33188, 0, 0, 1, 1, 1, None, 999, 7],
                                           [3, 2, "vm-42", 2, 16877, 0, 0, 1, 1, 1, None, None, 9]],
                      "dn": [], "ri": [[999, 2, "0123456789abcdef0123456789abcdef", 16777216, 1.0, 1]],
                      "di": [], "rb": [], "db": []}, separators=(",", ":"))


def run(pg: PostgresServer, url: str, listeners: int, changes: int) -> tuple[float, float, float]:
    dsn = url.replace("postgresql+psycopg", "postgresql")
    procs = [subprocess.Popen([sys.executable, "-c", LISTENER, dsn], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(listeners)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        pg_before = cpu_seconds(postgres_pids(pg))
        start = time.monotonic()
        with psycopg.connect(dsn) as sender:
            for _ in range(changes):
                with sender.transaction():
                    sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, PAYLOAD))
            with sender.transaction():
                sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, '{"end": true}'))
        heard = 0.0
        for p in procs:  # each listener's own CPU time between ready and the last change
            assert p.stdout is not None
            heard += float(p.stdout.readline())
        elapsed = time.monotonic() - start
        server = cpu_seconds(postgres_pids(pg)) - pg_before
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=60)
        return heard / changes * 1000, server / changes * 1000, elapsed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listeners", default="10,30,100")
    parser.add_argument("--changes", type=int, default=2000)
    args = parser.parse_args()
    print(f"payload {len(PAYLOAD)} bytes; {args.changes} changes; load {os.getloadavg()[0]:.1f}")
    print(f"{'listeners':>9} {'listeners ms/change':>20} {'PostgreSQL ms/change':>21} "
          f"{'per listener us':>16} {'changes/s':>10}")
    with PostgresServer({"max_connections": "400"}) as pg:
        url = pg.new_database("floor")
        for n in (int(x) for x in args.listeners.split(",")):
            heard, server, elapsed = run(pg, url, n, args.changes)
            print(f"{n:>9} {heard:>20.2f} {server:>21.2f} {heard / n * 1000:>16.0f} "
                  f"{args.changes / elapsed:>10.0f}")


if __name__ == "__main__":
    main()
