"""What a large pool costs a daemon: start-up time and memory for N images held in memory (the
namespace view every host keeps), and listing a folder of them.

The pool store (SQLite) is seeded directly with N images in folders of 1,000, then a Service
starts on it in this process, as the daemon does: it reads every entry, image and backend once.

    .venv/bin/python benchmarks/big_pool.py [--images 100000]
"""

from __future__ import annotations

import argparse
import resource
import stat
import sys
import tempfile
import time
import uuid
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tm2fs.core import Service
from tm2fs.store import PoolStore

FOLDER = 1000


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed(url: str, images: int) -> None:
    store = PoolStore(url)
    with store.begin() as tx:
        root = tx.backend_by_name("local")
        assert root is not None
        for d in range(max(1, images // FOLDER)):
            folder = tx.insert_node(parent=root.root_ino, name=f"vm-{d}", backend_id=root.id,
                                    mode=stat.S_IFDIR | 0o755, uid=0, gid=0)
            for i in range(min(FOLDER, images - d * FOLDER)):
                image_id = tx.insert_image(root.id, uuid.uuid4().hex, 10 * 2**30)
                tx.insert_node(parent=folder, name=f"disk.{i}", backend_id=root.id,
                               mode=stat.S_IFREG | 0o600, uid=0, gid=0, image_id=image_id)
    store.close()


async def main(images: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tm2fs-bigpool-", dir="/var/tmp"))
    url = f"sqlite:///{tmp}/pool.db"
    first = await Service(PoolStore(url), tmp / "state", host="bench").start()
    await first.ensure_default_backend()
    await first.stop(clean=False)
    seed(url, images)
    before = rss_mib()
    t = time.perf_counter()
    service = await Service(PoolStore(url), tmp / "state", host="bench").start()
    started = time.perf_counter() - t
    grown = rss_mib() - before
    folder = service.lookup(service.find_backend("local").root_ino, "vm-0")
    t = time.perf_counter()
    listed, after = 0, 0
    while entries := service.readdir(folder.ino, after, 500):
        listed += len(entries)
        after = entries[-1][1].ino
    listing = time.perf_counter() - t
    await service.stop(clean=False)
    print(f"{images:,} images: start-up {started:.2f} s, memory +{grown:.0f} MiB "
          f"({grown * 2**20 / images:.0f} bytes per image), listing a folder of {listed:,} "
          f"{listing * 1e3:.1f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100_000)
    trio.run(main, p.parse_args().images)
