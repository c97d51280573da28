"""Issue 15's side-by-side run: a native file, qemu-storage-daemon's FUSE export of a file, and a
file on the tm2fs mount, all on the same filesystem, with the same fio jobs, interleaved.

Each job runs once on each of the three per round (the order rotates from round to round, so no
side always follows the same one), `--rounds` rounds; the medians are compared and each FUSE
server's ratio to native is printed. Never pass/fail.

    .venv/bin/python benchmarks/acceptance.py [--rounds 3] [--runtime 5] [--size 256M] [--markdown]

The three files:
- native: a plain file in a directory on the filesystem that holds the others' data;
- qsd-fuse: `qemu-storage-daemon --blockdev driver=file,cache.direct=off,aio=threads` on a plain
  file beside it, exported with `--export type=fuse,writable=on` over another regular file.
  cache.direct=off because fio's buffered and O_DIRECT jobs alike then reach a backing file in
  the page cache, as tm2fs's `dir` driver does (it opens its files without O_DIRECT): like is
  compared with like. aio=threads (qemu's default) because with cache.direct=off io_uring and
  native aio only add a submission step to what is a page-cache copy (`--qsd-aio` to try);
- tm2fs: an image of the `local` backend of a daemon started here (tests/daemon.py), whose
  directory is on the same filesystem.

Page cache, per row: fio's `invalidate=1` drops the file fio opens from the page cache before
each job (on the mounts, the FUSE files' pages; natively, the file's), so buffered reads start
cold where fio looks; write jobs end with fsync (`end_fsync=1`), so a write that only reached
memory is paid for within the job. The two FUSE servers' backing files stay in the page cache as
they would on a host serving its VMs (fio_mount.py's treatment too); `--cold-backing` drops them
before every job as well, so that every side reads from the disk. `--ceiling` adds a fourth side:
pyfuse3_ceiling.py's bare pyfuse3 loop doing pread/pwrite on a file beside the others (no
storage rules, no metrics), the most any pyfuse3 filesystem can serve here.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fio_mount import fio, prepare  # this folder

JOBS = [
    # name, rw, bs, iodepth, engine, direct (issue 15's rows)
    ("seq read 1M (buffered)", "read", "1M", 1, "psync", 0),
    ("seq write 1M (buffered)", "write", "1M", 1, "psync", 0),
    ("rand read 4K QD1 (buffered)", "randread", "4k", 1, "psync", 0),
    ("rand read 4K QD32 (O_DIRECT)", "randread", "4k", 32, "libaio", 1),
    ("rand write 4K QD32 (O_DIRECT)", "randwrite", "4k", 32, "libaio", 1),
]


def drop(path: Path) -> None:
    """The file's pages out of the page cache (written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def start_qsd(backing: Path, export: Path, aio: str) -> subprocess.Popen[bytes]:
    """qemu-storage-daemon exporting `backing` over the regular file `export` (an argument
    vector, no shell)."""
    export.touch()
    proc = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={backing},cache.direct=off,aio={aio}",
        "--export", f"type=fuse,id=exp0,node-name=file0,mountpoint={export},writable=on"])
    deadline = time.monotonic() + 30
    while os.stat(export).st_size != backing.stat().st_size:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("qemu-storage-daemon did not export the file")
        time.sleep(0.05)
    return proc


def run(files: dict[str, Path], backing: list[Path], size: str, runtime: int, rounds: int,
        cold_backing: bool, only: str = "") -> list[tuple[str, str, dict[str, float]]]:
    rows = []
    for name, rw, bs, depth, engine, direct in JOBS:
        if only not in name:
            continue
        unit = "MiB/s" if bs == "1M" else "IOPS"
        key = "bw" if unit == "MiB/s" else "iops"
        got: dict[str, list[float]] = {side: [] for side in files}
        for r in range(rounds):
            order = list(files)[r % len(files):] + list(files)[:r % len(files)]
            for side in order:
                if cold_backing:
                    for path in backing:
                        drop(path)
                got[side].append(fio(files[side], rw, bs, depth, engine, direct, size,
                                     runtime)[key])
        rows.append((name, unit, {side: statistics.median(v) for side, v in got.items()}))
        print(f"{name}: " + ", ".join(f"{s} {'/'.join(f'{x:,.0f}' for x in v)}"
                                      for s, v in got.items()), file=sys.stderr)
    return rows


