"""Many hypervisors on one pool (issue #12): N real daemons on one PostgreSQL, under placement load.

Starts a throwaway PostgreSQL and N daemons (each its own --host, mountpoint, state dir and
socket; --monitor-interval 30 so monitors do not dominate), makes a few dir backends with small
CAPACITY limits through one host's API, then for a fixed time:
- placement clients (per daemon, through its control socket) allocate `auto:` images that must
  land on the capped backends, keep a few, resize some and delete the oldest: the backends stay
  near full, so hosts race for the same room;
- propagation probers make a change through a random host A and time until host B shows it:
  create / resize / delete (`stat` on B's mount, after B has cached the old answer), a backend's
  PERMISSIONS (the mode of its directory on B's mount), and disable/enable (B's API, since a
  backend's state is not in `stat`).
Afterwards it reads the pool store directly: a backend whose images + reservations exceed
(total - reserved share) x OVERCOMMIT is an over-commit. CPU is the daemons' and PostgreSQL's
user+system time (/proc/PID/stat) over the run window, per successful placement.

    .venv/bin/python benchmarks/scale.py [--hosts 100] [--seconds 20] [--py-spy FILE]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon
from tests.servers.postgres import PostgresServer
from tm2fs.client import Client
from tm2fs.errors import StoreUnavailable, Tm2Error
from tm2fs.mounts import is_mounted
from tm2fs.store import schema

M = 2**20
TICK = os.sysconf("SC_CLK_TCK")
PY_SPY = str(Path(sys.executable).with_name("py-spy"))
API_POLL = 0.005  # seconds between API polls (a stat is cheap; an API call is not)
REQUIREMENTS = 'NAME = "cap*"'  # placements only on the capped backends, never on `local`


class Stats:
    """What the worker threads count; one lock, taken briefly."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.placed: list[float] = []
        self.refused: collections.Counter[str] = collections.Counter()
        self.changes: collections.Counter[str] = collections.Counter()
        self.propagation: dict[str, list[float]] = collections.defaultdict(list)
        self.missed: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}  # the first message of each kind of refusal

    def count(self, counter: str, key: str) -> None:
        with self.lock:
            getattr(self, counter)[key] += 1

    def sample(self, kind: str, seconds: float) -> None:
        with self.lock:
            if kind == "placement":
                self.placed.append(seconds)
            else:
                self.propagation[kind].append(seconds)


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, int(len(s) * q + 0.5) - 1))] if s else float("nan")


# ---------------------------------------------------------------------- /proc


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / TICK


def postgres_pids(pg: PostgresServer) -> list[int]:
    """The postmaster and all its children (one backend per connection, plus its helpers)."""
    master = int((pg.data / "postmaster.pid").read_text().split()[0])
    pids = [master]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if ppid == master:
                pids.append(int(d.name))
    return pids


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, for the share of the machine used over a window."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# ---------------------------------------------------------------------- setup


