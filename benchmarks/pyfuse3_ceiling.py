"""The request ceiling of one pyfuse3 + trio loop on this machine, to read tm2fs's figures against.

Mounts a minimal pyfuse3 filesystem (one file; reads return zeros, writes are dropped: no storage,
no rules) and a tm2fs daemon, and runs the same O_DIRECT 4 KiB fio jobs (QD32) on both, so each
request is one round trip to the daemon. Prints requests/s and tm2fs's share of the ceiling.

    .venv/bin/python benchmarks/pyfuse3_ceiling.py
"""

from __future__ import annotations

import errno
import json
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZE = 256 * 2**20


def serve(mnt: str) -> None:
    import pyfuse3
    import trio

    zero = bytes(128 * 1024)

    class Ops(pyfuse3.Operations):
        def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
            e = pyfuse3.EntryAttributes()
            e.st_ino = ino
            e.st_mode = (stat.S_IFDIR | 0o755) if ino == 1 else (stat.S_IFREG | 0o644)
            e.st_size = 0 if ino == 1 else SIZE
            e.st_nlink = 1
            e.attr_timeout = e.entry_timeout = 60
            return e

        async def getattr(self, ino, ctx=None):
            return self._attr(ino)

        async def lookup(self, parent, name, ctx=None):
            if name != b"f":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(2)

        async def open(self, ino, flags, ctx):
            return pyfuse3.FileInfo(fh=ino)

        async def read(self, fh, off, size):
            return zero[: max(0, min(size, SIZE - off))]

        async def write(self, fh, off, buf):
            return len(buf)

    async def main() -> None:
        pyfuse3.init(Ops(), mnt, set(pyfuse3.default_options))
        async with trio.open_nursery() as nursery:
            async def stop() -> None:
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()

            nursery.start_soon(stop)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
        pyfuse3.close(unmount=True)

    trio.run(main)


def iops(path: Path, rw: str, runtime: int = 5) -> float:
    out = subprocess.run(
        ["fio", "--name=c", f"--filename={path}", f"--size={SIZE}", f"--rw={rw}", "--bs=4k",
         "--iodepth=32", "--ioengine=libaio", "--direct=1", f"--runtime={runtime}",
         "--time_based", "--output-format=json"], capture_output=True, check=True, text=True)
    job = json.loads(out.stdout)["jobs"][0]
    return job["read"]["iops"] + job["write"]["iops"]


def main() -> None:
    from tests.daemon import Daemon, is_mounted

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(raw)])
        try:
            while not is_mounted(raw):
                time.sleep(0.05)
            ceiling = {rw: iops(raw / "f", rw) for rw in ("randread", "randwrite")}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        (Path(tmp) / "tm2fs").mkdir()
        with Daemon(Path(tmp) / "tm2fs") as d:
            img = d.mnt / "local" / "bench.img"
            subprocess.run(["fio", "--name=fill", f"--filename={img}", f"--size={SIZE}",
                            "--rw=write", "--bs=1M", "--output-format=terse"],
                           capture_output=True, check=True)
            ours = {rw: iops(img, rw) for rw in ("randread", "randwrite")}
    print("| 4 KiB O_DIRECT QD32 | bare pyfuse3 loop | tm2fs (dir) | share |")
    print("|---|---:|---:|---:|")
    for rw in ("randread", "randwrite"):
        print(f"| {rw} | {ceiling[rw]:,.0f} req/s | {ours[rw]:,.0f} req/s | "
              f"{ours[rw] / ceiling[rw]:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        main()
