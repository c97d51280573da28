"""The request ceiling of one pyfuse3 + trio loop on this machine, to read tm2fs's figures against.

Mounts a minimal pyfuse3 filesystem (one file; reads return zeros, writes are dropped: no storage,
no rules), the same minimal filesystem backed by a file (pread/pwrite on a file in the same
directory as tm2fs's backend: the storage's own cost, as tm2fs's `dir` driver pays it, and
nothing else) and a tm2fs daemon, and runs the same O_DIRECT 4 KiB fio jobs (QD32) on each, so
each request is one round trip to the daemon. The three are measured in turn, `--rounds` times
(the machine's load changes from second to second: medians of interleaved runs compare best).
Prints requests/s and tm2fs's share of each ceiling.

Attribute timeouts matter here: once a file's attributes expire, the kernel asks GETATTR before a
read (auto_inval_data, which pyfuse3 leaves on), and under asynchronous O_DIRECT at depth it drops
each answer because another read completed meanwhile (fuse_aio_complete bumps the inode's
attr_version), so it goes on asking (measured with 1 s: one GETATTR per 2 to 8 reads). The bare
loops' 60 s never expire within a run; `--attr-timeout 1` gives them tm2fs's CACHE_TIMEOUT.

    .venv/bin/python benchmarks/pyfuse3_ceiling.py [--rounds 3] [--runtime 5] [--attr-timeout 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZE = 256 * 2**20


def serve(mnt: str, backing: str | None = None, attr_timeout: float = 60.0) -> None:
    """The bare loop; with `backing`, reads and writes are pread/pwrite on that file."""
    import bare_fs  # this folder: the same serving loop as the metadata ceiling
    import pyfuse3

    zero = bytes(128 * 1024)
    fd = -1
    if backing is not None:
        fd = os.open(backing, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, SIZE)

    class Ops(bare_fs.OneFile):
        async def read(self, fh, off, size):
            if fd >= 0:
                return os.pread(fd, max(0, min(size, SIZE - off)), off)
            return zero[: max(0, min(size, SIZE - off))]

        async def write(self, fh, off, buf):
            if fd >= 0:
                return os.pwrite(fd, buf, off)
            return len(buf)

    bare_fs.serve(Ops(SIZE, attr_timeout), mnt, set(pyfuse3.default_options))


def iops(path: Path, rw: str, runtime: int = 5) -> float:
    out = subprocess.run(
        ["fio", "--name=c", f"--filename={path}", f"--size={SIZE}", f"--rw={rw}", "--bs=4k",
         "--iodepth=32", "--ioengine=libaio", "--direct=1", f"--runtime={runtime}",
         "--time_based", "--output-format=json"], capture_output=True, check=True, text=True)
    job = json.loads(out.stdout)["jobs"][0]
    return job["read"]["iops"] + job["write"]["iops"]


def fill(path: Path) -> None:
    subprocess.run(["fio", "--name=fill", f"--filename={path}", f"--size={SIZE}", "--rw=write",
                    "--bs=1M", "--output-format=terse"], capture_output=True, check=True)


def main() -> None:
    from tests.daemon import Daemon, is_mounted

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--attr-timeout", type=float, default=60.0,
                        help="seconds the bare loops' attributes stay valid (tm2fs: 1)")
    args = parser.parse_args()
    jobs = ("randread", "randwrite")
    got: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, ExitStack() as stack:
        files: dict[str, Path] = {}
        for name, backing in (("bare", None), ("file", f"{tmp}/backing.img")):
            mnt = Path(tmp) / name
            mnt.mkdir()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", str(mnt),
                                     str(args.attr_timeout), *([backing] if backing else [])])
            stack.callback(proc.wait, 30)
            stack.callback(proc.send_signal, signal.SIGTERM)
            while not is_mounted(mnt):
                time.sleep(0.05)
            files[name] = mnt / "f"
        (Path(tmp) / "tm2fs").mkdir()
        d = stack.enter_context(Daemon(Path(tmp) / "tm2fs"))
        files["tm2fs"] = d.mnt / "local" / "bench.img"
        fill(files["file"])
        fill(files["tm2fs"])
        for _ in range(args.rounds):
            for rw in jobs:
                for name, path in files.items():
                    got.setdefault((name, rw), []).append(iops(path, rw, args.runtime))
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"| 4 KiB O_DIRECT QD32, median of {args.rounds}, bare attrs {args.attr_timeout:g} s "
          "| bare pyfuse3 loop | bare loop on a "
          "file | tm2fs (dir) | share of bare | share of file |")
    print("|---|---:|---:|---:|---:|---:|")
    for rw in jobs:
        bare, file, ours = med["bare", rw], med["file", rw], med["tm2fs", rw]
        print(f"| {rw} | {bare:,.0f} req/s | {file:,.0f} req/s | {ours:,.0f} req/s | "
              f"{ours / bare:.2f} | {ours / file:.2f} |")
    for rw in jobs:
        rounds = ", ".join(" / ".join(f"{got[n, rw][i]:,.0f}" for n in files)
                           for i in range(args.rounds))
        print(f"{rw} per round (bare / file / tm2fs): {rounds}")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[4] if len(sys.argv) == 5 else None, float(sys.argv[3]))
    else:
        main()
