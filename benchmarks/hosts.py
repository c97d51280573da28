"""Many hosts on one PostgreSQL pool store: propagation delay between mounts, and pool-store
operations per second with 1, 2 and 3 daemons.

Starts a throwaway PostgreSQL and real daemons (one machine, each daemon its own host, mountpoint
and socket), as the tests do.
- propagation: a file created (then removed) through host A's mount, timed until host B's mount
  shows it (B had just looked the name up, so its kernel cached "no such file": the delay is
  the notification's, not a cache expiry's);
- throughput: 4 API clients per daemon, each allocating and deleting 1 MiB images in one backend
  for a few seconds; operations (an allocate or a delete) per second over all daemons.

    .venv/bin/python benchmarks/hosts.py [--rounds 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon
from tests.servers.postgres import PostgresServer
from tm2fs.client import Client


def propagation(a: Daemon, b: Daemon, rounds: int) -> list[float]:
    delays = []
    for i in range(rounds):
        name = f"p{i}.img"
        seen = b.mnt / "local" / name
        assert not os.path.lexists(seen)
        (a.mnt / "local" / name).write_bytes(b"x")
        start = time.perf_counter()
        while not os.path.lexists(seen):
            time.sleep(0.0002)
        delays.append(time.perf_counter() - start)
        os.unlink(a.mnt / "local" / name)
        while os.path.lexists(seen):
            time.sleep(0.0002)
    return delays


def throughput(daemons: list[Daemon], seconds: float) -> float:
    done = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(d: Daemon, n: int) -> None:
        c = Client(str(d.sock))
        ops = 0
        i = 0
        while time.monotonic() < stop:
            address = f"local:t-{d.host}-{n}-{i}"
            c.call("POST", "/v1/images/allocate", {"address": address, "size": 2**20})
            c.call("POST", "/v1/images/delete", {"address": address})
            ops += 2
            i += 1
        c.close()
        with lock:
            done[0] += ops

    threads = [threading.Thread(target=client, args=(d, n)) for d in daemons for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / seconds


def p99(samples: list[float]) -> float:
    samples = sorted(samples)
    return samples[max(0, int(len(samples) * 0.99) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with PostgresServer() as pg, tempfile.TemporaryDirectory() as tmp:
        url = pg.new_database("bench")
        daemons: list[Daemon] = []
        try:
            for name in ("hostA", "hostB", "hostC"):
                (Path(tmp) / name).mkdir()
                daemons.append(Daemon(Path(tmp) / name, db_url=url, host=name).start())
            delays = propagation(daemons[0], daemons[1], args.rounds)
            print(f"propagation A -> B over {args.rounds} creates: "
                  f"p50 {statistics.median(delays) * 1e3:.1f} ms, p99 {p99(delays) * 1e3:.1f} ms, "
                  f"max {max(delays) * 1e3:.1f} ms")
            print("pool-store operations/s (allocate or delete through the API, 4 clients each):")
            for k in (1, 2, 3):
                print(f"  {k} daemon(s): {throughput(daemons[:k], args.seconds):,.0f} ops/s")
        finally:
            for d in daemons:
                d.stop()


if __name__ == "__main__":
    main()
