"""Regression tests: bugs users met, each reproduced through what users touch (the mount, the CLIs,
the control API, the daemon's exit status and log), never through the core's internals, so they
stay valid while the core is rewritten. Each docstring says what went wrong.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import re
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon import Daemon
from tm2fs.client import Client

pytestmark = pytest.mark.mount
MiB = 2**20


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def add_dir_backend(d: Daemon, name: str, path: Path, *options: str) -> None:
    ok(d.backend_cli("create", "--name", name, "--tm", "dir", "--tm-raw", f"PATH={path}", *options))


def raw_api(d: Daemon) -> httpx.Client:
    """The control API as any HTTP client sees it (status codes and all)."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.sock)), base_url="http://tm2fs",
                        timeout=60)


def in_thread(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run `fn` in a daemon thread that records its result, error and duration: an operation that
    may hang on the mount never hangs the test (the caller joins with a timeout)."""
    box: dict[str, Any] = {"start": time.monotonic()}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e
        box["took"] = time.monotonic() - box["start"]

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


# ---------------------------------------------------------------------- 1. monitor vs delete


def tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tm2fs-test", str(path)],
                   check=True, capture_output=True)


def untmpfs(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.fixture
def ram_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """The daemon with its state (SQLite, the `local` backend) on a tmpfs: fsync costs nothing
    there, so even a machine shared with other jobs runs hundreds of operations a second."""
    ram = tmp_path / "ram"
    tmpfs(ram, "256m")
    try:
        with Daemon(ram) as d:
            yield d
    finally:
        untmpfs(ram)


@pytest.mark.slow
def test_a_dir_backend_stays_ready_while_images_are_deleted(ram_daemon: Daemon) -> None:
    """The `dir` monitor listed the backend directory, then stat'ed every key: a key deleted in
    between raised ENOENT and turned a healthy backend ERROR for seconds, every image on it
    answering EIO meanwhile. Users create and delete images through the mount for 10 s while the
    admin adjusts the backend's CAPACITY (each update re-reads the backend at once, so the backend
    is looked at many times a second, not once) and watches STATE: it must stay READY and no
    operation may fail."""
    d = ram_daemon
    local = d.mnt / "local"
    with ThreadPoolExecutor(8) as pool:  # a directory longer than one getdents batch
        list(pool.map(lambda i: (local / f"keep-{i}").write_bytes(b"k" * 4096), range(300)))
    stop = time.monotonic() + 10
    failures: list[str] = []
    states: list[str] = []
    deleted = [0]

    def churn(k: int) -> None:
        for r in range(10**6):
            if time.monotonic() > stop:
                return
            names = [local / f"churn-{k}-{r}-{i}" for i in range(25)]
            for op, path in [*(("create", p) for p in names), *(("delete", p) for p in names)]:
                try:
                    if op == "create":
                        path.write_bytes(b"c" * 4096)
                    else:
                        deleted[0] += 1
                        path.unlink()
                except OSError as e:
                    failures.append(f"{op} {path.name}: {e}")

    def admin() -> None:
        client = Client(str(d.sock))
        try:
            for i in range(10**6):
                if time.monotonic() > stop:
                    return
                view = client.call("PATCH", "/v1/backends/local", {"CAPACITY": f"{100 + i % 2}G"})
                states.append(view["STATE"])
                states.append(client.call("GET", "/v1/backends/local")["STATE"])
                time.sleep(0.01)
        finally:
            client.close()

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=admin))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flaps = [line for line in d.logs().splitlines() if "-> ERROR" in line]
    assert deleted[0] > 50 and len(states) > 20, (deleted, len(states))  # the load really ran
    assert set(states) == {"READY"}, (
        f"STATE seen: { {s: states.count(s) for s in set(states)} }; daemon log:\n"
        + "\n".join(flaps[:3]))
    assert not failures, f"{len(failures)} failed operations, e.g. {failures[:3]}"
    assert json.loads(ok(d.backend_cli("show", "local", "--json")))["STATE"] == "READY"


# ---------------------------------------------------------------------- 2. PostgreSQL stall


def postgres_pids(data_dir: Path) -> list[int]:
    """The postmaster (first line of postmaster.pid) and its children (backends, walwriter...)."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == postmaster:
            children.append(int(entry))
    return [postmaster, *children]


