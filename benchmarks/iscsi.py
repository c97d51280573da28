"""An iSCSI LUN read through the tm2fs mount vs. read directly over iSCSI, in the same run.

Starts tgtd (userspace target) and a tm2fs daemon with an `iscsi` backend, fills a 256 MiB image,
then runs the same `qemu-img bench` jobs on the image file through the mount and on
`iscsi://PORTAL/IQN/1` (qemu's own libiscsi client, no FUSE, no daemon): sequential 1 MiB reads,
and 4 KiB reads at a 68 KiB stride (qemu-img bench has no random pattern; the stride defeats
read-ahead) at queue depth 1 and 32. Median of 3 runs; prints MiB/s or IOPS and the ratio.

    .venv/bin/python benchmarks/iscsi.py
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
from tests.servers.tgt import TgtServer

SIZE = 256 * 2**20
PREFIX = "iqn.2026-11.org.tm2fs.bench"
JOBS = [  # label, buffer, step, count, depth, unit
    ("seq read 1M QD1", "1M", "1M", 256, 1, "MiB/s"),
    ("seq read 1M QD32", "1M", "1M", 256, 32, "MiB/s"),
    ("read 4K stride QD1", "4K", "68K", 3000, 1, "IOPS"),
    ("read 4K stride QD32", "4K", "68K", 3000, 32, "IOPS"),
]


def bench(target: str, buffer: str, step: str, count: int, depth: int, direct: bool) -> float:
    """Seconds for the job (qemu-img bench prints 'Run completed in N seconds.')."""
    cmd = ["qemu-img", "bench", "-f", "raw", "-s", buffer, "-S", step, "-c", str(count),
           "-d", str(depth)]
    if direct:
        cmd += ["-t", "none", "-i", "native"]
    out = subprocess.run([*cmd, target], capture_output=True, text=True, check=True, timeout=600)
    return float(re.search(r"completed in ([\d.]+) seconds", out.stdout).group(1))


def rate(seconds: float, buffer: str, count: int, unit: str) -> float:
    size = {"1M": 2**20, "4K": 4096}[buffer]
    return count * size / 2**20 / seconds if unit == "MiB/s" else count / seconds


def main() -> None:
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
        direct = f"iscsi://{tgt.portal}/{PREFIX}:{key}/1"
        print(f"{'job':<22} {'iscsi:// direct':>16} {'tm2fs mount':>14} {'ratio':>6}")
        for label, buffer, step, count, depth, unit in JOBS:
            native, mount = [], []
            for _ in range(3):
                native.append(bench(direct, buffer, step, count, depth, False))
                mount.append(bench(str(image), buffer, step, count, depth, True))
                time.sleep(0.2)
            n = rate(statistics.median(native), buffer, count, unit)
            m = rate(statistics.median(mount), buffer, count, unit)
            print(f"{label:<22} {n:>10,.0f} {unit:<5} {m:>8,.0f} {unit:<5} {m / n:>6.2f}")


if __name__ == "__main__":
    main()
