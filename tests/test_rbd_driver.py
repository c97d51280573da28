"""The `rbd` driver's own parts, against a real one-node Ceph cluster: TM_RAW, librados errors,
pool figures, the aio data path, COW clones and their depth, the trash, namespaces, a dead OSD.
The contract (allocate, resize, data path, clone, keys) is test_driver_conformance.py.

One throwaway cluster for the session (tests/servers/ceph.py, bluestore on a sparse file, about
7 s to start). The fault test kills the OSD and starts it again, so it runs last.
"""

from __future__ import annotations

import errno
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import rados
import rbd
import trio

from tests.servers.ceph import WATCH_TIMEOUT, CephCluster, _free_port
from tm2fs.drivers.rbd import CLONE_SNAP, RbdDriver, os_error
from tm2fs.errors import InvalidArgument

pytestmark = [pytest.mark.ceph, pytest.mark.slow]

MIB = 2**20
GIB = 2**30


def make_driver(cluster: CephCluster, tmp_path: Path, **extra: str) -> RbdDriver:
    raw = RbdDriver.validate({"POOL": cluster.pool, "CEPH_CONF": cluster.conf_path, **extra},
                             tmp_path, "ceph")
    return RbdDriver(raw, tmp_path)


@pytest.fixture
async def driver(ceph_cluster: CephCluster, tmp_path: Path) -> AsyncIterator[RbdDriver]:
    d = make_driver(ceph_cluster, tmp_path, CONNECT_TIMEOUT="5")
    await d.start()
    yield d
    await d.stop()


def key() -> str:
    return uuid.uuid4().hex


def parent_of(d: RbdDriver, k: str) -> str | None:
    with rbd.Image(d.ioctx, k, read_only=True) as image:
        try:
            return image.get_parent_image_spec()["image_name"]
        except rbd.ImageNotFound:
            return None


def own_extents(d: RbdDriver, k: str) -> list[tuple[int, int, bool]]:
    """The extents an image holds itself (not through its parent)."""
    found: list[tuple[int, int, bool]] = []
    with rbd.Image(d.ioctx, k, read_only=True) as image:
        image.diff_iterate(0, image.size(), None, lambda o, n, e: found.append((o, n, e)),
                           include_parent=False)
    return found


def trashed(d: RbdDriver) -> list[str]:
    return [e["name"] for e in rbd.RBD().trash_list(d.ioctx)]


async def write(d: RbdDriver, k: str, offset: int, data: bytes) -> None:
    h = await d.open(k, writable=True)
    await h.apwrite(offset, data)
    await h.aflush()
    await h.aclose()


async def read(d: RbdDriver, k: str, offset: int, size: int) -> bytes:
    h = await d.open(k, writable=False)
    try:
        return await h.apread(offset, size)
    finally:
        await h.aclose()


# ---------------------------------------------------------------------- TM_RAW