@pytest.mark.slow
@pytest.mark.postgres
def test_open_images_keep_working_while_postgresql_stalls(pg_server: Any, tmp_path: Path) -> None:
    """Every pool-store call ran on the daemon's one trio thread: with PostgreSQL stalled (a
    stopped server, a network partition) the next heartbeat blocked the whole daemon, and the data
    path of already open images hung with it. PostgreSQL stopped for 10 s: reads and writes of an
    open image must go on (each well under 1 s); a metadata change must end within 15 s (an error,
    or success once PostgreSQL is back), never hang; afterwards everything works and the data is
    intact. (No process is started while the image is open: a child closing its copy of the
    descriptor at exec sends FLUSH to the mount, which is not the data path under test.)"""
    url = pg_server.new_database(f"stall{random.randrange(10**9)}")
    with Daemon(tmp_path, db_url=url) as d:
        local = d.mnt / "local"
        image = local / "disk.img"
        with open(image, "wb") as f:
            f.truncate(128 * MiB)
        f = open(image, "r+b", buffering=0)  # noqa: SIM115 - held open across the stall
        written: dict[int, bytes] = {}
        timings: list[float] = []
        current: list[float] = []  # start of the data operation in flight, if any
        stop = threading.Event()

        def data_path() -> None:
            for i in range(64):  # a fresh MiB each time: the kernel's page cache cannot answer
                if stop.is_set():
                    return
                data = os.urandom(4096)
                current.append(time.monotonic())
                os.pwrite(f.fileno(), data, i * MiB)
                assert os.pread(f.fileno(), 4096, 64 * MiB + i * MiB) == bytes(4096)
                timings.append(time.monotonic() - current.pop())
                written[i * MiB] = data
                stop.wait(0.2)

        pids = postgres_pids(pg_server.data)
        meta: dict[str, dict[str, Any]] = {}
        try:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            stalled = time.monotonic()
            worker = in_thread(data_path)
            time.sleep(2.5)  # the heartbeat (every 2 s) has met the stopped server by now
            meta["mkdir"] = in_thread(lambda: (local / "vm-1").mkdir())
            meta["allocate"] = in_thread(lambda: Client(str(d.sock), timeout=60).call(
                "POST", "/v1/images/allocate", {"address": "local:new.img", "size": "1M"}))
            time.sleep(max(0.0, stalled + 10 - time.monotonic()))
            hung = time.monotonic() - current[0] if current else 0.0
            stop.set()
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        for box in [*meta.values(), worker]:
            box["thread"].join(max(1.0, box["start"] + 30 - time.monotonic()))
        f.close()
        assert not hung, f"a read/write of the open image was still waiting after {hung:.1f} s"
        assert "error" not in worker, worker.get("error")
        assert len(timings) > 20 and max(timings) < 1.0, timings
        for name, box in meta.items():
            assert not box["thread"].is_alive(), f"{name} still hangs 30 s after it started"
            assert box["took"] <= 15, f"{name} took {box['took']:.1f} s"
        if "error" not in meta["mkdir"]:  # succeeded once PostgreSQL was back
            assert (local / "vm-1").is_dir()
        if "error" not in meta["allocate"]:
            assert (local / "new.img").stat().st_size == MiB
        # afterwards: new things work, the open image's data is intact, its size right
        (local / "after.img").write_bytes(b"after")
        assert (local / "after.img").read_bytes() == b"after"
        ok(d.tm2("allocate", "local:after2.img", "1M"))
        assert image.stat().st_size == 128 * MiB
        with open(image, "rb") as g:
            for offset, data in written.items():
                g.seek(offset)
                assert g.read(4096) == data
        assert d.backends()["local"]["STATE"] == "READY"


