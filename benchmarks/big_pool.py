"""What a large pool costs a daemon: start-up time and memory for N images held in memory (the
namespace view every host keeps), and listing a folder of them.

The pool store (SQLite, or a throwaway PostgreSQL with --postgres) is seeded directly with N
images in folders of --folder, then a Service starts on it in this process, as the daemon does:
it reads every entry, image and backend once. With --mount, a real daemon then starts on the same
store: its time to READY (mounted), its RSS, and `ls -l` of one folder through the mount.

    .venv/bin/python benchmarks/big_pool.py [--images 100000] [--folder 1000] [--postgres] [--mount]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import stat
import subprocess
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


def seed(url: str, images: int, per_folder: int) -> None:
    store = PoolStore(url)
    with store.begin() as tx:
        root = tx.backend_by_name("local")
        assert root is not None
        for d in range(max(1, images // per_folder)):
            folder = tx.insert_node(parent=root.root_ino, name=f"vm-{d}", backend_id=root.id,
                                    mode=stat.S_IFDIR | 0o755, uid=0, gid=0)
            for i in range(min(per_folder, images - d * per_folder)):
                image_id = tx.insert_image(root.id, uuid.uuid4().hex, 10 * 2**30)
                tx.insert_node(parent=folder, name=f"disk.{i}", backend_id=root.id,
                               mode=stat.S_IFREG | 0o600, uid=0, gid=0, image_id=image_id)
    store.close()


async def in_process(url: str, tmp: Path, images: int, per_folder: int) -> None:
    first = await Service(PoolStore(url), tmp / "state", host="bench").start()
    await first.ensure_default_backend()
    await first.stop(clean=False)
    t = time.perf_counter()
    seed(url, images, per_folder)
    print(f"seeded {images:,} images in folders of {per_folder:,} in {time.perf_counter() - t:.0f} s")
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
          f"{listing * 1e3:.1f} ms (in process)")


def mounted(url: str, tmp: Path, images: int) -> None:
    """A real daemon on the seeded store: READY time, RSS, `ls -l` of a folder (cold, warm)."""
    from tests.daemon import Daemon

    d = Daemon(tmp / "daemon", db_url=url, extra=("--no-default-backend",))
    (tmp / "daemon").mkdir()
    t = time.perf_counter()
    d.start(timeout=300)
    ready = time.perf_counter() - t
    rss = int(Path(f"/proc/{d.proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    try:
        times = []
        for i in range(4):
            if i == 2:
                time.sleep(5)  # st_blocks figures measured after the first listing (allocation.py)
            t = time.perf_counter()
            out = subprocess.run(["ls", "-l", str(d.mnt / "local" / "vm-0")], capture_output=True,
                                 check=True)
            times.append(time.perf_counter() - t)
        lines = out.stdout.count(b"\n") - 1
    finally:
        d.stop()
    print(f"daemon on {images:,} images: READY (mounted) in {ready:.1f} s, RSS {rss:.0f} MiB; "
          f"ls -l of a folder of {lines:,}: {times[0] * 1e3:.0f} ms cold, then "
          f"{', '.join(f'{t * 1e3:.0f}' for t in times[1:])} ms")


def main(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tm2fs-bigpool-",
                                                                  dir="/var/tmp")))
        if args.postgres:
            from tests.servers.postgres import PostgresServer

            url = stack.enter_context(PostgresServer()).new_database("bigpool")
        else:
            url = f"sqlite:///{tmp}/pool.db"
        trio.run(in_process, url, tmp, args.images, args.folder)
        if args.mount:
            mounted(url, tmp, args.images)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--folder", type=int, default=FOLDER, help="images per folder")
    p.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL, not SQLite")
    p.add_argument("--mount", action="store_true", help="also start a real daemon and ls -l")
    main(p.parse_args())
