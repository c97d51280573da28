"""One RBD image three ways, in the same run on the same cluster: through the tm2fs mount, with
librbd directly from Python, and through Debian's `rbd-fuse`.

Starts a throwaway one-node Ceph cluster (tests/servers/ceph.py: bluestore on a sparse file) and a
tm2fs daemon with an `rbd` backend on its pool; rbd-fuse mounts the same pool, so the very image
tm2fs made (named by its key) is read and written three ways. Jobs: sequential 4 MiB write and
read, 4 KiB random read at queue depth 1 and 32. The two FUSE mounts run fio with O_DIRECT and
libaio; librbd runs the same pattern with its asynchronous calls and a window of QD requests.
Median of `--rounds` runs (3); ratios are against direct librbd. `--jobs` picks rows by label
(e.g. `--jobs QD1`); without the write row, the image is filled first so reads reach the OSD.

`--floor` adds two bare pyfuse3 loops (bare_fs.OneFile, no tm2fs code but one function) serving
the same image: "bare driver", whose read is librbd's aio_read woken the way the rbd driver wakes
it (`tm2fs.drivers.rbd.handle.wait_aio`: the completion hands its outcome to the loop through the
TrioToken); and "bare sync", whose read calls librbd's blocking read right on the loop (no
wake-up at all; forbidden in tm2fs, as it stalls every other request: the floor of any driver on
one pyfuse3 + trio loop).

    .venv/bin/python benchmarks/ceph_rbd.py [--jobs QD1] [--rounds 3] [--runtime 8] [--floor]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon, unmount
from tests.servers.ceph import CephCluster

SIZE = 256 * 2**20
RUNTIME = 8  # seconds for the random-read jobs
FLOORS = ("driver", "sync")  # the bare loops of --floor
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
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise RuntimeError(f"fio on {path} failed: {run.stderr or run.stdout}")
    out = json.loads(run.stdout)
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


def serve(mnt: str, conf: str, pool: str, name: str, mode: str) -> None:
    """A bare pyfuse3 loop with one file, `f`: the RBD image, read as `mode` says (see above)."""
    import bare_fs  # this folder
    import pyfuse3
    import rados
    import rbd

    from tm2fs.drivers.rbd.handle import wait_aio

    cluster = rados.Rados(conffile=conf)
    cluster.connect()
    image = rbd.Image(cluster.open_ioctx(pool), name)

    class Ops(bare_fs.OneFile):
        async def read(self, fh: int, off: int, length: int) -> bytes:
            if mode == "sync":
                return image.read(off, length)
            return await wait_aio(lambda cb: image.aio_read(off, length, cb), "read")

    bare_fs.serve(Ops(image.size()), mnt, set(pyfuse3.default_options))


def main() -> None:
    global RUNTIME
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", nargs="*", default=[], help="run only rows whose label contains one of these")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=RUNTIME, help="seconds per random-read run")
    ap.add_argument("--floor", action="store_true", help="add the bare pyfuse3 loops (reads only)")
    args = ap.parse_args()
    import bare_fs  # this folder

    RUNTIME = args.runtime
    jobs = [j for j in JOBS if not args.jobs or any(w in j[0] for w in args.jobs)]
    with CephCluster(osd_bytes=8 * 2**30) as ceph, tempfile.TemporaryDirectory() as tmp, \
            Daemon(Path(tmp)) as d, ExitStack() as bare:
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
            for mode in FLOORS if args.floor else ():
                mnt = Path(tmp) / f"bare-{mode}"
                mnt.mkdir()
                bare.enter_context(bare_fs.mounted(mnt, [__file__, "--serve", str(mnt), ceph.conf_path,
                                                         ceph.pool, key, mode]))
                ways[f"bare {mode}"] = lambda rw, bs, qd, f=mnt / "f": fio(f, rw, bs, qd)
            if jobs[0][1] != "write":  # unwritten objects are answered without the OSD
                fio(d.mnt / "ceph" / "bench.img", "write", 4 * 2**20, 1)
            floor = "".join(f"{'bare ' + m:>13}" for m in FLOORS) if args.floor else ""
            print(f"{'job':<20} {'librbd (Python)':>16} {'tm2fs mount':>12} {'rbd-fuse':>10} "
                  f"{'tm2fs/librbd':>13} {'tm2fs/rbd-fuse':>15}{floor}")
            for label, rw, bs, qd in jobs:
                runs: dict[str, list[float]] = {}
                for _ in range(args.rounds):  # interleaved: the machine's load drifts
                    for w, f in ways.items():
                        if not (w.startswith("bare") and rw == "write"):  # they only read
                            runs.setdefault(w, []).append(f(rw, bs, qd))
                results = {w: statistics.median(v) for w, v in runs.items()}
                unit = "IOPS" if rw == "randread" else "MiB/s"
                bares = "".join(f"{results['bare ' + m]:>13,.0f}" if "bare " + m in results
                                else f"{'-':>13}" for m in FLOORS if args.floor)
                print(f"{label:<20} {results['librbd']:>10,.0f} {unit:<5} {results['tm2fs']:>6,.0f} "
                      f"{unit:<5}{results['rbd-fuse']:>5,.0f} {unit:<5} "
                      f"{results['tm2fs'] / results['librbd']:>8.2f} "
                      f"{results['tm2fs'] / results['rbd-fuse']:>15.2f}{bares}")
        finally:
            unmount(fuse)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(*sys.argv[2:7])
    else:
        main()