# ---------------------------------------------------------------------- 3. full destination


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a filesystem that really fills up. Unmounted after the daemon stops
    (requested before `daemon`, so torn down after it)."""
    path = tmp_path / "small"
    tmpfs(path, "8m")
    try:
        yield path
    finally:
        untmpfs(path)


def test_a_full_destination_answers_no_space_on_a_cross_backend_clone(
        small_fs: Path, daemon: Daemon, tmp_path: Path) -> None:
    """Copying across backends wrote chunks in a nursery, so the destination's ENOSPC reached the
    API as an exception group: HTTP 500 "internal error" and a traceback in the log instead of
    507 no_space. The destination is thin-provisioned (OVERCOMMIT 4) on an 8 MiB filesystem, so
    the 16 MiB image passes the reservation and the disk fills during the copy."""
    add_dir_backend(daemon, "src", tmp_path / "src")
    add_dir_backend(daemon, "dst", small_fs / "dst", "--overcommit", "4")
    (daemon.mnt / "src" / "img").write_bytes(os.urandom(16 * MiB))
    refused = daemon.tm2("clone", "src:img", "dst:img")
    message = refused.stderr.decode()
    assert refused.returncode == 1, message
    assert re.search(r"no space|is full", message, re.I), message
    assert "internal error" not in message
    with raw_api(daemon) as api:
        r = api.post("/v1/images/clone", json={"src": "src:img", "dst": "dst:img"})
    assert (r.status_code, r.json()["error"]) == (507, "no_space"), r.text
    assert "Traceback" not in daemon.logs()
    assert os.listdir(daemon.mnt / "dst") == []  # nothing half-copied is left
    assert os.listdir(small_fs / "dst") == [".tm2fs-backend"]
    assert daemon.backends()["dst"]["STATE"] == "READY"


# ---------------------------------------------------------------------- 4. DISABLED, then enabled


def test_an_image_opened_while_disabled_is_writable_after_enable(daemon: Daemon) -> None:
    """An image first opened while its backend was DISABLED kept the read-only driver handle it
    got then: after `enable`, opening it for writing (the reader still open) succeeded, but
    every write answered EIO."""
    image = daemon.mnt / "local" / "disk.img"
    image.write_bytes(b"a" * 8192)
    ok(daemon.backend_cli("disable", "local"))
    with open(image, "rb") as reader:
        assert reader.read(4) == b"aaaa"
        ok(daemon.backend_cli("enable", "local"))
        with open(image, "r+b") as writer:
            writer.write(b"B" * 4096)
            writer.flush()
            os.fsync(writer.fileno())
    assert image.read_bytes() == b"B" * 4096 + b"a" * 4096
    assert daemon.backends()["local"]["STATE"] == "READY"


# ---------------------------------------------------------------------- 5. setgid folders


def test_clone_into_a_setgid_folder_takes_the_folder_s_group(daemon: Daemon) -> None:
    """Creating an image in a setgid folder gives it the folder's group (POSIX), but `tm2 clone`
    into that folder gave the clone the caller's group."""
    folder = daemon.mnt / "local" / "shared"
    folder.mkdir()
    os.chown(folder, 0, 4321)
    os.chmod(folder, 0o2775)
    ok(daemon.tm2("allocate", "local:base.img", "1M"))
    ok(daemon.tm2("allocate", "local:shared/allocated.img", "1M"))
    ok(daemon.tm2("clone", "local:base.img", "local:shared/cloned.img"))
    (folder / "created.img").write_bytes(b"x")
    groups = {p.name: p.stat().st_gid for p in folder.iterdir()}
    assert groups == {"allocated.img": 4321, "cloned.img": 4321, "created.img": 4321}


# ---------------------------------------------------------------------- 6. clone onto a name


class DirectoryWatch:
    """inotify (through libc) on one directory: which names were created in it, exactly, however
    briefly they lived."""

    IN_CREATE = 0x100
    IN_NONBLOCK = os.O_NONBLOCK

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), "inotify")

    def created(self) -> list[str]:
        names = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            pos = 0
            while pos < len(buf):
                _, _, _, length = struct.unpack_from("iIII", buf, pos)
                names.append(buf[pos + 16:pos + 16 + length].rstrip(b"\0").decode())
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def test_clone_onto_an_existing_name_copies_nothing(daemon: Daemon, tmp_path: Path) -> None:
    """A clone copied the whole source first and only then found that the destination name was
    taken: a large image took its full copy time (and space) to answer EEXIST. The refusal must
    come before any data is written: no key file appears in the destination backend's
    directory, not even for a moment (inside one backend and across two)."""
    local = daemon.mnt / "local"
    with open(local / "big.img", "wb") as f:
        for _ in range(16):
            f.write(os.urandom(4 * MiB))
    add_dir_backend(daemon, "other", tmp_path / "other")
    for backend, backend_dir in (("local", daemon.state_dir / "backends" / "local"),
                                 ("other", tmp_path / "other")):
        (daemon.mnt / backend / "taken.img").write_bytes(b"mine")
        keys = sorted(os.listdir(backend_dir))
        watch = DirectoryWatch(backend_dir)
        try:
            refused = daemon.tm2("clone", "local:big.img", f"{backend}:taken.img")
            created = watch.created()
        finally:
            watch.close()
        message = refused.stderr.decode()
        assert refused.returncode == 1 and "exists" in message, message
        assert created == [], f"the refused clone to {backend} wrote key file(s) {created} first"
        assert sorted(os.listdir(backend_dir)) == keys
        assert (daemon.mnt / backend / "taken.img").read_bytes() == b"mine"


