"""Path-based scripts on the real mount: old transfer-manager habits, other users, integrity.

The data-integrity checks drive one image through the mount with a hypothesis state machine
(writes, reads, truncates, fsyncs, reopen) against a bytearray model, then with fio's own
verification, and check that fsync'd data survives `kill -9` of the daemon.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import Daemon, service_on
from tm2fs.client import Client
from tm2fs.core import ROOT
from tm2fs.fs import CACHE_TIMEOUT

pytestmark = pytest.mark.mount
MiB = 2**20

LEGACY_SCRIPT = r"""
set -eu
DS=$1; SRC=$2; VM=$DS/42
mkdir -p "$VM"
chmod a+w "$VM"
cp -r "$SRC" "$VM/images"
ln -s images/base.img "$VM/disk.0"
dd if=/dev/zero of="$VM/disk.1" bs=1 count=1 seek=64M 2>/dev/null
mkfs.ext4 -q -F "$VM/disk.1"
dd if=/dev/zero of="$VM/disk.2" bs=1 count=1 seek=32M 2>/dev/null
mkswap "$VM/disk.2" >/dev/null
mv "$VM/images/base.img" "$VM/base-moved.img"
rm -f "$VM/disk.0"
ln -s base-moved.img "$VM/disk.0"
du -sm "$VM" >/dev/null
readlink "$VM/disk.0"
"""


def test_legacy_transfer_manager_script(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "images"
    src.mkdir()
    base = os.urandom(2 * MiB)
    (src / "base.img").write_bytes(base)
    (src / "context.iso").write_bytes(b"ctx" * 1000)
    ds = daemon.mnt / "local"
    out = subprocess.run(["bash", "-c", LEGACY_SCRIPT, "legacy", str(ds), str(src)],
                         capture_output=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "base-moved.img"
    vm = ds / "42"
    assert vm.stat().st_mode & 0o777 == 0o777
    assert (vm / "disk.0").read_bytes() == base
    assert (vm / "images" / "context.iso").read_bytes() == b"ctx" * 1000
    assert (vm / "disk.1").stat().st_size == 64 * MiB + 1
    fsck = subprocess.run(["e2fsck", "-n", "-f", str(vm / "disk.1")], capture_output=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout.decode()
    blkid = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", str(vm / "disk.2")],
                           capture_output=True, check=False)
    assert blkid.stdout.decode().strip() == "swap"
    backends = daemon.backends()
    assert (backends["local"]["NBIMAGE"], backends["local"]["NBVM"]) == (4, 1)
    subprocess.run(["rm", "-rf", str(vm)], check=True)  # the epilog
    backends = daemon.backends()
    assert (backends["local"]["NBIMAGE"], backends["local"]["NBVM"]) == (0, 0)
    assert os.listdir(daemon.state / "backends" / "local") == [".tm2fs-backend"]


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                          capture_output=True, timeout=30, check=False)


def test_other_users_follow_the_modes(public_daemon: Daemon) -> None:
    daemon = public_daemon
    local = daemon.mnt / "local"  # the default backend is 1777, a shared datastore like /tmp
    (local / "roots").write_bytes(b"root's")
    os.chmod(local / "roots", 0o644)
    made = as_nobody("dd", "if=/dev/zero", f"of={local}/mine", "bs=4096", "count=4")
    assert made.returncode == 0, made.stderr.decode()
    st = (local / "mine").stat()
    assert (st.st_uid, st.st_gid, st.st_size) == (65534, 65534, 16384)
    assert as_nobody("cat", str(local / "roots")).stdout == b"root's"
    refused = as_nobody("chmod", "666", str(local / "roots"))
    assert refused.returncode != 0 and b"not permitted" in refused.stderr.lower()
    refused = as_nobody("truncate", "-s", "0", str(local / "roots"))
    assert refused.returncode != 0 and b"permission denied" in refused.stderr.lower()
    assert (local / "roots").read_bytes() == b"root's"
    created = json.loads(daemon.tm2("info", "local:mine", "--json", user=65534).stdout)
    assert created["PATH"] == "local/mine"


def test_disabled_backend_is_read_only_on_the_mount(daemon: Daemon) -> None:
    (daemon.mnt / "local" / "img").write_bytes(b"data")
    assert daemon.backend_cli("disable", "local").returncode == 0
    assert (daemon.mnt / "local" / "img").read_bytes() == b"data"
    with pytest.raises(OSError) as e:
        (daemon.mnt / "local" / "img").write_bytes(b"new")
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        (daemon.mnt / "local" / "other").mkdir()
    assert e.value.errno == errno.EROFS
    assert daemon.backend_cli("enable", "local").returncode == 0
    (daemon.mnt / "local" / "img").write_bytes(b"new")


def test_error_backend_answers_eio_and_the_rest_works(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.backend_cli("create", "--name", "other", "--tm", "dir", "--tm-raw",
                              f"PATH={tmp_path}/other", "--timeout", "2").returncode == 0
    (daemon.mnt / "local" / "img").write_bytes(b"data")
    backing = daemon.state / "backends" / "local"
    backing.rename(backing.with_name("away"))
    deadline = 10
    end = time.monotonic() + deadline
    while daemon.backends()["local"]["STATE"] != "ERROR":
        assert time.monotonic() < end, "backend did not go to ERROR"
        time.sleep(0.2)
    with pytest.raises(OSError) as e:
        (daemon.mnt / "local" / "img").read_bytes()
    assert e.value.errno == errno.EIO
    (daemon.mnt / "other" / "fine").write_bytes(b"ok")  # the rest of the tree works
    assert (daemon.mnt / "other" / "fine").read_bytes() == b"ok"
    backing.with_name("away").rename(backing)
    end = time.monotonic() + deadline
    while daemon.backends()["local"]["STATE"] != "READY":
        assert time.monotonic() < end, "backend did not come back"
        time.sleep(0.2)
    assert (daemon.mnt / "local" / "img").read_bytes() == b"data"


# ---------------------------------------------------------------------- integrity


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory):
    with Daemon(tmp_path_factory.mktemp("integrity")) as d:
        yield d


SIZE = 4 * MiB


class ImageModel(RuleBasedStateMachine):
    """Random I/O on one image through the mount must match a bytearray, step by step."""

    mnt: Path

    @initialize()
    def open_image(self) -> None:
        self.path = self.mnt / "local" / f"model-{os.getpid()}-{id(self)}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.model = bytearray()

    @rule(offset=st.integers(0, SIZE), data=st.binary(min_size=1, max_size=300_000))
    def write(self, offset: int, data: bytes) -> None:
        assert os.pwrite(self.fd, data, offset) == len(data)
        if offset > len(self.model):
            self.model.extend(bytes(offset - len(self.model)))
        self.model[offset:offset + len(data)] = data

    @rule(offset=st.integers(0, SIZE), size=st.integers(1, 400_000))
    def read(self, offset: int, size: int) -> None:
        assert os.pread(self.fd, size, offset) == bytes(self.model[offset:offset + size])

    @rule(size=st.integers(0, SIZE))
    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    @rule()
    def fsync(self) -> None:
        os.fsync(self.fd)

    @precondition(lambda self: hasattr(self, "fd"))
    @rule()
    def reopen(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)

    @invariant()
    def size_matches(self) -> None:
        if hasattr(self, "fd"):
            assert os.fstat(self.fd).st_size == len(self.model)

    def teardown(self) -> None:
        if hasattr(self, "fd"):
            os.fsync(self.fd)
            os.lseek(self.fd, 0, os.SEEK_SET)
            assert os.read(self.fd, len(self.model) + 1) == bytes(self.model)
            os.close(self.fd)
            os.unlink(self.path)


@pytest.mark.slow
def test_random_io_matches_a_model(shared_daemon: Daemon) -> None:
    ImageModel.mnt = shared_daemon.mnt
    run_state_machine_as_test(ImageModel, settings=settings(
        max_examples=25, stateful_step_count=40, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck)))


@pytest.mark.slow
def test_fio_verify_through_the_mount(shared_daemon: Daemon) -> None:
    target = shared_daemon.mnt / "local" / "fio.img"
    out = subprocess.run(
        ["fio", "--name=verify", f"--filename={target}", "--size=64M", "--rw=randwrite",
         "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
         "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=1", "--output-format=json"],
        capture_output=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr.decode()
    job = json.loads(out.stdout)["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 64 * MiB
    target.unlink()


# ---------------------------------------------------------------------- everyday commands


@pytest.fixture
def tree(daemon: Daemon) -> Daemon:
    return daemon


def sh(*cmd: str | Path) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, f"{cmd}: {out.stderr.decode()}"
    return out.stdout.decode()


async def stored(tree: Daemon, address: str) -> dict:
    """What the pool store says, read by a second service on the same database."""
    async with service_on(tree.db_url, tree.state_dir, mountpoint=str(tree.mnt)) as service:
        return await service.image_info(address, ROOT)


async def counts(tree: Daemon) -> dict[str, tuple[int, int]]:
    async with service_on(tree.db_url, tree.state_dir, mountpoint=str(tree.mnt)) as service:
        return {b["NAME"]: (b["NBIMAGE"], b["NBVM"]) for b in await service.list_backends()}


async def test_cp_stat_truncate_rm(tree: Daemon, tmp_path: Path) -> None:
    local = tree.mnt / "local"
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(5 * MiB + 77))
    sh("cp", src, local / "a.img")
    sh("cmp", src, local / "a.img")
    assert sh("stat", "-c", "%s", local / "a.img").strip() == str(5 * MiB + 77)
    info = await stored(tree, "local:a.img")
    assert info["SIZE"] == 5 * MiB + 77
    assert (tree.state_dir / "backends" / "local" / info["KEY"]).read_bytes() == src.read_bytes()
    # truncate: a new image (allocate) and an existing one (grow, then shrink)
    sh("truncate", "-s", "10M", local / "new.img")
    assert sh("stat", "-c", "%s", local / "new.img").strip() == str(10 * MiB)
    assert (await stored(tree, "local:new.img"))["SIZE"] == 10 * MiB
    sh("truncate", "-s", "10M", local / "a.img")
    grown = (local / "a.img").read_bytes()
    assert grown[:5 * MiB + 77] == src.read_bytes() and grown[5 * MiB + 77:] == bytes(
        10 * MiB - 5 * MiB - 77)
    assert (await stored(tree, "local:a.img"))["SIZE"] == 10 * MiB
    sh("truncate", "-s", "1000", local / "a.img")
    assert (local / "a.img").read_bytes() == src.read_bytes()[:1000]
    # ls -l, du (blocks are what the backing files hold: new.img is one hole), df
    backing = tree.state_dir / "backends" / "local"
    held = {name: (backing / (await stored(tree, f"local:{name}"))["KEY"]).stat().st_blocks
            for name in ("a.img", "new.img")}
    assert held["a.img"] > 0 and held["new.img"] == 0
    listing = sh("ls", "-l", local).splitlines()
    assert listing[0] == f"total {sum((b + 1) // 2 for b in held.values())}"  # in 1 KiB blocks
    rows = sorted(line.split()[4:] for line in listing[1:])
    assert rows == [["1000", *rows[0][1:4], "a.img"], [str(10 * MiB), *rows[1][1:4], "new.img"]]
    assert sh("du", "-k", local / "new.img").split()[0] == "0"
    df = sh("df", "-k", "--output=source,size,avail", local).splitlines()[1].split()
    assert df[0] == "tm2fs" and int(df[1]) > 0 and int(df[2]) > 0
    # rm removes the image and its data
    sh("rm", local / "a.img", local / "new.img")
    assert os.listdir(local) == []
    assert os.listdir(tree.state_dir / "backends" / "local") == [".tm2fs-backend"]
    assert await counts(tree) == {"local": (0, 0)}


async def test_mv_inside_and_across_backends(tree: Daemon, tmp_path: Path) -> None:
    made = tree.backend_cli("create", "--name", "b2", "--tm", "dir",
                            "--tm-raw", f"PATH={tmp_path}/b2")
    assert made.returncode == 0, made.stderr
    local = tree.mnt / "local"
    data = os.urandom(3 * MiB + 5)
    (local / "a.img").write_bytes(data)
    key = (await stored(tree, "local:a.img"))["KEY"]
    # inside a backend: a metadata update, the data stays under its key
    sh("mkdir", local / "vm-1")
    sh("mv", local / "a.img", local / "vm-1" / "disk.0")
    info = await stored(tree, "local:vm-1/disk.0")
    assert (info["KEY"], info["SIZE"]) == (key, len(data))
    assert sorted(os.listdir(tree.state_dir / "backends" / "local")) == [".tm2fs-backend", key]
    # across backends: rename answers EXDEV, so mv copies and deletes by itself
    with pytest.raises(OSError) as e:
        os.rename(local / "vm-1" / "disk.0", tree.mnt / "b2" / "disk.0")
    assert e.value.errno == errno.EXDEV
    sh("mv", local / "vm-1" / "disk.0", tree.mnt / "b2" / "disk.0")
    assert (tree.mnt / "b2" / "disk.0").read_bytes() == data
    moved = await stored(tree, "b2:disk.0")
    assert moved["SIZE"] == len(data) and moved["KEY"] != key
    assert (tmp_path / "b2" / moved["KEY"]).read_bytes() == data
    assert os.listdir(tree.state_dir / "backends" / "local") == [".tm2fs-backend"]
    assert await counts(tree) == {"local": (0, 0), "b2": (1, 0)}


async def test_symlink_attaches_and_rm_detaches(tree: Daemon) -> None:
    local = tree.mnt / "local"
    sh("truncate", "-s", "1M", local / "disk.img")
    sh("mkdir", local / "vm-7")
    sh("ln", "-s", local / "disk.img", local / "vm-7" / "disk.0")  # absolute, into the mount
    assert await counts(tree) == {"local": (1, 1)}
    assert [a["PATH"] for a in (await stored(tree, "local:disk.img"))["ATTACHMENTS"]] == [
        f"{tree.mnt}/local/vm-7/disk.0"]
    assert sh("stat", "-L", "-c", "%s", local / "vm-7" / "disk.0").strip() == str(MiB)
    sh("ln", "-s", "../disk.img", local / "vm-7" / "disk.1")  # relative
    assert await counts(tree) == {"local": (1, 2)}
    sh("rm", local / "vm-7" / "disk.0")
    assert await counts(tree) == {"local": (1, 1)}
    sh("rm", "-rf", local / "vm-7")
    assert await counts(tree) == {"local": (1, 0)}
    assert (await stored(tree, "local:disk.img"))["ATTACHMENTS"] == []


def test_api_changes_reach_the_kernel_before_its_cache_expires(daemon: Daemon) -> None:
    """The kernel caches attributes for CACHE_TIMEOUT; `tm2 resize` goes through the API, not
    the kernel, so only the fs layer's listener (invalidate_inode) can make it visible sooner."""
    img = daemon.mnt / "local" / "img"
    img.write_bytes(b"x" * 10)
    size, checked = 10, 0
    api = Client(str(daemon.sock))  # in-process: a tm2 process start could outlast the cache
    for new in (MiB, 2 * MiB, 3 * MiB):
        t0 = time.monotonic()
        assert img.stat().st_size == size  # now in the kernel's attribute cache
        api.call("POST", "/v1/images/resize", {"address": "local:img", "size": new})
        size = new
        if time.monotonic() > t0 + 0.6 * CACHE_TIMEOUT:
            continue  # this round was too slow to show anything
        seen = img.stat().st_size
        while seen != new and time.monotonic() < t0 + 0.9 * CACHE_TIMEOUT:
            time.sleep(0.01)  # the invalidation runs in a worker thread, racing the reply
            seen = img.stat().st_size
        assert seen == new, "the kernel still shows the size it cached before the resize"
        checked += 1
    api.close()
    assert checked, "every resize outlasted the kernel's cache timeout: nothing was shown"