class BenchDaemon(Daemon):
    """tests/daemon.py's Daemon, started the same way but checked for readiness in-process
    (`GET /v1/health`) instead of by a CLI subprocess every 50 ms: with a hundred daemons
    starting, those subprocesses were most of the startup's CPU."""

    def start(self, timeout: float = 20.0, env: dict[str, str] | None = None) -> Daemon:
        cmd = [sys.executable, "-m", "tm2fs.daemon", "--state-dir", str(self.state),
               "--socket", str(self.sock), "--host", self.host, *self.extra,
               "--db", self.db_url, str(self.mnt)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env or self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tm2fs exited with {self.proc.returncode}:\n{self.logs()}")
            if is_mounted(self.mnt) and self.sock.exists():
                c = Client(str(self.sock), timeout=10)
                try:
                    c.call("GET", "/v1/health")
                    return self
                except Tm2Error:
                    pass
                finally:
                    c.close()
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tm2fs did not come up in {timeout}s:\n{self.logs()}")


def start_daemons(root: Path, url: str, n: int, parallel: int,
                  daemons: list[Daemon]) -> float:
    """Host 0 first (it makes the schema and `local`), the rest `parallel` at a time. The
    Daemon objects are in `daemons` before any starts, so the caller can always stop them all."""
    for i in range(n):
        (root / f"h{i}").mkdir()
        daemons.append(BenchDaemon(root / f"h{i}", db_url=url, host=f"h{i}",
                              extra=("--monitor-interval", "30")))
    t0 = time.perf_counter()
    daemons[0].start(timeout=120)
    pool = ThreadPoolExecutor(parallel)
    try:
        for f in [pool.submit(d.start, 300) for d in daemons[1:]]:
            f.result()
    finally:
        pool.shutdown(cancel_futures=True)
    return time.perf_counter() - t0


def make_backends(root: Path, d: Daemon, count: int, capacity: str, probes: int) -> int:
    """The capped backends and the probers' own; returns how many creates the store stalled
    on (StoreUnavailable: "may still be made", so look, and retry only if it was not)."""
    c = Client(str(d.sock))
    stalls = 0
    specs = [{"NAME": f"cap{i}", "TM": "dir", "CAPACITY": capacity, "RESERVED": "5%"}
             for i in range(count)]
    specs += [{"NAME": f"probe{j}", "TM": "dir", "ROLE": "REPOSITORY", "PERMISSIONS": "0755"}
              for j in range(probes)]
    try:
        for spec in specs:
            path = root / "backends" / spec["NAME"]
            path.mkdir(parents=True)
            for _ in range(10):
                try:
                    c.call("POST", "/v1/backends", {**spec, "TM_RAW": {"PATH": str(path)}})
                    break
                except StoreUnavailable:
                    stalls += 1
                    time.sleep(2)
                    if spec["NAME"] in {b["NAME"] for b in c.call("GET", "/v1/backends")}:
                        break
            else:
                raise RuntimeError(f"could not create backend {spec['NAME']}")
    finally:
        c.close()
    return stalls


def wait_ready(daemons: list[Daemon], names: set[str], timeout: float = 60) -> int:
    """Every host sees every new backend READY (a host places only on READY backends); returns
    how many of its looks the pool store stalled on."""
    deadline = time.monotonic() + timeout
    stalls = 0
    for d in daemons:
        c = Client(str(d.sock))
        try:
            while True:
                try:
                    states = {b["NAME"]: b["STATE"] for b in c.call("GET", "/v1/backends")}
                except StoreUnavailable:
                    stalls += 1
                    states = {}
                if all(states.get(n) == "READY" for n in names):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{d.host}: backends not READY: {states}")
                time.sleep(0.2)
        finally:
            c.close()
    return stalls


# ---------------------------------------------------------------------- load


def placer(d: Daemon, c: Client, k: int, image: int, keep: int, stop: threading.Event,
           s: Stats) -> None:
    """Place, keep `keep` images, grow every fourth, delete the oldest: hosts race for room."""
    own: collections.deque[str] = collections.deque()
    i = 0
    try:
        while not stop.is_set():
            i += 1
            t = time.perf_counter()
            try:
                info = c.call("POST", "/v1/images/allocate",
                              {"address": f"auto:{d.host}-{k}-{i}.img", "size": image,
                               "requirements": REQUIREMENTS})
            except Tm2Error as e:
                code = getattr(e, "code", type(e).__name__)
                s.count("refused", code)
                s.examples.setdefault(code, str(e))
                if own:
                    change(c, s, "delete", {"address": own.popleft()})  # give room back
                else:
                    stop.wait(0.05)
            else:
                dt = time.perf_counter() - t
                s.sample("placement", dt)
                own.append(info["ADDRESS"])
                if i % 4 == 0:
                    change(c, s, "resize", {"address": own[-1], "size": 2 * image})
            while len(own) > keep:
                change(c, s, "delete", {"address": own.popleft()})
    finally:
        c.close()


def change(c: Client, s: Stats, kind: str, body: dict[str, Any]) -> None:
    try:
        c.call("POST", f"/v1/images/{kind}", body)
        s.count("changes", kind)
    except Tm2Error as e:
        code = getattr(e, "code", type(e).__name__)
        s.count("changes", f"{kind} refused ({code})")


class Stopped(Exception):
    """The run ended while a prober waited."""


def until(check: Callable[[], bool], timeout: float, stop: threading.Event,
          every: float = 0.0005) -> float | None:
    """Seconds until `check()` holds, polled `every` s; None if it never did."""
    t = time.perf_counter()
    while not check():
        if stop.is_set():
            raise Stopped
        if time.perf_counter() - t > timeout:
            return None
        time.sleep(every)
    return time.perf_counter() - t


def exists(p: Path) -> bool:
    return os.path.lexists(p)


def size_of(p: Path) -> int:
    try:
        return os.lstat(p).st_size
    except FileNotFoundError:
        return -1


def mode_of(p: Path) -> int:
    return os.lstat(p).st_mode & 0o7777


def prober(j: int, daemons: list[Daemon], clients: dict[str, Client], stop: threading.Event,
           s: Stats, timeout: float) -> None:
    """One probe backend of its own; each step a fresh random pair A -> B. `clients` (one per
    host) are shared by the probers: an httpx client is thread-safe, and making one builds an
    SSL context, which is slow enough under load to stall a prober for the whole run."""
    rng = random.Random(j)
    backend = f"probe{j}"
    i = 0

    def timed(kind: str, check: Callable[[], bool], every: float = 0.0005) -> None:
        dt = until(check, timeout, stop, every)
        if dt is None:
            s.count("missed", kind)
            if kind == "backend state":
                s.count("missed", f"backend state: B shows {state(bc, backend)}, A shows "
                        f"{state(a, backend)}")
        else:
            s.sample(kind, dt)

    def pair() -> tuple[Daemon, Client, Daemon, Client]:
        a, b = rng.sample(daemons, 2)
        return a, clients[a.host], b, clients[b.host]

    while not stop.is_set():
        i += 1
        name = f"p{i}.img"
        address = f"{backend}:{name}"
        try:
            _, a, b, _ = pair()
            if until(lambda a=a: state(a, backend) == "READY", timeout, stop,
                     API_POLL) is None:  # after the last enable: lost to a monitor?
                s.count("missed", f"probe backend not READY on A after {timeout:g} s "
                        f"(A shows {state(a, backend)})")
                continue
            seen = b.mnt / backend / name
            assert not exists(seen)  # B now caches "no such file"
            a.call("POST", "/v1/images/allocate", {"address": address, "size": M})
            timed("create", lambda seen=seen: exists(seen))
            ad, a, b, _ = pair()
            until(lambda p=ad.mnt / backend / name: exists(p), timeout, stop)  # A knows it
            seen = b.mnt / backend / name
            size_of(seen)  # B caches the old size
            a.call("POST", "/v1/images/resize", {"address": address, "size": 2 * M})
            timed("resize", lambda seen=seen: size_of(seen) == 2 * M)
            ad, a, b, _ = pair()
            until(lambda p=ad.mnt / backend / name: size_of(p) == 2 * M, timeout, stop)
            seen = b.mnt / backend / name
            exists(seen)
            a.call("POST", "/v1/images/delete", {"address": address})
            timed("delete", lambda seen=seen: not exists(seen))
            ad, a, b, _ = pair()
            mode = 0o775 if mode_of(ad.mnt / backend) == 0o755 else 0o755
            folder = b.mnt / backend
            mode_of(folder)
            a.call("PATCH", f"/v1/backends/{backend}", {"PERMISSIONS": f"{mode:04o}"})
            timed("backend mode", lambda f=folder, m=mode: mode_of(f) == m)
            _, a, _, bc = pair()
            a.call("POST", f"/v1/backends/{backend}/disable")
            timed("backend state", lambda bc=bc: state(bc, backend) == "DISABLED",
                  API_POLL)
            a.call("POST", f"/v1/backends/{backend}/enable")
        except Stopped:
            break
        except Tm2Error as e:  # counted; the next round starts afresh
            s.count("missed", f"probe step failed ({getattr(e, 'code', type(e).__name__)})")
            stop.wait(0.1)


def state(c: Client, backend: str) -> str:
    return str(c.call("GET", f"/v1/backends/{backend}")["STATE"])


def watch_postgres(url: str, stop: threading.Event, waits: collections.Counter[str],
                   connections: list[int]) -> None:
    """Once a second: connections and what the active ones wait on (pg_stat_activity)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        while not stop.wait(1.0):
            with engine.connect() as conn:
                connections.append(conn.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity")).scalar_one())
                for st, wtype, wevent, n in conn.execute(sa.text(
                        "SELECT state, wait_event_type, wait_event, count(*) FROM pg_stat_activity"
                        " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                        " GROUP BY 1, 2, 3")):
                    waits[f"{st} / {wtype or '-'}:{wevent or 'on CPU'}"] += n
    finally:
        engine.dispose()


def py_spy(pid: int, out: Path, stop: threading.Event, every: float = 3.0) -> None:
    """A few `py-spy dump`s of one daemon during the run, into `out`."""
    with open(out, "w") as f:
        while not stop.wait(every):
            r = subprocess.run([PY_SPY, "dump", "--pid", str(pid)], capture_output=True,
                               text=True, timeout=30, check=False)
            f.write(f"==== {time.strftime('%H:%M:%S')}\n{r.stdout}{r.stderr}\n")


# ---------------------------------------------------------------------- after


def overcommits(url: str) -> list[tuple[str, int, int, int, bool]]:
    """(backend, allocated, reserved now, limit, over) for every capped backend."""
    rows = []
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        for name, total, cap, reserved, overcommit, images, held in conn.execute(sa.text(
                "SELECT b.name, b.total, b.capacity, b.reserved, b.overcommit,"
                f" (SELECT coalesce(sum(size), 0) FROM {schema.image.name} i WHERE i.backend_id = b.id),"
                f" (SELECT coalesce(sum(size), 0) FROM {schema.reservation.name} r WHERE r.backend_id = b.id)"
                f" FROM {schema.backend.name} b WHERE b.capacity IS NOT NULL ORDER BY b.name")):
            total = cap if total is None else total
            limit = int((total - int(total * reserved)) * overcommit)
            rows.append((name, int(images) + int(held), int(held), limit,
                         int(images) + int(held) > limit))
    engine.dispose()
    return rows


def stop_all(daemons: list[Daemon]) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda d: d.stop(), daemons))
    left = [d.host for d in daemons if is_mounted(d.mnt)]
    if left:
        print(f"STILL MOUNTED after stop: {left}", file=sys.stderr)
    return time.perf_counter() - t


def run(args: argparse.Namespace, root: Path, daemons: list[Daemon]) -> None:
    n = args.hosts
    load0 = os.getloadavg()
    print(f"scale: {n} hosts, {args.seconds:g} s, {os.cpu_count()} CPUs, load before "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    settings = {"max_connections": str(3 * n + 30)}
    with PostgresServer(settings) as pg:
        try:
            measure(args, root, daemons, pg)
        finally:
            stop_all(daemons)  # while PostgreSQL still runs, so every daemon stops cleanly


def measure(args: argparse.Namespace, root: Path, daemons: list[Daemon],
            pg: PostgresServer) -> None:
    n = args.hosts
    url = pg.new_database("bench")
    startup = start_daemons(root, url, n, args.parallel_start, daemons)
    print(f"  {n} daemons up in {startup:.1f} s ({startup / n * 1e3:.0f} ms each)", flush=True)
    t = time.perf_counter()
    stalls = make_backends(root, daemons[0], args.backends, args.capacity, args.probers)
    names = {f"cap{i}" for i in range(args.backends)} | {f"probe{j}"
                                                        for j in range(args.probers)}
    stalls_ready = wait_ready(daemons, names, timeout=300)
    print(f"  {len(names)} backends READY on every host in {time.perf_counter() - t:.1f} s "
          f"(pool store stalls: {stalls} creates, {stalls_ready} listings)", flush=True)
    dpids = [d.proc.pid for d in daemons if d.proc]
    stop, watch_stop = threading.Event(), threading.Event()
    s = Stats()
    waits: collections.Counter[str] = collections.Counter()
    connections: list[int] = []
    # every client made before the window: making one costs an SSL context
    placing = [(d, Client(str(d.sock), timeout=60), k) for d in daemons
               for k in range(args.clients)]
    probing = {d.host: Client(str(d.sock), timeout=60) for d in daemons}
    threads = [threading.Thread(target=placer, args=(d, c, k, args.image * M, args.keep, stop, s))
               for d, c, k in placing]
    threads += [threading.Thread(target=prober, args=(j, daemons, probing, stop, s, 10.0))
                for j in range(args.probers)]
    watchers = [threading.Thread(target=watch_postgres,
                                 args=(url, watch_stop, waits, connections))]
    if args.py_spy:
        watchers.append(threading.Thread(target=py_spy,
                                         args=(dpids[len(dpids) // 2], args.py_spy,
                                               watch_stop)))
    pgpids = postgres_pids(pg)
    cpu0 = cpu_seconds(dpids), cpu_seconds(pgpids), os.times()
    busy0 = machine_busy()
    t0 = time.perf_counter()
    for t in threads + watchers:
        t.start()
    try:
        stop.wait(args.seconds)
    finally:
        stop.set()
        for t in threads:
            t.join()
    window = time.perf_counter() - t0
    for c in [c for _, c, _ in placing] + list(probing.values()):
        c.close()
    watch_stop.set()
    for t in watchers:
        t.join()
    busy1 = machine_busy()
    pgpids = sorted(set(pgpids) | set(postgres_pids(pg)))
    me = os.times()
    cpu_d, cpu_pg = cpu_seconds(dpids) - cpu0[0], cpu_seconds(pgpids) - cpu0[1]
    cpu_me = me.user + me.system - cpu0[2].user - cpu0[2].system
    load1 = os.getloadavg()
    rss = [rss_mib(p) for p in dpids]
    over = overcommits(url)
    shutdown = stop_all(daemons)
    report(args, s, window, startup, shutdown, cpu_d, cpu_pg, cpu_me,
           (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), load1, connections, waits,
           rss, over)


def report(args: argparse.Namespace, s: Stats, window: float, startup: float, shutdown: float,
           cpu_d: float, cpu_pg: float, cpu_me: float, busy: float, load: tuple[float, ...],
           connections: list[int], waits: collections.Counter[str], rss: list[float],
           over: list[tuple[str, int, int, int, bool]]) -> None:
    n, placed = args.hosts, len(s.placed)
    rate = placed / window
    print(f"  startup {startup:.1f} s, shutdown {shutdown:.1f} s, run window {window:.1f} s")
    print(f"  placements: {placed} ok ({rate:.1f}/s), p50 {pct(s.placed, .5) * 1e3:.0f} ms, "
          f"p99 {pct(s.placed, .99) * 1e3:.0f} ms, max {max(s.placed, default=0) * 1e3:.0f} ms; "
          f"refused {dict(s.refused)}")
    for code, message in s.examples.items():
        print(f"    e.g. {code}: {message}")
    print(f"  other changes by the placement clients: {dict(s.changes)}")
    print(f"  {'propagation A -> B':<20}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'missed':>8}")
    every: list[float] = []
    for kind, samples in s.propagation.items():
        every += samples
        print(f"  {kind:<20}{len(samples):>6}{pct(samples, .5) * 1e3:>9.1f}"
              f"{pct(samples, .99) * 1e3:>9.1f}{max(samples) * 1e3:>9.1f}{s.missed[kind]:>8}")
    failed = {k: v for k, v in s.missed.items() if k not in s.propagation}
    if failed:
        print(f"  probe rounds cut short: {failed}")
    print(f"  CPU over the window: daemons {cpu_d:.1f} s, PostgreSQL {cpu_pg:.1f} s, this "
          f"benchmark's clients {cpu_me:.1f} s; machine busy {busy:.0%} of {os.cpu_count()} CPUs;"
          f" load after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"  pg connections (pg_stat_activity, all): max {max(connections, default=0)}")
    samples = sum(waits.values()) or 1
    print("  client backends, by state / wait event (share of 1 s samples):")
    for key, count in waits.most_common(8):
        print(f"    {count / samples:6.1%}  {key}")
    print(f"  daemon RSS: sum {sum(rss):.0f} MiB, mean {statistics.mean(rss):.1f} MiB, "
          f"max {max(rss):.1f} MiB")
    print(f"  {'backend':<10}{'allocated MiB':>15}{'reserved now':>14}{'limit MiB':>11}  over?")
    for name, allocated, held, limit, bad in over:
        print(f"  {name:<10}{allocated / M:>15.0f}{held / M:>14.0f}{limit / M:>11.0f}  "
              f"{'OVER' if bad else 'ok'}")
    cpu_per = (cpu_d + cpu_pg) / placed * 1e3 if placed else float("nan")
    attempts = placed + sum(s.refused.values())
    print(f"  daemons + PostgreSQL CPU per placement {cpu_per:.1f} ms, per attempt (refusals "
          f"too) {(cpu_d + cpu_pg) / max(1, attempts) * 1e3:.1f} ms")
    print(f"scale: {n} hosts, {rate:.1f} placements/s, placement p99 "
          f"{pct(s.placed, .99) * 1e3:.0f} ms, propagation p99 {pct(every, .99) * 1e3:.0f} ms, "
          f"over-commit {sum(o[4] for o in over)}, cpu per placement {cpu_per:.1f} ms, "
          f"pg connections {max(connections, default=0)}, daemon RSS {sum(rss):.0f} MiB "
          f"({statistics.mean(rss):.0f} MiB each)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=2, help="placement clients per daemon")
    parser.add_argument("--probers", type=int, default=8, help="propagation probers at once")
    parser.add_argument("--backends", type=int, default=4, help="capped dir backends")
    parser.add_argument("--capacity", default="512M", help="CAPACITY of each capped backend")
    parser.add_argument("--image", type=int, default=16, help="placed image size, MiB")
    parser.add_argument("--keep", type=int, default=3, help="images each client keeps")
    parser.add_argument("--parallel-start", type=int, default=6)
    parser.add_argument("--py-spy", type=Path, help="write py-spy dumps of one daemon here")
    args = parser.parse_args()
    if args.hosts < 2:
        parser.error("--hosts must be at least 2 (propagation needs a pair)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM cleans up as Ctrl-C
    root = Path(tempfile.mkdtemp(prefix="tm2fs-scale-"))
    daemons: list[Daemon] = []
    try:
        run(args, root, daemons)
    finally:
        stop_all(daemons)
        if not any(is_mounted(d.mnt) for d in daemons):
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(root)], check=False)


if __name__ == "__main__":
    main()