# ---------------------------------------------------------------------- 7. one socket, one daemon


def test_a_second_daemon_does_not_take_a_live_daemon_s_socket(daemon: Daemon,
                                                               tmp_path: Path) -> None:
    """A starting daemon unlinked whatever was at its --socket path and bound its own: started
    by mistake with a running daemon's socket, it stole the CLIs' socket, and removed it when it
    stopped, leaving the first daemon unreachable. It must refuse to start, clearly."""
    (tmp_path / "second").mkdir()
    second = Daemon(tmp_path / "second")
    second.sock = daemon.sock
    started = False
    try:
        try:
            second.start(timeout=20)
            started = True
        except RuntimeError:
            pass
        client = Client(str(daemon.sock))
        try:
            health = client.call("GET", "/v1/health")
        finally:
            client.close()
    finally:
        second.stop()
    assert not started, "a second daemon started on the first one's socket"
    assert second.proc is not None and second.proc.returncode not in (0, None)
    assert "socket" in second.logs(), second.logs()  # says why it refused
    assert health["mountpoint"] == str(daemon.mnt)
    assert daemon.sock.exists()
    ok(daemon.backend_cli("list"))
    assert json.loads(ok(daemon.backend_cli("show", "local", "--json")))["NAME"] == "local"



# ---------------------------------------------------------------------- 8. lease handover

HANDOVERS = 50  # on the faulty code about 4 in 10 went wrong


@pytest.mark.slow
@pytest.mark.postgres
def test_the_next_writer_sees_the_final_size(pg_server: Any, tmp_path: Path) -> None:
    """Handing an image from one host to the next (a VM migrating): host A writes past the end and
    closes; host B, opening for writing, gets EBUSY until A's lease is gone. The instant B gets
    the lease it must see A's final size and bytes, on its mount and through its API: otherwise a
    VM on B finds its disk truncated and an append lands in the wrong place. The lease was released
    before the final persist, and B's mount answered from the size its kernel had cached (the
    other host's change notice arrives later). B spins on open while A closes, HANDOVERS times."""
    url = pg_server.new_database(f"handover{random.randrange(10**9)}")
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    a = Daemon(tmp_path / "A", db_url=url, host="hostA")
    b = Daemon(tmp_path / "B", db_url=url, host="hostB")
    try:
        a.start()
        b.start()
        on_a, on_b = a.mnt / "local" / "disk.img", b.mnt / "local" / "disk.img"
        on_a.write_bytes(b"")
        deadline = time.monotonic() + 5
        while not os.path.exists(on_b):
            assert time.monotonic() < deadline, "the image never showed on host B"
            time.sleep(0.01)
        api_b = Client(str(b.sock))
        stale: list[str] = []
        for r in range(1, HANDOVERS + 1):
            size, block = r * 4096, os.urandom(4096)
            deadline = time.monotonic() + 10
            while True:  # B's close of the last round releases its lease asynchronously
                try:
                    writer = open(on_a, "r+b")  # noqa: SIM115 - closed by the thread below
                    break
                except OSError as e:
                    assert e.errno == errno.EBUSY and time.monotonic() < deadline, e
                    time.sleep(0.005)
            writer.seek(size - 4096)
            writer.write(block)
            writer.flush()
            closing = in_thread(lambda w=writer: (time.sleep(0.05), w.close()))
            deadline = time.monotonic() + 10
            while True:
                try:
                    reader = open(on_b, "r+b")  # noqa: SIM115 - closed below
                    break
                except OSError as e:
                    assert e.errno == errno.EBUSY and time.monotonic() < deadline, e
            try:
                seen = os.fstat(reader.fileno()).st_size
                reader.seek(size - 4096)
                last = reader.read(4096)
                stored = api_b.call("GET", "/v1/images/size",
                                    params={"address": "local:disk.img"})["size"]
            finally:
                reader.close()
            closing["thread"].join(10)
            assert "error" not in closing, closing.get("error")
            if stored != size:
                stale.append(f"round {r}: B's API said {stored} bytes, A wrote {size}")
            elif seen != size or last != block:
                stale.append(f"round {r}: B's mount showed {seen} bytes "
                             f"({'right' if last == block else 'wrong'} last block), A wrote {size}")
        api_b.close()
        assert not stale, f"{len(stale)} of {HANDOVERS} handovers saw an old size: {stale[:4]}"
    finally:
        b.stop()
        a.stop()
