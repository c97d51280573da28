"""Metadata work through the mount against the same work in a native directory, in the same run.

A real daemon (as the tests start it, but with the default monitor interval) mounts a temporary
pool; its `local` dir backend lives on the same filesystem as the native directory it is compared
with. Each phase runs on the native directory, then on a directory inside the backend on the
mount, with the same commands:

- create: N empty files from ONE shell: `for i in $(seq N); do : > f$i; done`
- ls -l:  `ls -l` of the directory, output to /dev/null
- stat:   `stat` of every file, from one `xargs stat` (the names on its stdin), output to
          /dev/null
- os.stat: os.stat of every file by name, one loop in this process: the system calls alone, no
          process start-up or output formatting (so its native figure is a few µs per file)
- rename: `mv f$i g$i` for 1 file in 100, from one shell (so 1 exec of mv per rename in both)
- rm -rf: `rm -rf` of the directory

Caches: by default no cache is dropped, and the benchmark waits out the mount's kernel entry and
attribute timeout before every mount phase, so the mount's stat phase asks the daemon (a lookup
per file) instead of reading the kernel's cache; natively the dentry and inode caches stay warm.
That is what users get. `--drop-caches` writes 3 to /proc/sys/vm/drop_caches before every phase
on both sides instead (it slows the other users of the machine).

    .venv/bin/python benchmarks/metadata.py [--count 10000] [--db postgresql] [--drop-caches]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon
from tm2fs.drivers.dir import filesystem_type

CREATE = 'for i in $(seq "$1"); do : > "f$i"; done'
RENAME = 'for i in $(seq 1 100 "$1"); do mv "f$i" "g$i"; done'
PHASES = ("create", "ls -l", "stat", "os.stat", "rename", "rm -rf")


def kernel_cache_timeout() -> float:
    """The mount's entry/attribute timeout, wherever the code under test keeps it."""
    try:
        from tm2fs import fs
        return float(getattr(fs, "CACHE_TIMEOUT", 1.0))
    except Exception:
        return 1.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def stat_all(directory: Path, count: int) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(1, count + 1):
            os.stat(f"f{i}", dir_fd=fd)
    finally:
        os.close(fd)


def phase(name: str, directory: Path, count: int) -> Callable[[], None]:
    run = {"check": True, "cwd": directory, "stdout": subprocess.DEVNULL}
    names = "".join(f"f{i}\0" for i in range(1, count + 1)).encode()
    return {
        "create": lambda: subprocess.run(["sh", "-c", CREATE, "sh", str(count)], **run),
        "ls -l": lambda: subprocess.run(["ls", "-l"], **run),
        "stat": lambda: subprocess.run(["xargs", "-0", "stat", "--"], input=names, **run),
        "os.stat": lambda: stat_all(directory, count),
        "rename": lambda: subprocess.run(["sh", "-c", RENAME, "sh", str(count)], **run),
        "rm -rf": lambda: subprocess.run(["rm", "-rf", "--", str(directory)], check=True),
    }[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the kernel's caches before every phase (both sides)")
    args = parser.parse_args()
    n = args.count
    wait = kernel_cache_timeout() + 0.5
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir="/var/tmp")))
        url = None
        if args.db == "postgresql":
            from tests.servers.postgres import PostgresServer
            url = stack.enter_context(PostgresServer()).url
        (tmp / "daemon").mkdir()
        d = stack.enter_context(Daemon(tmp / "daemon", db_url=url,
                                       extra=("--monitor-interval", "30")))
        backend = d.state / "backends" / "local"
        native = tmp / "native" / "bench"
        native.mkdir(parents=True)
        mounted = d.mnt / "local" / "bench"
        mounted.mkdir()
        assert os.stat(native).st_dev == os.stat(backend).st_dev, "not the same filesystem"
        fstype = filesystem_type(backend)
        print(f"{n:,} empty files; pool store {args.db}; native dir and backend on {fstype} "
              f"({tmp})")
        if args.drop_caches:
            print("caches: dropped (echo 3 > /proc/sys/vm/drop_caches) before every phase")
        else:
            print(f"caches: not dropped; before each mount phase a {wait:.1f} s wait lets the "
                  f"mount's kernel entry/attr cache ({wait - 0.5:g} s) expire, so its stat phase "
                  "is one lookup per file to the daemon: what users get")
        times: dict[str, dict[str, float]] = {"native": {}, "mount": {}}
        cpu: dict[str, float] = {}
        for name in PHASES:
            for side, directory in (("native", native), ("mount", mounted)):
                if args.drop_caches:
                    drop_caches()
                elif side == "mount":
                    time.sleep(wait)
                work = phase(name, directory, n)
                c0 = cpu_seconds(d.proc.pid)
                t0 = time.perf_counter()
                work()
                times[side][name] = time.perf_counter() - t0
                if side == "mount":
                    cpu[name] = cpu_seconds(d.proc.pid) - c0
        assert not native.exists() and not mounted.exists()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp / "native")
    print()
    print("| phase   | native s | mount s | mount/native | native µs/file | mount µs/file "
          "| mount - native µs/file | daemon CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for name in PHASES:
        per = n // 100 if name == "rename" else n  # rename: µs per renamed file
        a, b = times["native"][name], times["mount"][name]
        ratios[name] = b / a
        print(f"| {name:<7} | {a:8.3f} | {b:7.3f} | {b / a:11.1f}x | {a / per * 1e6:14.1f} "
              f"| {b / per * 1e6:13.1f} | {(b - a) / per * 1e6:22.1f} | {cpu[name]:12.2f} |")
    print("(rename: µs per renamed file, 1 in 100, one exec of mv each on both sides; daemon CPU: "
          "the daemon's user+system time during the mount phase)")
    print()
    print("metadata: " + ", ".join(f"{k} {ratios[k]:.1f}x" for k in PHASES if k != "os.stat"))


if __name__ == "__main__":
    main()
