"""Many hypervisors, one pool: two or three real daemons on one throwaway PostgreSQL, each with its
own mountpoint and socket, acting as separate hosts (same machine, so a `dir` backend is shared
storage for all of them)."""

from __future__ import annotations

import ast
import errno
import json
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tm2fs import errors as err
from tm2fs.client import Client
from tm2fs.store import PoolStore

pytestmark = [pytest.mark.mount, pytest.mark.postgres, pytest.mark.slow]
DELAY = 1.0  # the promise: a change shows on every other host's mount within this (README)
MiB = 2**20


@pytest.fixture
def cluster(pg_server, tmp_path: Path) -> Iterator[list[Daemon]]:
    url = pg_server.new_database(f"hosts{random.randrange(10**9)}")
    daemons = []
    try:
        for name in ("hostA", "hostB", "hostC"):
            d = Daemon(tmp_path / name, db_url=url, host=name, extra=("--host-timeout", "5"))
            (tmp_path / name).mkdir()
            daemons.append(d.start())
        yield daemons
    finally:
        for d in daemons:
            d.stop()


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def until(check, limit: float = DELAY) -> float:
    """Seconds until check() holds; fails after `limit`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            raise AssertionError(f"not within {limit}s")
        time.sleep(0.002)
    return time.monotonic() - start


def exists(p: Path) -> bool:
    return os.path.lexists(p)


def test_changes_show_on_every_host_within_the_delay(cluster: list[Daemon]) -> None:
    a, b, c = cluster
    on_a, on_b, on_c = (d.mnt / "local" for d in cluster)
    assert not exists(on_b / "disk.img")  # B's kernel now caches "no such file"
    (on_a / "disk.img").write_bytes(b"x" * 4096)
    until(lambda: exists(on_b / "disk.img") and exists(on_c / "disk.img"))
    assert (on_b / "disk.img").read_bytes() == b"x" * 4096
    assert (on_c / "disk.img").stat().st_size == 4096  # C's kernel caches the size now
    os.truncate(on_a / "disk.img", 3 * MiB)
    until(lambda: (on_c / "disk.img").stat().st_size == 3 * MiB)
    os.rename(on_a / "disk.img", on_a / "renamed.img")
    until(lambda: exists(on_b / "renamed.img") and not exists(on_b / "disk.img"))
    ok(b.tm2("resize", "local:renamed.img", "5M"))  # through B's API this time
    until(lambda: (on_a / "renamed.img").stat().st_size == 5 * MiB)
    (on_c / "vm-7").mkdir()
    until(lambda: (on_a / "vm-7").is_dir())
    os.unlink(on_b / "renamed.img")
    until(lambda: not exists(on_a / "renamed.img") and not exists(on_c / "renamed.img"))
    # a new backend and its state change reach every host too
    ok(a.backend_cli("create", "--name", "b2", "--tm", "dir", "--tm-raw",
                     f"PATH={a.tmp}/b2"))
    until(lambda: (c.mnt / "b2").is_dir())
    ok(a.backend_cli("disable", "b2"))
    until(lambda: c.backends()["b2"]["STATE"] == "DISABLED")
    with pytest.raises(OSError) as e:
        (c.mnt / "b2" / "new").write_bytes(b"no")
    assert e.value.errno == errno.EROFS
    hosts = {h["NAME"]: h for h in json.loads(ok(a.backend_cli("hosts", "--json")))}
    assert {h["STATE"] for h in hosts.values()} == {"ONLINE"}
    until(lambda: json.loads(ok(a.backend_cli("show", "local", "--json")))["HOSTS"]
          == {"hostA": "READY", "hostB": "READY", "hostC": "READY"}, limit=10)


@pytest.mark.logs_ok
def test_allocation_follows_another_host_s_writes(cluster: list[Daemon]) -> None:
    """st_blocks of an image another host writes follows it: the remote change queues a
    measurement, the monitor's tick makes it (about a second; generous limits here)."""
    a, b, _ = cluster
    on_a, on_b = a.mnt / "local" / "thin.img", b.mnt / "local" / "thin.img"
    with open(on_a, "wb") as f:
        f.truncate(64 * MiB)
        f.write(b"x")
    until(lambda: exists(on_b) and on_b.stat().st_size == 64 * MiB, 10)
    until(lambda: on_b.stat().st_blocks * 512 <= MiB, 20)
    with open(on_a, "r+b") as f:
        f.seek(32 * MiB)
        f.write(b"y" * 8 * MiB)
    until(lambda: on_b.stat().st_blocks * 512 >= 8 * MiB, 20)


