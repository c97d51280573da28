"""One image three ways, in the same run, for dir, rbd and iscsi: direct (the storage's own client,
no tm2fs), through the path `tm2 attach --native` / `tm2 source` gives the hypervisor, and
through the tm2fs mount.

Starts a throwaway Ceph cluster (tests/servers/ceph.py), tgtd (tests/servers/tgt.py) and a tm2fs
daemon with a `dir`, an `rbd` and an `iscsi` backend, fills a 256 MiB image on each through the
mount, then runs the same `qemu-img bench` jobs (qemu's block layer, as a VM's disk uses it) with
cache=none on:

- direct: the backing file PATH/KEY; `rbd:POOL/KEY:conf=CEPH_CONF`; `iscsi://PORTAL/IQN/1`, each
  made by this script from the backend's TM_RAW and the image's KEY;
- native: for dir the symlink `tm2 attach --native` made, else `tm2 source --format qemu`'s
  -blockdev as a `json:` filename;
- mount: MNT/BACKEND/IMAGE (O_DIRECT, aio=native).

qemu-img bench has no random pattern: 4 KiB jobs read or write at a 68 KiB stride (it defeats
read-ahead), wrapping around the image. Each way's request count is set so a run lasts about a
second (direct and native make the same requests, after one untimed run); median of 5
interleaved runs; MiB/s or IOPS, and each one's ratio to direct. native and direct are the same
client on the same storage, so their ratio is 1 up to the noise of a shared machine; the mount's
column is what a VM gives up through tm2fs.

    .venv/bin/python benchmarks/native_attach.py
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon
from tests.servers.ceph import CephCluster
from tests.servers.tgt import TgtServer

SIZE = 256 * 2**20
PREFIX = "iqn.2026-11.org.tm2fs.bench"
RUNS = 5
SECONDS = 1.0  # each run's length, roughly: its count comes from a short calibration run
JOBS = [  # label, buffer, step, calibration count, depth, write
    ("read 4K QD1", "4K", "68K", 500, 1, False),
    ("write 4K QD1", "4K", "68K", 500, 1, True),
    ("read 4K QD32", "4K", "68K", 2000, 32, False),
    ("write 4K QD32", "4K", "68K", 2000, 32, True),
    ("seq read 1M QD1", "1M", "1M", 64, 1, False),
    ("seq write 1M QD1", "1M", "1M", 64, 1, True),
]


def bench(target: str, buffer: str, step: str, count: int, depth: int, write: bool) -> float:
    """Seconds for the job (qemu-img bench prints 'Run completed in N seconds.')."""
    cmd = ["qemu-img", "bench", "-s", buffer, "-S", step, "-c", str(count), "-d", str(depth),
           "-t", "none"]
    if not target.startswith("json:"):
        cmd += ["-f", "raw"]
    if target.startswith("/"):
        cmd += ["-i", "native"]
    if write:
        cmd += ["-w"]
    out = subprocess.run([*cmd, target], capture_output=True, text=True, check=True, timeout=600)
    found = re.search(r"completed in ([\d.]+) seconds", out.stdout)
    assert found, out.stdout
    return float(found.group(1))


def rate(seconds: float, buffer: str, count: int) -> float:
    """MiB/s for 1 MiB jobs, IOPS for 4 KiB ones."""
    return count / seconds


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def targets(d: Daemon, tmp: Path, backend: str, raw: dict[str, str]) -> dict[str, str]:
    image = f"{backend}:bench.img"
    on_mount = d.mnt / backend / "bench.img"
    subprocess.run(["dd", "if=/dev/urandom", f"of={on_mount}", "bs=1M", f"count={SIZE >> 20}",
                    "status=none"], check=True)
    key = json.loads(ok(d.tm2("info", "--json", image)))["KEY"]
    link = tmp / f"{backend}-disk.0"
    ok(d.tm2("attach", "--native", image, str(link)))
    if backend == "local":
        direct, native = f"{raw['PATH']}/{key}", str(link)
    else:
        blockdev = json.loads(ok(d.tm2("source", "--format", "qemu", image)))
        blockdev.pop("node-name")
        native = "json:" + json.dumps(blockdev)
        direct = (f"rbd:{raw['POOL']}/{key}:conf={raw['CEPH_CONF']}" if backend == "ceph"
                  else f"iscsi://{raw['PORTAL']}/{PREFIX}:{key}/1")
    return {"direct": direct, "native": native, "mount": str(on_mount)}


def main() -> None:
    with CephCluster() as ceph, TgtServer() as tgt, tempfile.TemporaryDirectory() as t, \
            Daemon(Path(t)) as d:
        tmp = Path(t)
        raws = {"local": {"PATH": json.loads(ok(d.backend_cli("show", "local", "--json")))
                          ["TM_RAW"]["PATH"]},
                "ceph": {"CEPH_CONF": ceph.conf_path, "POOL": ceph.pool},
                "san": {"PORTAL": tgt.portal, "STORE": f"{tmp}/luns",
                        "TGT_CONTROL": str(tgt.control), "IQN_PREFIX": PREFIX}}
        for name, tm in (("ceph", "rbd"), ("san", "iscsi")):
            pairs = ", ".join(f'{k} = "{v}"' for k, v in raws[name].items())
            tpl = tmp / f"{name}.tpl"
            tpl.write_text(f"NAME = {name}\nTM = {tm}\nTIMEOUT = 30\nTM_RAW = [ {pairs} ]\n")
            ok(d.backend_cli("create", str(tpl)))
        print(f"{'backend':<7} {'job':<17} {'direct':>16} {'native':>16} {'mount':>16} "
              f"{'native/direct':>13} {'mount/direct':>12}")
        for backend, kind in (("local", "dir"), ("ceph", "rbd"), ("san", "iscsi")):
            ways = targets(d, tmp, backend, raws[backend])
            for label, buffer, step, calibration, depth, write in JOBS:
                counts = {w: max(calibration, round(SECONDS * calibration / bench(
                    t, buffer, step, calibration, depth, write))) for w, t in ways.items()}
                counts["native"] = counts["direct"]  # the same offsets: as much comes from cache
                bench(ways["direct"], buffer, step, counts["direct"], depth, write)  # warm-up
                times: dict[str, list[float]] = {w: [] for w in ways}
                order = list(ways)
                for run in range(RUNS):  # interleaved, each way first in turn
                    for way in order[run % 3:] + order[:run % 3]:
                        times[way].append(bench(ways[way], buffer, step, counts[way], depth, write))
                    time.sleep(0.2)
                r = {w: rate(statistics.median(s), buffer, counts[w]) for w, s in times.items()}
                unit = "MiB/s" if buffer == "1M" else "IOPS"
                print(f"{kind:<7} {label:<17} " + " ".join(f"{r[w]:>10,.0f} {unit:<5}" for w in ways)
                      + f" {r['native'] / r['direct']:>13.2f} {r['mount'] / r['direct']:>12.2f}",
                      flush=True)
            ok(d.tm2("detach", f"{backend}:bench.img", str(tmp / f"{backend}-disk.0")))


if __name__ == "__main__":
    main()
