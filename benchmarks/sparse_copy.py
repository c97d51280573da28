"""Copying a thin image out of the mount vs. out of a plain file, in the same run (issue 15).

A SIZE image holding two short writes, on `MNT/local/` and as a plain file beside the backend's
data; `cp --sparse=auto` and `qemu-img convert -O raw` copy each to a local directory. Prints
the time and the bytes the copier read (read/pread64/preadv results under strace, in a second
run so strace does not slow the timed one) and the blocks the copy holds. Never pass/fail.

The mount answers st_blocks truly, so both copiers keep holes; but pyfuse3 has no lseek, so
SEEK_DATA/SEEK_HOLE fall back to "all data" (the kernel's generic_file_llseek): the copier reads
every zero and finds the holes itself, where on the plain file it reads only the data extents.

    .venv/bin/python benchmarks/sparse_copy.py [--size 1G]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# a call, or a call resumed in another thread's line (strace -f)
READ = re.compile(r"^\d+\s+(?:<\.\.\. )?(?:read|pread64|preadv2?)[( ].*\s=\s(\d+)$")


def make(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(b"hello")
        f.seek(size // 2)
        f.write(b"world")


def copiers(src: Path, dst: Path) -> dict[str, list[str]]:
    return {"cp --sparse=auto": ["cp", "--sparse=auto", str(src), str(dst)],
            "qemu-img convert": ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(src), str(dst)]}


def bytes_read(argv: list[str], log: Path) -> int:
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=read,pread64,preadv,preadv2", "-o",
                    str(log), *argv], check=True, capture_output=True)
    total = 0
    for line in log.read_text().splitlines():
        m = READ.match(line)
        if m:
            total += int(m.group(1))
    return total


def run(sources: dict[str, Path], out: Path) -> list[tuple[str, str, float, int, int]]:
    rows = []
    for copier in copiers(Path(), Path()):
        for where, src in sources.items():
            dst = out / "copy.img"
            argv = copiers(src, dst)[copier]
            subprocess.run(["sync"], check=True)
            t = time.monotonic()
            subprocess.run(argv, check=True)
            elapsed = time.monotonic() - t
            held = dst.stat().st_blocks * 512
            dst.unlink()
            read = bytes_read(argv, out / "strace.log")
            dst.unlink()
            rows.append((copier, where, elapsed, read, held))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2**30)
    args = p.parse_args()
    from tests.daemon import Daemon

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, Daemon(Path(tmp)) as d:
        native, out = Path(tmp) / "native", Path(tmp) / "out"
        native.mkdir()
        out.mkdir()
        sources = {"native": native / "thin.img", "tm2fs": d.mnt / "local" / "thin.img"}
        for path in sources.values():
            make(path, args.size)
        held = {w: p.stat().st_blocks * 512 for w, p in sources.items()}
        rows = run(sources, out)
    print(f"image of {args.size / 2**30:g} GiB holding 10 bytes; du of the source: "
          + ", ".join(f"{w} {h // 1024} KiB" for w, h in held.items()))
    print("| copier | source | time | bytes read | copy holds |")
    print("|---|---|---:|---:|---:|")
    for copier, where, elapsed, read, copy in rows:
        print(f"| {copier} | {where} | {elapsed:.3f} s | {read / 2**10:,.0f} KiB | "
              f"{copy // 1024} KiB |")


if __name__ == "__main__":
    main()