def test_one_writer_at_a_time_and_a_dead_holder_s_lease_can_be_broken(cluster: list[Daemon]) -> None:
    a, b, _ = cluster
    (a.mnt / "local" / "disk.img").write_bytes(b"\0" * 8192)
    until(lambda: exists(b.mnt / "local" / "disk.img"))
    writer = open(a.mnt / "local" / "disk.img", "r+b")  # noqa: SIM115 - held across the test
    writer.write(b"A" * 4096)
    writer.flush()
    with pytest.raises(OSError) as e, open(b.mnt / "local" / "disk.img", "r+b"):
        pass
    assert e.value.errno == errno.EBUSY
    with open(b.mnt / "local" / "disk.img", "rb") as f:  # read-only access is fine
        assert f.read(4096) == b"A" * 4096
    refused = b.tm2("write", "local:disk.img", input=b"B" * 10)
    assert refused.returncode == 1 and "being written on host hostA" in refused.stderr.decode()
    refused = b.tm2("delete", "local:disk.img")
    assert refused.returncode == 1 and "hostA" in refused.stderr.decode()
    a.kill9()  # hostA dies holding the lease
    with pytest.raises(OSError):
        writer.close()
    early = b.tm2("break-lease", "local:disk.img")
    assert early.returncode == 1 and "alive" in early.stderr.decode()  # heartbeat still fresh
    until(lambda: {h["NAME"]: h["STATE"] for h in json.loads(ok(b.backend_cli("hosts", "--json")))}
          ["hostA"] == "UNREACHABLE", limit=12)
    assert "held by hostA" in ok(b.tm2("break-lease", "local:disk.img"))
    assert "broke the write lease of local:disk.img held by host hostA" in b.logs()
    with open(b.mnt / "local" / "disk.img", "r+b") as f:
        f.write(b"B" * 4096)
    assert (b.mnt / "local" / "disk.img").read_bytes()[:4096] == b"B" * 4096
    a.restart()  # comes back, remounts, and sees B's bytes
    assert (a.mnt / "local" / "disk.img").read_bytes()[:4096] == b"B" * 4096


def test_restart_reconciles_the_host_s_attachments(cluster: list[Daemon], tmp_path: Path) -> None:
    a, b, _ = cluster
    (a.mnt / "local" / "one-1").mkdir()
    ok(a.tm2("allocate", "local:one-1/disk.0", "1M"))
    ok(a.tm2("allocate", "local:one-1/disk.1", "1M"))
    outside = tmp_path / "vm-disk"
    ok(a.tm2("attach", "local:one-1/disk.0", str(outside)))  # attachment + lease for hostA
    os.symlink(a.mnt / "local" / "one-1" / "disk.1", a.mnt / "local" / "one-1" / "link.1")
    busy = open(a.mnt / "local" / "one-1" / "disk.1", "r+b")  # noqa: SIM115 - a writer at the crash
    a.kill9()
    with pytest.raises(OSError):
        busy.close()
    a.restart()
    m = re.findall(r"reconcile at start: (\{.*\})", a.logs())
    fixed = ast.literal_eval(m[-1])
    assert fixed["links"] == 0 and fixed["leases"] == 0  # disk.1 keeps its lease: link.1
    with PoolStore(a.db_url) as store, store.read() as tx:
        leases = {image_id: holder for image_id, holder, _ in tx.leases()}
        attached = {(x.host, x.path) for x in tx.attachments()}
    assert set(leases.values()) == {"hostA"} and len(leases) == 2
    assert ("hostA", str(outside)) in attached
    assert b.backends()["local"]["NBVM"] == 2
    # still hostA's to write: B is refused, A writes
    with pytest.raises(OSError) as e, open(b.mnt / "local" / "one-1" / "disk.0", "r+b"):
        pass
    assert e.value.errno == errno.EBUSY
    ok(a.tm2("write", "local:one-1/disk.0", input=b"mine"))
    ok(a.tm2("detach", "local:one-1/disk.0", str(outside)))
    os.unlink(a.mnt / "local" / "one-1" / "link.1")
    with PoolStore(a.db_url) as store, store.read() as tx:
        assert tx.leases() == []


