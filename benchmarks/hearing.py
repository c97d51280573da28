"""What hearing another host's change costs a daemon (issue #12): three real daemons on one
throwaway PostgreSQL; A creates and deletes images through its API, B and C only listen. CPU
(user+system, /proc) of each daemon over the run, per change.

    .venv/bin/python benchmarks/hearing.py [--changes 600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.scale import cpu_seconds
from tests.daemon import Daemon
from tests.servers.postgres import PostgresServer
from tm2fs.client import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=600, help="creates + deletes made on A")
    n = parser.parse_args().changes // 2
    with PostgresServer() as pg, tempfile.TemporaryDirectory(prefix="tm2fs-hearing-") as top:
        url = pg.new_database("hearing")
        root = Path(top)
        daemons = []
        try:
            for host in ("A", "B", "C"):
                (root / host).mkdir()
                daemons.append(Daemon(root / host, db_url=url, host=host,
                                      extra=("--monitor-interval", "30")).start())
            client = Client(str(daemons[0].sock))
            time.sleep(2)  # start-up work done
            before = [cpu_seconds([d.proc.pid]) for d in daemons if d.proc]
            start = time.monotonic()
            for i in range(n):
                client.call("POST", "/v1/images/allocate",
                            {"address": f"local:img{i}", "size": 2**20})
            for i in range(n):
                client.call("POST", "/v1/images/delete", {"address": f"local:img{i}"})
            elapsed = time.monotonic() - start
            time.sleep(1.5)  # the last notifications heard
            after = [cpu_seconds([d.proc.pid]) for d in daemons if d.proc]
        finally:
            for d in daemons:
                d.stop()
    per = [1000 * (a - b) / (2 * n) for a, b in zip(after, before, strict=True)]
    print(f"{2 * n} changes in {elapsed:.1f} s; CPU per change: A (makes them) {per[0]:.2f} ms, "
          f"B (hears) {per[1]:.2f} ms, C (hears) {per[2]:.2f} ms")


if __name__ == "__main__":
    main()