def _requests(daemon: Daemon) -> dict[str, float]:
    """FUSE requests served so far, by operation (the daemon's histogram counts)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.sock)),
                      base_url="http://tm2fs", timeout=30) as http:
        text = http.get("/metrics").text
    return {s.labels["operation"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "tm2fs_fuse_request_duration_seconds"
            for s in family.samples if s.name.endswith("_count")}


def test_a_write_is_one_request_and_api_writes_show_on_an_open_file(daemon: Daemon) -> None:
    """No page cache on the mount (fs.py, direct_io): a buffered write(2) reaches the daemon as
    one WRITE (through the page cache the kernel asked GETXATTR security.capability before each
    one), and what the API writes, a file held open reads at once."""
    img = daemon.mnt / "local" / "img"
    img.write_bytes(bytes(64 * 4096))
    fd = os.open(img, os.O_RDWR)
    try:
        before = _requests(daemon)
        for i in range(64):
            assert os.pwrite(fd, b"x" * 4096, i * 4096) == 4096
        after = _requests(daemon)
        assert after["write"] - before["write"] == 64
        assert after.get("getxattr", 0) == before.get("getxattr", 0)
        assert os.pread(fd, 4, 0) == b"xxxx"
        assert daemon.tm2("write", "local:img", input=b"API!").returncode == 0
        assert os.pread(fd, 4, 0) == b"API!"
    finally:
        os.close(fd)
    with open(img, "rb") as f:  # the cost, stated in fs.py: no shared mappings
        with pytest.raises(OSError) as e:
            mmap.mmap(f.fileno(), 4, mmap.MAP_SHARED, mmap.PROT_READ)
        assert e.value.errno == errno.ENODEV
        assert mmap.mmap(f.fileno(), 4, mmap.MAP_PRIVATE, mmap.PROT_READ)[:4] == b"API!"


@pytest.mark.slow
@pytest.mark.logs_ok
def test_a_hung_backend_turns_to_error_and_never_hangs_the_daemon(tmp_path: Path) -> None:
    """A `dir` backend on a filesystem whose server stops answering (here: another tm2fs mount,
    SIGSTOPped) answers EIO within its TIMEOUT, and the rest of the tree keeps working."""
    inner, outer = Daemon(tmp_path / "inner"), Daemon(tmp_path / "outer")
    for d in (inner, outer):
        d.tmp.mkdir()
    inner.start()
    try:
        outer.start()
        store = inner.mnt / "local" / "store"
        store.mkdir()
        made = outer.backend_cli("create", "--name", "remote", "--tm", "dir", "--tm-raw",
                                 f"PATH={store}", "--timeout", "2")
        assert made.returncode == 0, made.stderr.decode()
        (outer.mnt / "remote" / "img").write_bytes(b"far away")
        os.kill(inner.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            cat = subprocess.run(["cat", str(outer.mnt / "remote" / "img")], capture_output=True,
                                 timeout=30, check=False)
            assert cat.returncode != 0 and b"Input/output error" in cat.stderr
            assert time.monotonic() - t0 < 10
            assert outer.backends()["remote"]["STATE"] == "ERROR"
            (outer.mnt / "local" / "near").write_bytes(b"fine")  # the rest of the tree works
            assert (outer.mnt / "local" / "near").read_bytes() == b"fine"
        finally:
            os.kill(inner.proc.pid, signal.SIGCONT)
        end = time.monotonic() + 20
        while outer.backends()["remote"]["STATE"] != "READY":
            assert time.monotonic() < end, "the backend did not come back"
            time.sleep(0.2)
        assert (outer.mnt / "remote" / "img").read_bytes() == b"far away"
    finally:
        outer.stop()
        inner.stop()
