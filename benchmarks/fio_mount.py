"""fio through the tm2fs mount vs. on a plain file beside the backend's data, in the same run.

Starts its own daemon on a temp state directory (or uses a running one with --mount/--native-dir),
runs each fio job on `MNT/local/bench.img` and on `NATIVE_DIR/bench.img` (the same filesystem the
`local` backend keeps its images on), and prints each pair and its ratio. Never pass/fail.

    .venv/bin/python benchmarks/fio_mount.py                 # a table
    .venv/bin/python benchmarks/fio_mount.py --markdown      # the README's table

Page cache: jobs use buffered I/O (direct=0) on both sides — what VMs with cache=writeback and
scripts see — and the files are dropped from the page cache (posix_fadvise DONTNEED via fio's
`invalidate=1`) before each job; write jobs end with fsync, so the cache cannot flatter them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

JOBS = [
    # name, rw, bs, iodepth, engine, direct
    ("seq write 1M", "write", "1M", 1, "psync", 0),
    ("seq read 1M", "read", "1M", 1, "psync", 0),
    ("rand read 4K QD1", "randread", "4k", 1, "psync", 0),
    ("rand read 4K QD32", "randread", "4k", 32, "libaio", 0),
    ("rand write 4K QD1", "randwrite", "4k", 1, "psync", 0),
    ("rand write 4K QD32", "randwrite", "4k", 32, "libaio", 0),
    # O_DIRECT, as qemu with cache=none: no page cache on either side
    ("seq write 1M direct", "write", "1M", 1, "psync", 1),
    ("rand write 4K QD32 direct", "randwrite", "4k", 32, "libaio", 1),
    ("rand read 4K QD32 direct", "randread", "4k", 32, "libaio", 1),
]


def fio(path: Path, rw: str, bs: str, depth: int, engine: str, direct: int, size: str,
        runtime: int) -> dict:
    args = ["fio", "--name=bench", f"--filename={path}", f"--size={size}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={depth}", f"--ioengine={engine}", f"--direct={direct}",
            "--invalidate=1", f"--runtime={runtime}", "--time_based=0", "--randrepeat=1",
            "--output-format=json"]
    if "write" in rw:
        args.append("--end_fsync=1")
    out = subprocess.run(args, capture_output=True, check=True, text=True)
    job = json.loads(out.stdout)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return {"bw": side["bw_bytes"] / 2**20, "iops": side["iops"]}


def prepare(path: Path, size: str) -> None:
    """Lay the file out fully first so read jobs read data, not holes."""
    subprocess.run(["fio", "--name=fill", f"--filename={path}", f"--size={size}", "--rw=write",
                    "--bs=1M", "--end_fsync=1", "--output-format=terse"],
                   capture_output=True, check=True)


def run(mnt: Path, native_dir: Path, size: str, runtime: int,
        repeat: int) -> list[tuple[str, str, float, float]]:
    """Each job alternates native and mount `repeat` times; the medians are compared."""
    rows = []
    target, native = mnt / "local" / "bench.img", native_dir / "bench.img"
    for path in (target, native):
        prepare(path, size)
    for name, rw, bs, depth, engine, direct in JOBS:
        unit = "MiB/s" if bs == "1M" else "IOPS"
        key = "bw" if unit == "MiB/s" else "iops"
        a, b = [], []
        for _ in range(repeat):
            a.append(fio(native, rw, bs, depth, engine, direct, size, runtime)[key])
            b.append(fio(target, rw, bs, depth, engine, direct, size, runtime)[key])
        rows.append((name, unit, statistics.median(a), statistics.median(b)))
    target.unlink()
    native.unlink()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mount", type=Path, help="a running daemon's mountpoint (default: start one)")
    p.add_argument("--native-dir", type=Path, help="a directory on the backend's filesystem")
    p.add_argument("--size", default="512M")
    p.add_argument("--runtime", type=int, default=10, help="seconds at most per job")
    p.add_argument("--repeat", type=int, default=3, help="runs per job and side (median)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if args.mount:
        rows = run(args.mount, args.native_dir or Path(tempfile.gettempdir()), args.size,
                   args.runtime, args.repeat)
    else:
        from tests.daemon import Daemon

        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, Daemon(Path(tmp)) as d:
            native = Path(tmp) / "native"
            native.mkdir()
            rows = run(d.mnt, native, args.size, args.runtime, args.repeat)
    if args.markdown:
        print("| fio job | native | tm2fs mount | ratio |")
        print("|---|---:|---:|---:|")
        for name, unit, a, b in rows:
            print(f"| {name} | {a:,.0f} {unit} | {b:,.0f} {unit} | {b / a:.2f} |")
    else:
        print(f"{'job':<20} {'native':>14} {'tm2fs':>14} {'ratio':>6}")
        for name, unit, a, b in rows:
            print(f"{name:<20} {a:>8,.0f} {unit:<5} {b:>8,.0f} {unit:<5} {b / a:>6.2f}")
    print(f"(fio {subprocess.run(['fio', '--version'], capture_output=True, text=True).stdout.strip()}"
          f", {os.cpu_count()} CPUs, files of {args.size}, median of {args.repeat})", file=sys.stderr)


if __name__ == "__main__":
    main()
