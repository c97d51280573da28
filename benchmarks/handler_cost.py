"""The trio loop's own time per FUSE request: tm2fs's read, write and getattr handlers called
directly, without the kernel, on a `dir` backend in a temporary directory.

A mounted benchmark (benchmarks/pyfuse3_ceiling.py) cannot resolve a fraction of a microsecond on
a shared machine, whose load moves its figures by tens of percent from run to run; this can.
Compare two trees (e.g. before and after a change on the hot path) by running each in turn a few
times: the minimum of each is the figure to compare.

    .venv/bin/python benchmarks/handler_cost.py [--calls 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tm2fs import fs
from tm2fs.core import Service
from tm2fs.model import Caller
from tm2fs.store import PoolStore, sqlite_url


async def measure(calls: int, repeat: int) -> dict[str, float]:
    """Nanoseconds per call, the best of `repeat` runs of `calls` calls each."""
    with tempfile.TemporaryDirectory() as tmp:
        store = PoolStore(sqlite_url(str(Path(tmp) / "pool.db")))
        svc = Service(store, Path(tmp), host="bench")
        await svc.start()
        try:
            await svc.ensure_default_backend()
            await svc.monitor_all()
            ops = fs.Operations(svc)
            root = Caller(0, 0, origin="fs")
            attr = await svc.create(svc.find_backend("local").root_ino, "x.img", 0o644, root)
            await svc.setattr(attr.ino, root, size=2**20)
            fh = (await ops.open(attr.ino, os.O_RDWR, None)).fh  # type: ignore[arg-type]
            block = b"x" * 4096
            handlers: dict[str, Callable[[], Awaitable[Any]]] = {
                "read": lambda: ops.read(fh, 4096, 4096),
                "write": lambda: ops.write(fh, 4096, block),
                "getattr": lambda: ops.getattr(attr.ino, None),
            }
            best: dict[str, float] = {}
            for name, call in handlers.items():
                for _ in range(repeat):
                    start = time.perf_counter_ns()
                    for _ in range(calls):
                        await call()
                    per = (time.perf_counter_ns() - start) / calls
                    best[name] = min(best.get(name, per), per)
            await ops.release(fh)
            return best
        finally:
            await svc.stop()
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    best = trio.run(measure, args.calls, args.repeat)
    print("loop time per call, best of", args.repeat, "runs:",
          ", ".join(f"{name} {ns / 1000:.2f} µs" for name, ns in best.items()),
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