def test_hosts_creating_cloning_deleting_at_once(cluster: list[Daemon]) -> None:
    """Three hosts x 4 workers change one small backend for a while: nothing lost or doubled,
    counters equal a recount, never past the capacity."""
    a = cluster[0]
    ok(a.backend_cli("create", "--name", "busy", "--tm", "dir", "--capacity", "40M",
                     "--tm-raw", f"PATH={a.tmp}/busy"))
    for d in cluster:
        until(lambda d=d: (d.mnt / "busy").is_dir())
    alive: dict[str, int] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker(d: Daemon, n: int) -> None:
        rng = random.Random(n)
        client = Client(str(d.sock))
        mine: list[str] = []
        try:
            for i in range(40):
                try:
                    op = rng.random()
                    if op < 0.5 or not mine:
                        name = f"{d.host}-{n}-{i}"
                        client.call("POST", "/v1/images/allocate",
                                    {"address": f"busy:{name}", "size": rng.choice([1, 2, 3]) * MiB})
                        mine.append(name)
                    elif op < 0.75:
                        name = f"{d.host}-{n}-{i}c"
                        client.call("POST", "/v1/images/clone",
                                    {"src": f"busy:{rng.choice(mine)}", "dst": f"busy:{name}"})
                        mine.append(name)
                    else:
                        victim = mine.pop(rng.randrange(len(mine)))
                        client.call("POST", "/v1/images/delete", {"address": f"busy:{victim}"})
                except err.NoSpace:
                    pass  # full: the limit holds
            with lock:
                for name in mine:
                    alive[name] = 1
        except BaseException as e:
            failures.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(d, n)) for d in cluster for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    with PoolStore(a.db_url) as store, store.read() as tx:
        b = tx.backend_by_name("busy")
        images = tx.images(b.id)
        names = sorted(tx.node_by_image(im.id).name for im in images)
        assert tx.reservations() == []
        assert sum(im.size for im in images) <= b.total
    assert names == sorted(alive)  # nothing lost, nothing doubled
    assert sorted(os.listdir(a.tmp / "busy")) == sorted([".tm2fs-backend", *(im.key for im in images)])
    view = a.backends()["busy"]
    assert (view["NBIMAGE"], view["ALLOCATED"]) == (len(images), sum(im.size for im in images))
    assert sorted(p.name for p in (cluster[2].mnt / "busy").iterdir()) == sorted(alive)


def test_host_local_backend_is_remote_elsewhere(cluster: list[Daemon]) -> None:
    a, b, _ = cluster
    ok(a.backend_cli("create", "--name", "aonly", "--tm", "dir", "--tm-raw",
                     f"PATH={a.tmp}/aonly HOST=hostA"))
    (a.mnt / "aonly" / "disk.img").write_bytes(b"A's own")
    until(lambda: exists(b.mnt / "aonly" / "disk.img"))
    with pytest.raises(OSError) as e, open(b.mnt / "aonly" / "disk.img", "rb"):
        pass
    assert e.value.errno == errno.EREMOTE
    assert b.backends()["aonly"]["STATE"] == "REMOTE"  # as hostB sees it
    assert a.backends()["aonly"]["STATE"] == "READY"
    assert "local to host hostA" in b.tm2("read", "aonly:disk.img").stderr.decode()
    assert "state is REMOTE" in ok(b.tm2("place", "1M", "--explain"))
    refused = b.backend_cli("create", "--name", "x", "--tm", "dir", "--tm-raw", "PATH=/tmp/x HOST=hostA")
    assert refused.returncode == 1 and "on that host" in refused.stderr.decode()
    until(lambda: json.loads(ok(a.backend_cli("show", "aonly", "--json")))["HOSTS"].get("hostB")
          == "REMOTE", limit=10)
