"""Metadata work through the mount against a native directory and a bare pyfuse3 loop, same run.

A real daemon (as the tests start it, but with the default monitor interval) mounts a temporary
pool; its `local` dir backend lives on the same filesystem as the native directory it is compared
with. The ceiling is benchmarks/bare_fs.py: a bare in-memory pyfuse3 + trio filesystem mounted
with tm2fs's options and cache timeouts, so the kernel sends it the same requests (a create from
a shell is 3-4 round trips: lookup, create, flush, release) and it answers them from dicts, with
no storage behind it. tm2fs also creates each file on its backend, so its floor is about the bare
figure plus the native one. Each phase runs on the native directory, then on the bare mount, then
on a directory inside the backend on the tm2fs mount, with the same commands:

- create: N empty files from ONE shell: `for i in $(seq N); do : > f$i; done`
- ls -l:  `ls -l` of the directory, output to /dev/null
- stat:   `stat` of every file, from one `xargs stat` (the names on its stdin), output to
          /dev/null
- os.stat: os.stat of every file by name, one loop in this process: the system calls alone, no
          process start-up or output formatting (so its native figure is a few µs per file)
- rename: `mv f$i g$i` for 1 file in 100, from one shell (so 1 exec of mv per rename in both)
- rm -rf: `rm -rf` of the directory

Caches: by default no cache is dropped, and the benchmark waits out the mounts' kernel entry and
attribute timeout before every FUSE phase, so their stat phase asks the daemon (a lookup per
file) instead of reading the kernel's cache; natively the dentry and inode caches stay warm.
That is what users get. `--drop-caches` writes 3 to /proc/sys/vm/drop_caches before every phase
on all sides instead (it slows the other users of the machine).

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

import bare_fs  # beside this file (the script's directory is on sys.path)

from tests.daemon import Daemon
from tm2fs.drivers.dir import filesystem_type

CREATE = 'for i in $(seq "$1"); do : > "f$i"; done'
RENAME = 'for i in $(seq 1 100 "$1"); do mv "f$i" "g$i"; done'
PHASES = ("create", "ls -l", "stat", "os.stat", "rename", "rm -rf")
SIDES = ("native", "bare", "tm2fs")


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


def stat_all(directory: Path, count: int) -> str | None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    failed = []
    try:
        for i in range(1, count + 1):
            try:
                os.stat(f"f{i}", dir_fd=fd)
            except OSError as e:
                failed.append(f"f{i}: {e.strerror}")
    finally:
        os.close(fd)
    return f"{len(failed)} failed, first: {failed[0]}" if failed else None


def command(args: list[str], cwd: Path | None = None, input: bytes | None = None) -> str | None:
    """Run one command; None when it succeeded, else its exit status and first complaints."""
    out = subprocess.run(args, cwd=cwd, input=input, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, check=False)
    if out.returncode == 0:
        return None
    lines = out.stderr.decode(errors="replace").splitlines()
    return f"exit {out.returncode}, {len(lines)} error lines, first: {'; '.join(lines[:3])}"


def phase(name: str, directory: Path, count: int) -> Callable[[], str | None]:
    """The work of one phase: returns None, or what went wrong."""
    names = "".join(f"f{i}\0" for i in range(1, count + 1)).encode()
    return {
        "create": lambda: command(["sh", "-c", CREATE, "sh", str(count)], directory),
        "ls -l": lambda: command(["ls", "-l"], directory),
        "stat": lambda: command(["xargs", "-0", "stat", "--"], directory, names),
        "os.stat": lambda: stat_all(directory, count),
        "rename": lambda: command(["sh", "-c", RENAME, "sh", str(count)], directory),
        "rm -rf": lambda: command(["rm", "-rf", "--", str(directory)]),
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
        (tmp / "bare").mkdir()
        bare = stack.enter_context(bare_fs.mounted(tmp / "bare"))
        (tmp / "bare" / "bench").mkdir()
        dirs = {"native": native, "bare": tmp / "bare" / "bench", "tm2fs": mounted}
        pids = {"bare": bare.pid, "tm2fs": d.proc.pid}
        assert os.stat(native).st_dev == os.stat(backend).st_dev, "not the same filesystem"
        fstype = filesystem_type(backend)
        print(f"{n:,} empty files; pool store {args.db}; native dir and backend on {fstype} "
              f"({tmp}); bare pyfuse3 in memory; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs")
        if args.drop_caches:
            print("caches: dropped (echo 3 > /proc/sys/vm/drop_caches) before every phase")
        else:
            print(f"caches: not dropped; before each FUSE phase a {wait:.1f} s wait lets the "
                  f"mount's kernel entry/attr cache ({wait - 0.5:g} s) expire, so its stat phase "
                  "is one lookup per file to the daemon: what users get")
        times: dict[str, dict[str, float]] = {side: {} for side in SIDES}
        cpu: dict[str, dict[str, float]] = {side: {} for side in pids}
        failures: list[str] = []
        failed: set[str] = set()  # phases whose figures are not to be trusted
        for name in PHASES:
            for side in SIDES:
                if args.drop_caches:
                    drop_caches()
                elif side in pids:
                    time.sleep(wait)
                work = phase(name, dirs[side], n)
                c0 = cpu_seconds(pids[side]) if side in pids else 0.0
                t0 = time.perf_counter()
                error = work()
                times[side][name] = time.perf_counter() - t0
                if side in pids:
                    cpu[side][name] = cpu_seconds(pids[side]) - c0
                if error:
                    failed.add(name)
                    failures.append(f"{name} ({side}) FAILED: {error}")
                    print(failures[-1], flush=True)
        if failures:
            log = d.logs().splitlines()
            print(f"daemon log, last 30 of {len(log)} lines:", *log[-30:], sep="\n")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp / "native")
    report(n, times, cpu, failures, failed)


def report(n: int, times: dict[str, dict[str, float]], cpu: dict[str, dict[str, float]],
           failures: list[str], failed: set[str]) -> None:
    """The table, then the two summary lines (tm2fs of native; the ceiling) last."""
    print()
    print("| phase   | native s | bare s | tm2fs s | tm2fs/native | bare/native | tm2fs/bare "
          "| native µs/file | bare µs/file | tm2fs µs/file | bare CPU s | tm2fs CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    native, bare, tm2fs = ({k: times[side][k] for k in PHASES} for side in SIDES)
    for k in PHASES:
        per = n // 100 if k == "rename" else n  # rename: µs per renamed file
        a, b, c = native[k], bare[k], tm2fs[k]
        label = f"{k} (FAILED)" if k in failed else k
        print(f"| {label:<7} | {a:8.3f} | {b:6.3f} | {c:7.3f} | {c / a:11.1f}x | {b / a:10.1f}x "
              f"| {c / b:9.1f}x | {a / per * 1e6:14.1f} | {b / per * 1e6:12.1f} "
              f"| {c / per * 1e6:13.1f} | {cpu['bare'][k]:10.2f} | {cpu['tm2fs'][k]:11.2f} |")
    print(f"(load average at the end {os.getloadavg()[0]:.1f}: wall times grow with the machine's "
          "load, the daemons' CPU time much less)")
    print("(rename: µs per renamed file, 1 in 100, one exec of mv each on every side; CPU: the "
          "serving process's user+system time during its phase)")
    print()
    for failure in failures:
        print(failure)
    shown = [k for k in PHASES if k != "os.stat"]

    def ratios(top: dict[str, float], bottom: dict[str, float]) -> str:
        return ", ".join(f"{k} {top[k] / bottom[k]:.1f}x" + (" (FAILED)" if k in failed else "")
                         for k in shown)

    print("metadata: " + ratios(tm2fs, native))
    print(f"metadata ceiling: bare pyfuse3 {ratios(bare, native)} (of native); "
          f"tm2fs {ratios(tm2fs, bare)} of bare")


if __name__ == "__main__":
    main()