def start_ceiling(root: Path, stack: ExitStack) -> tuple[Path, Path]:
    """pyfuse3_ceiling.py's bare loop on a file (pread/pwrite and nothing else): what any pyfuse3
    filesystem can reach here, the ceiling tm2fs's own loop is read against."""
    from tests.daemon import is_mounted

    mnt, backing = root / "bare", root / "bare-backing.img"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("pyfuse3_ceiling.py")),
                             "--serve", str(mnt), "60", str(backing)])
    stack.callback(proc.wait, 30)
    stack.callback(proc.send_signal, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not is_mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the bare pyfuse3 loop did not mount")
        time.sleep(0.05)
    return mnt / "f", backing


def main() -> None:
    from tests.daemon import Daemon

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256M")
    p.add_argument("--runtime", type=int, default=5, help="seconds at most per job")
    p.add_argument("--rounds", type=int, default=3, help="runs per job and side (median)")
    p.add_argument("--qsd-aio", default="threads", choices=["threads", "native", "io_uring"])
    p.add_argument("--cold-backing", action="store_true",
                   help="drop the FUSE servers' backing files from the page cache before each job")
    p.add_argument("--ceiling", action="store_true",
                   help="a fourth side: pyfuse3_ceiling.py's bare loop on a file (--size 256M)")
    p.add_argument("--only", default="", help="only the jobs whose name holds this")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if args.ceiling and args.size != "256M":
        p.error("--ceiling: the bare loop's file is 256M")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, ExitStack() as stack:
        root = Path(tmp)
        (root / "tm2fs-state").mkdir()
        d = stack.enter_context(Daemon(root / "tm2fs-state"))
        qsd_backing, qsd_export = root / "qsd-backing.img", root / "qsd-export.img"
        files = {"native": root / "native.img", "qsd-fuse": qsd_export,
                 "tm2fs": d.mnt / "local" / "bench.img"}
        for path in (files["native"], qsd_backing, files["tm2fs"]):
            prepare(path, args.size)
        qsd = start_qsd(qsd_backing, qsd_export, args.qsd_aio)
        stack.callback(qsd.wait, 30)
        stack.callback(qsd.send_signal, signal.SIGTERM)
        backends = root / "tm2fs-state" / "state" / "backends" / "local"
        backing = [qsd_backing, *backends.iterdir()]
        if args.ceiling:
            files["pyfuse3 loop"], bare_backing = start_ceiling(root, stack)
            prepare(files["pyfuse3 loop"], args.size)
            backing.append(bare_backing)
        rows = run(files, backing, args.size, args.runtime, args.rounds, args.cold_backing,
                   args.only)
    version = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"({version}, {os.cpu_count()} CPUs, files of {args.size}, median of {args.rounds}, "
          f"qsd aio={args.qsd_aio} cache.direct=off, backing files "
          f"{'dropped before each job' if args.cold_backing else 'left in the page cache'})",
          file=sys.stderr)
    others = [side for side in files if side != "native"]
    if args.markdown:
        print("| fio job | " + " | ".join(files) + " | "
              + " | ".join(f"{side} / native" for side in others) + " |")
        print("|---|" + "---:|" * (len(files) + len(others)))
        for name, unit, m in rows:
            print(f"| {name} | " + " | ".join(f"{m[side]:,.0f} {unit}" for side in files) + " | "
                  + " | ".join(f"{m[side] / m['native']:.2f}" for side in others) + " |")
    else:
        print(f"{'job':<30}" + "".join(f"{side:>16}" for side in files)
              + "".join(f"{side[:5] + '/n':>8}" for side in others))
        for name, unit, m in rows:
            print(f"{name:<30}" + "".join(f"{m[side]:>10,.0f} {unit:<5}" for side in files)
                  + "".join(f"{m[side] / m['native']:>8.2f}" for side in others))


if __name__ == "__main__":
    main()
