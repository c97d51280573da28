"""An iSCSI LUN read through the tm2fs mount vs. read directly over iSCSI, in the same run.

Starts tgtd (userspace target) and a tm2fs daemon with an `iscsi` backend, fills a 256 MiB image,
then runs the same `qemu-img bench` jobs on `iscsi://PORTAL/IQN/1` (qemu's own libiscsi client,
no FUSE, no daemon), on the image file through the tm2fs mount, and on the floor: a bare pyfuse3
loop with one file whose reads go straight to tm2fs's libiscsi pipeline (no core, no rules: what
any pyfuse3 + trio filesystem pays for FUSE and iSCSI on this machine); and the same pattern on
that pipeline from a trio loop of its own, without FUSE ("pipeline alone"). Jobs:
sequential 1 MiB reads, and 4 KiB reads at a 68 KiB stride (qemu-img bench has no random
pattern; the stride defeats read-ahead) at queue depth 1 and 32; through FUSE with O_DIRECT
(`-t none -i native`), so each request is one round trip to the daemon. Median of `--rounds`,
interleaved; prints MiB/s or IOPS and the ratios. Never pass/fail.

    .venv/bin/python benchmarks/iscsi.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon
from tests.servers.tgt import TgtServer
from tm2fs import fuseconn

SIZE = 256 * 2**20
PREFIX = "iqn.2026-11.org.tm2fs.bench"
SIZES = {"1M": 2**20, "68K": 68 * 1024, "4K": 4096}
JOBS = [  # label, buffer, step, count, depth, unit
    ("seq read 1M QD1", "1M", "1M", 256, 1, "MiB/s"),
    ("seq read 1M QD32", "1M", "1M", 256, 32, "MiB/s"),
    ("read 4K stride QD1", "4K", "68K", 3000, 1, "IOPS"),
    ("read 4K stride QD32", "4K", "68K", 3000, 32, "IOPS"),
]


def serve_floor(mnt: str, portal: str, target: str) -> None:
    """The floor: one file `f` whose reads are READ(16)s on a `Pipeline`, on pyfuse3's loop."""
    import bare_fs  # this folder
    import pyfuse3
    import trio

    from tm2fs.drivers.iscsi.libiscsi import Session, SessionCount
    from tm2fs.drivers.iscsi.pipeline import Pipeline
    from tm2fs.drivers.iscsi.settings import BLOCK

    pipes: list[Pipeline] = []

    class Ops(bare_fs.OneFile):
        async def open(self, ino, flags, ctx):
            if not pipes:
                session = await trio.to_thread.run_sync(
                    Session, portal, target, f"{PREFIX}:floor", 30, SessionCount())
                pipes.append(Pipeline(session))
                await pipes[0].read_capacity()
            return pyfuse3.FileInfo(fh=ino)

        async def read(self, fh, off, size):
            size = max(0, min(size, SIZE - off))
            first = off - off % BLOCK
            data = await pipes[0].read(first // BLOCK, -(-(off + size - first) // BLOCK) * BLOCK)
            return data[off - first:off - first + size]

    bare_fs.serve(Ops(SIZE), mnt, set(pyfuse3.default_options))


def pipeline_alone(portal: str, target: str, buffer: str, step: str, count: int, depth: int) -> float:
    """Seconds for the same job on tm2fs's libiscsi pipeline from a trio loop of its own, `depth`
    reads in flight: the initiator's speed without FUSE."""
    import trio

    from tm2fs.drivers.iscsi.libiscsi import Session, SessionCount
    from tm2fs.drivers.iscsi.pipeline import Pipeline
    from tm2fs.drivers.iscsi.settings import BLOCK

    size, stride = (SIZES[buffer], SIZES[step])

    async def run() -> float:
        session = await trio.to_thread.run_sync(Session, portal, target, f"{PREFIX}:alone", 30,
                                                SessionCount())
        pipe = Pipeline(session)
        await pipe.read_capacity()
        todo = iter(range(count))

        async def worker() -> None:
            for i in todo:
                await pipe.read(i * stride % (SIZE - size) // BLOCK, size)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(depth):
                nursery.start_soon(worker)
        took = time.perf_counter() - start
        await pipe.aclose(trio.CapacityLimiter(1))
        return took

    return trio.run(run)


def bench(target: str, buffer: str, step: str, count: int, depth: int, direct: bool) -> float:
    """Seconds for the job (qemu-img bench prints 'Run completed in N seconds.')."""
    cmd = ["qemu-img", "bench", "-f", "raw", "-s", buffer, "-S", step, "-c", str(count),
           "-d", str(depth)]
    if direct:
        cmd += ["-t", "none", "-i", "native"]
    out = subprocess.run([*cmd, target], capture_output=True, text=True, check=True, timeout=600)
    return float(re.search(r"completed in ([\d.]+) seconds", out.stdout).group(1))


def rate(seconds: float, buffer: str, count: int, unit: str) -> float:
    return count * SIZES[buffer] / 2**20 / seconds if unit == "MiB/s" else count / seconds


def main() -> None:
    import bare_fs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="print the README's table too")
    args = parser.parse_args()
    rows: list[str] = []
    with TgtServer() as tgt, tempfile.TemporaryDirectory() as tmp, Daemon(Path(tmp)) as d:
        tpl = Path(tmp) / "san.tpl"
        tpl.write_text(f'NAME = san\nTM = iscsi\nTIMEOUT = 30\nTM_RAW = [ PORTAL = "{tgt.portal}", '
                       f'STORE = "{tmp}/luns", TGT_CONTROL = "{tgt.control}", '
                       f'IQN_PREFIX = "{PREFIX}" ]\n')
        assert d.backend_cli("create", str(tpl)).returncode == 0
        image = d.mnt / "san" / "bench.img"
        subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M", f"count={SIZE >> 20}",
                        "status=none"], check=True)
        key = json.loads(d.tm2("info", "san:bench.img", "--json").stdout)["KEY"]
        iqn = f"{PREFIX}:{key}"
        floor_mnt = Path(tmp) / "floor"
        floor_mnt.mkdir()
        with bare_fs.mounted(floor_mnt, [__file__, "--serve-floor", str(floor_mnt), tgt.portal, iqn]):
            fuseconn.widen(floor_mnt)  # the same request queue as the daemon's mount
            sides = {"iscsi:// direct": (f"iscsi://{tgt.portal}/{iqn}/1", False),
                     "pipeline alone": None,
                     "floor": (str(floor_mnt / "f"), True), "tm2fs": (str(image), True)}
            print(f"{'job':<20} " + " ".join(f"{s:>16}" for s in sides)
                  + f" {'tm2fs/direct':>13} {'floor/direct':>13} {'tm2fs/floor':>12}")
            for label, buffer, step, count, depth, unit in JOBS:
                got: dict[str, list[float]] = {s: [] for s in sides}
                for _ in range(args.rounds):
                    for side, how in sides.items():
                        got[side].append(
                            pipeline_alone(tgt.portal, iqn, buffer, step, count, depth) if how is None
                            else bench(how[0], buffer, step, count, depth, how[1]))
                    time.sleep(0.2)
                r = {s: rate(statistics.median(v), buffer, count, unit) for s, v in got.items()}
                direct_rate, floor, ours = r["iscsi:// direct"], r["floor"], r["tm2fs"]
                print(f"{label:<20} " + " ".join(f"{v:>10,.0f} {unit:<5}" for v in r.values())
                      + f" {ours / direct_rate:>13.2f} {floor / direct_rate:>13.2f} "
                      f"{ours / floor:>12.2f}", flush=True)
                rows.append(f"| {label} | " + " | ".join(f"{v:,.0f} {unit}" for v in r.values())
                            + f" | {r['pipeline alone'] / direct_rate:.2f} | "
                            f"{floor / direct_rate:.2f} | **{ours / direct_rate:.2f}** | "
                            f"{ours / floor:.2f} |")
    if args.markdown:
        print("\n| job | iscsi:// direct | pipeline alone | floor (bare pyfuse3) | tm2fs mount | "
              "alone / direct | floor / direct | tm2fs / direct | tm2fs / floor |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bare_fs
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-floor":
        serve_floor(*sys.argv[2:])
    else:
        main()
