"""One RBD image three ways, in the same run on the same cluster: through the tm2fs mount, with
librbd directly from Python, and through Debian's `rbd-fuse`.

Starts a throwaway one-node Ceph cluster (tests/servers/ceph.py: bluestore on a sparse file) and a
tm2fs daemon with an `rbd` backend on its pool; rbd-fuse mounts the same pool, so the very image
tm2fs made (named by its key) is read and written three ways. Jobs: sequential 4 MiB write and
read, 4 KiB random read at queue depth 1 and 32. The two FUSE mounts run fio with O_DIRECT and
libaio; librbd runs the same pattern with its asynchronous calls and a window of QD requests.
Median of 3 runs; ratios are against direct librbd.

    .venv/bin/python benchmarks/ceph_rbd.py
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon, unmount
from tests.servers.ceph import CephCluster

SIZE = 256 * 2**20
RUNTIME = 8  # seconds for the random-read jobs
JOBS = [  # label, fio rw, block size, queue depth
    ("seq write 4M", "write", 4 * 2**20, 1),
    ("seq read 4M", "read", 4 * 2**20, 1),
    ("rand read 4K QD1", "randread", 4096, 1),
    ("rand read 4K QD32", "randread", 4096, 32),
]


def fio(path: Path, rw: str, bs: int, depth: int) -> float:
    """MiB/s (sequential) or IOPS (random) of one fio job on a file."""
    args = ["fio", "--name=j", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
            "--ioengine=libaio", "--direct=1", f"--size={SIZE}", "--output-format=json"]
    if rw == "randread":
        args += ["--time_based", f"--runtime={RUNTIME}"]
    out = json.loads(subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout)
    job = out["jobs"][0]["read" if "read" in rw else "write"]
    return job["iops"] if rw == "randread" else job["bw_bytes"] / 2**20


def librbd(conf: str, pool: str, name: str, rw: str, bs: int, depth: int) -> float:
    """The same job with librbd's aio calls from Python, `depth` requests in flight."""
    import rados
    import rbd

    with rados.Rados(conffile=conf) as cluster, cluster.open_ioctx(pool) as ioctx, \
            rbd.Image(ioctx, name) as image:
        window = threading.Semaphore(depth)
        rng = random.Random(1)
        data = random.randbytes(bs)
        blocks = SIZE // bs
        errors: list[int] = []

        def done(completion: object, *rest: object) -> None:
            rv = completion.get_return_value()  # type: ignore[attr-defined]
            if rv < 0:
                errors.append(rv)
            window.release()

        count, offset = 0, 0
        start = time.perf_counter()
        deadline = start + (RUNTIME if rw == "randread" else 1e9)
        while (rw != "randread" and offset < SIZE) or (rw == "randread" and time.perf_counter() < deadline):
            window.acquire()
            if rw == "write":
                image.aio_write(data, offset, done)
            elif rw == "read":
                image.aio_read(offset, bs, done)
            else:
                image.aio_read(rng.randrange(blocks) * bs, bs, done)
            offset += bs
            count += 1
        for _ in range(depth):
            window.acquire()
        if rw == "write":
            image.flush()
        seconds = time.perf_counter() - start
        assert not errors, errors
    return count / seconds if rw == "randread" else count * bs / 2**20 / seconds


def main() -> None:
    with CephCluster(osd_bytes=8 * 2**30) as ceph, tempfile.TemporaryDirectory() as tmp, \
            Daemon(Path(tmp)) as d:
        tpl = Path(tmp) / "ceph.tpl"
        tpl.write_text(f'NAME = ceph\nTM = rbd\nTIMEOUT = 60\nTM_RAW = [ CEPH_CONF = "{ceph.conf_path}", '
                       f'POOL = "{ceph.pool}" ]\n')
        assert d.backend_cli("create", str(tpl)).returncode == 0
        assert d.tm2("allocate", "ceph:bench.img", str(SIZE)).returncode == 0
        key = json.loads(d.tm2("info", "ceph:bench.img", "--json").stdout)["KEY"]
        fuse = Path(tmp) / "rbd-fuse"
        fuse.mkdir()
        subprocess.run(["rbd-fuse", "-c", ceph.conf_path, "-p", ceph.pool, str(fuse)], check=True)
        try:
            ways = {
                "librbd": lambda rw, bs, qd: librbd(ceph.conf_path, ceph.pool, key, rw, bs, qd),
                "tm2fs": lambda rw, bs, qd: fio(d.mnt / "ceph" / "bench.img", rw, bs, qd),
                "rbd-fuse": lambda rw, bs, qd: fio(fuse / key, rw, bs, qd),
            }
            print(f"{'job':<20} {'librbd (Python)':>16} {'tm2fs mount':>12} {'rbd-fuse':>10} "
                  f"{'tm2fs/librbd':>13} {'tm2fs/rbd-fuse':>15}")
            for label, rw, bs, qd in JOBS:
                results = {w: statistics.median(f(rw, bs, qd) for _ in range(3)) for w, f in ways.items()}
                unit = "IOPS" if rw == "randread" else "MiB/s"
                print(f"{label:<20} {results['librbd']:>10,.0f} {unit:<5} {results['tm2fs']:>6,.0f} "
                      f"{unit:<5}{results['rbd-fuse']:>5,.0f} {unit:<5} "
                      f"{results['tm2fs'] / results['librbd']:>8.2f} "
                      f"{results['tm2fs'] / results['rbd-fuse']:>15.2f}")
        finally:
            unmount(fuse)


if __name__ == "__main__":
    main()