def test_validate_fills_defaults_and_refuses_bad_values(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon host = v2:127.0.0.1:1\n")
    raw = RbdDriver.validate({"pool": "p", "CEPH_CONF": str(conf)}, tmp_path, "b")
    assert raw == {"POOL": "p", "CEPH_CONF": str(conf), "CLIENT_ID": "admin", "MAX_CLONE_DEPTH": "8",
                   "CONNECT_TIMEOUT": "10"}
    assert RbdDriver.validate({"POOL": "p", "CEPH_CONF": str(conf), "CLIENT_ID": "client.tm2fs"},
                              tmp_path, "b")["CLIENT_ID"] == "tm2fs"
    cases = [
        ({"CEPH_CONF": str(conf)}, "POOL is missing"),
        ({"POOL": "", "CEPH_CONF": str(conf)}, "POOL is missing"),
        ({"POOL": "a/b", "CEPH_CONF": str(conf)}, "not a plain pool name"),
        ({"POOL": "p", "CEPH_CONF": str(tmp_path / "none.conf")}, "cannot read CEPH_CONF"),
        ({"POOL": "p", "CEPH_CONF": "ceph.conf"}, "not an absolute path"),
        ({"POOL": "p", "CEPH_CONF": str(conf), "KEYRING": str(tmp_path / "no.keyring")},
         "cannot read KEYRING"),
        ({"POOL": "p", "CEPH_CONF": str(conf), "MAX_CLONE_DEPTH": "-1"}, "MAX_CLONE_DEPTH"),
        ({"POOL": "p", "CEPH_CONF": str(conf), "CONNECT_TIMEOUT": "soon"}, "CONNECT_TIMEOUT"),
        ({"POOL": "p", "CEPH_CONF": str(conf), "CONNECT_TIMEOUT": "0"}, "CONNECT_TIMEOUT"),
        ({"POOL": "p", "CEPH_CONF": str(conf), "NAMESPACE": "x y"}, "NAMESPACE"),
        ({"POOL": "p", "CEPH_CONF": str(conf), "MON": "x"}, "unknown TM_RAW attribute"),
    ]
    for bad, message in cases:
        with pytest.raises(InvalidArgument, match=message) as e:
            RbdDriver.validate(bad, tmp_path, "b")
        assert e.value.hint


def test_librbd_errors_become_oserrors_the_service_understands() -> None:
    cases = [
        (rbd.ImageNotFound, errno.ENOENT, errno.ENOENT), (rbd.ImageExists, errno.EEXIST, errno.EEXIST),
        (rbd.ImageBusy, errno.EBUSY, errno.EBUSY), (rbd.ImageHasSnapshots, errno.ENOTEMPTY, errno.EBUSY),
        (rbd.Timeout, errno.ETIMEDOUT, errno.ETIMEDOUT), (rados.TimedOut, errno.ETIMEDOUT, errno.ETIMEDOUT),
        (rados.ConnectionShutdown, errno.ESHUTDOWN, errno.ENOTCONN), (rbd.IOError, errno.EIO, errno.EIO),
        (rbd.NoSpace, errno.ENOSPC, errno.ENOSPC),
    ]
    for cls, raised, expected in cases:
        e = os_error(cls("detail", errno=raised), "remove k")
        assert isinstance(e, OSError) and e.errno == expected, cls
        assert str(e.strerror).startswith("remove k: ") and "[errno" not in str(e.strerror)
    assert os_error(rbd.Error("plain"), "x").errno == errno.EIO


async def test_unknown_pool_and_namespace_are_named(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    d = make_driver(ceph_cluster, tmp_path, POOL="nosuchpool")
    with pytest.raises(OSError, match="pool 'nosuchpool' does not exist") as e:
        await d.start()
    assert e.value.errno == errno.ENOENT
    d = make_driver(ceph_cluster, tmp_path, NAMESPACE="nosuchns")
    with pytest.raises(OSError, match="namespace 'nosuchns' does not exist") as e:
        await d.start()
    assert e.value.errno == errno.ENOENT


async def test_unreachable_monitor_fails_within_the_timeout(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon host = v2:127.0.0.1:{_free_port()}\nauth client required = none\n")
    raw = RbdDriver.validate({"POOL": "tm2fs", "CEPH_CONF": str(conf), "CONNECT_TIMEOUT": "2"}, tmp_path, "b")
    d = RbdDriver(raw, tmp_path)
    t = time.monotonic()
    with trio.fail_after(10), pytest.raises(OSError, match=r"no monitor .* answered within 2s") as e:
        await d.start()
    assert e.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - t < 2 + 3


# ---------------------------------------------------------------------- capacity and images


async def test_monitor_figures(driver: RbdDriver, ceph_cluster: CephCluster) -> None:
    """The pool's share of the cluster; a quota is the total; the cluster and pool are the
    storage (backends on one pool count it once in `df` on the mount)."""
    cap = await driver.monitor()
    assert cap.total <= ceph_cluster.osd_bytes
    fsid = driver.cluster.get_fsid()
    assert len(fsid) == 36 and cap.storage == f"ceph:{fsid}:{ceph_cluster.pool}"
    ceph_cluster.ceph("osd", "pool", "set-quota", ceph_cluster.pool, "max_bytes", str(GIB))
    try:
        cap = await driver.monitor()
        assert cap.total == GIB and cap.free is not None and cap.free <= GIB
    finally:
        ceph_cluster.ceph("osd", "pool", "set-quota", ceph_cluster.pool, "max_bytes", "0")
    assert (await driver.monitor()).total != GIB


async def test_keys_are_only_key_like_images(driver: RbdDriver) -> None:
    k = key()
    await driver.allocate(k, MIB)
    rbd.RBD().create(driver.ioctx, "not-a-key", MIB, old_format=False)
    try:
        keys = await driver.keys()
        assert k in keys and "not-a-key" not in keys
    finally:
        rbd.RBD().remove(driver.ioctx, "not-a-key")
        await driver.delete(k)


# ---------------------------------------------------------------------- data path


async def test_data_path_uses_no_worker_thread(driver: RbdDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads, writes inside the image and flushes are librbd aio woken through the TrioToken."""
    k = key()
    await driver.allocate(k, MIB)
    h = await driver.open(k, writable=True)

    def no_threads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data path hopped to a thread")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_threads)
    await h.apwrite(4095, b"x" * 3)
    await h.aflush()
    assert await h.apread(4094, 5) == b"\0xxx\0"
    monkeypatch.undo()
    await h.aclose()
    await driver.delete(k)


async def test_concurrent_requests_each_get_their_own_data(driver: RbdDriver) -> None:
    """128 requests in flight on one handle, as the kernel splits a 4 MiB O_DIRECT write into
    128 KiB pieces: each completion reaches the task that made it (a lost one sleeps for ever)."""
    k = key()
    await driver.allocate(k, 16 * MIB)
    h = await driver.open(k, writable=True)
    got: dict[int, bytes] = {}

    async def one(n: int) -> None:
        await h.apwrite(n * 128 * 1024, (b"block %d" % n).ljust(128 * 1024, b"."))
        got[n] = await h.apread(n * 128 * 1024, 16)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in range(128):
                nursery.start_soon(one, n)
    assert got == {n: (b"block %d" % n).ljust(16, b".") for n in range(128)}
    await h.aclose()
    await driver.delete(k)


async def test_read_only_handle_refuses_writes_and_blocking_variants_work(driver: RbdDriver) -> None:
    k = key()
    await driver.allocate(k, MIB)
    h = await driver.open(k, writable=True)
    await trio.to_thread.run_sync(h.pwrite, 10, b"sync")
    await trio.to_thread.run_sync(h.flush)
    assert await trio.to_thread.run_sync(h.pread, 8, 8) == b"\0\0sync\0\0"
    await trio.to_thread.run_sync(h.close)
    ro = await driver.open(k, writable=False)
    with pytest.raises(OSError) as e:
        await ro.apwrite(0, b"no")
    assert e.value.errno == errno.EROFS
    await ro.aclose()
    await driver.delete(k)


# ---------------------------------------------------------------------- clones


async def test_clone_is_copy_on_write(driver: RbdDriver) -> None:
    """A clone costs no data and no time, and then holds only what it wrote itself."""
    parent, child = key(), key()
    await driver.allocate(parent, 10 * GIB)
    await write(driver, parent, 9 * GIB, b"parent-tail")
    t = time.monotonic()
    await driver.clone(parent, child)
    took = time.monotonic() - t
    assert took < 0.5, f"a 10 GiB clone took {took:.2f}s"
    assert own_extents(driver, child) == []  # the clone holds no data of its own
    assert parent_of(driver, child) == parent
    assert await read(driver, child, 9 * GIB, 11) == b"parent-tail"  # read through the parent
    await write(driver, child, 0, b"CHILD")
    assert all(offset < 4 * MIB for offset, _, _ in own_extents(driver, child))  # only what it wrote
    await driver.delete(child)
    with rbd.Image(driver.ioctx, parent, read_only=True) as image:
        assert list(image.list_snaps()) == []  # the clone's snapshot went with it
    await driver.delete(parent)


async def test_delete_of_a_parent_waits_in_the_trash_for_its_clones(driver: RbdDriver) -> None:
    p, c, g = key(), key(), key()
    await driver.allocate(p, 64 * MIB)
    await write(driver, p, 0, b"from p")
    await driver.clone(p, c)
    await driver.clone(c, g)
    await driver.delete(p)  # has a clone: gone from the backend's view, kept for the clone
    keys = await driver.keys()
    assert p not in keys and {c, g} <= set(keys)
    with pytest.raises(OSError) as e:
        await driver.size(p)
    assert e.value.errno == errno.ENOENT
    assert p in trashed(driver)
    assert await read(driver, c, 0, 6) == b"from p"
    await driver.delete(c)  # has a clone too
    assert {p, c} <= set(trashed(driver))
    assert await read(driver, g, 0, 6) == b"from p"
    await driver.delete(g)  # the last one: the whole chain goes
    assert not {p, c, g} & set(trashed(driver))
    assert not {p, c, g} & set(await driver.keys())


async def test_keys_sweeps_parents_left_in_the_trash(driver: RbdDriver) -> None:
    p, c = key(), key()
    await driver.allocate(p, MIB)
    await driver.clone(p, c)
    await driver.delete(p)
    rbd.RBD().remove(driver.ioctx, c)  # as if the daemon died between the two steps
    assert p in trashed(driver)
    assert not {p, c} & set(await driver.keys())
    assert p not in trashed(driver)


async def test_namespace_keeps_its_own_images(driver: RbdDriver, ceph_cluster: CephCluster,
                                              tmp_path: Path) -> None:
    ceph_cluster.rbd("namespace", "create", "--pool", ceph_cluster.pool, "--namespace", "ns1")
    ns = make_driver(ceph_cluster, tmp_path, NAMESPACE="ns1")
    await ns.start()
    a, b = key(), key()
    await ns.allocate(a, MIB)
    await write(ns, a, 0, b"in ns1")
    await ns.clone(a, b)
    assert {a, b} <= set(await ns.keys())
    assert not {a, b} & set(await driver.keys())
    with pytest.raises(OSError) as e:
        await driver.size(a)
    assert e.value.errno == errno.ENOENT
    assert await read(ns, b, 0, 6) == b"in ns1"
    await ns.delete(a)
    await ns.delete(b)
    assert not {a, b} & set(await ns.keys())
    await ns.stop()


async def test_clones_deeper_than_max_clone_depth_are_flattened(ceph_cluster: CephCluster,
                                                                tmp_path: Path) -> None:
    d = make_driver(ceph_cluster, tmp_path, MAX_CLONE_DEPTH="2")
    await d.start()
    a, b, c, e = key(), key(), key(), key()
    await d.allocate(a, 8 * MIB + 5)
    await write(d, a, 8 * MIB, b"a-data")
    await d.clone(a, b)
    await d.clone(b, c)
    await d.clone(c, e)  # depth 3 > 2
    assert parent_of(d, b) == a and parent_of(d, c) == b
    assert parent_of(d, e) is None
    assert await read(d, e, 8 * MIB, 6) == b"a-data"
    assert own_extents(d, e)  # it holds its data itself now
    with rbd.Image(d.ioctx, c, read_only=True) as image:
        assert not any(s["name"] == CLONE_SNAP + e for s in image.list_snaps())
    for k in (a, b, c, e):
        await d.delete(k)
    assert not {a, b, c, e} & set(trashed(d))
    zero = make_driver(ceph_cluster, tmp_path, MAX_CLONE_DEPTH="0")
    await zero.start()
    f, g = key(), key()
    await zero.allocate(f, MIB)
    await zero.clone(f, g)
    assert parent_of(zero, g) is None
    await zero.delete(f)
    await zero.delete(g)
    await zero.stop()
    await d.stop()


async def test_delete_refuses_foreign_snapshots(driver: RbdDriver) -> None:
    k = key()
    await driver.allocate(k, MIB)
    with rbd.Image(driver.ioctx, k) as image:
        image.create_snap("backup")
    with pytest.raises(OSError, match="snapshots tm2fs did not make: backup") as e:
        await driver.delete(k)
    assert e.value.errno == errno.EBUSY
    with rbd.Image(driver.ioctx, k) as image:
        image.remove_snap("backup")
    await driver.delete(k)


# ---------------------------------------------------------------------- faults (last: kills the OSD)


async def test_dead_osd_fails_in_time_and_recovers(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    timeout = 3.0
    d = make_driver(ceph_cluster, tmp_path, CONNECT_TIMEOUT=f"{timeout:g}")
    await d.start()
    k = key()
    await d.allocate(k, 16 * MIB)
    h = await d.open(k, writable=True)
    await h.apwrite(MIB, b"survives")
    await h.aflush()
    ceph_cluster.stop_osd()
    try:
        for what in ("read", "monitor"):
            t = time.monotonic()
            with trio.fail_after(timeout + 5), pytest.raises(OSError) as e:
                if what == "read":
                    await h.apread(MIB, 8)
                else:
                    await d.monitor()
            assert e.value.errno in (errno.ETIMEDOUT, errno.EIO), what
            assert time.monotonic() - t < timeout + 3, what
        t = time.monotonic()
        with trio.move_on_after(1):  # a control call is abandonable: the loop is never stalled
            await d.size(k)
        assert time.monotonic() - t < 1.5
    finally:
        await trio.to_thread.run_sync(ceph_cluster.start_osd)
    with trio.fail_after(30):
        assert await h.apread(MIB, 8) == b"survives"
        await h.apwrite(2 * MIB, b"again")
        await h.aflush()
        cap = await d.monitor()
        assert cap.total and cap.total > 0
        await h.aclose()
        assert await read(d, k, 2 * MIB, 5) == b"again"
    # librbd re-registered the handle's watch after the restart, but could not drop the old one
    # while the OSD was away: the image stays busy until the OSD expires it (10 s in this cluster)
    with trio.fail_after(WATCH_TIMEOUT + 10):
        while True:
            try:
                await d.delete(k)
                break
            except OSError as e:
                assert e.errno == errno.EBUSY and "watch" in str(e)
                await trio.sleep(0.5)
    assert k not in await d.keys()
    await d.stop()
