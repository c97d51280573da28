"""One contract, every driver: the checks of tm2fs/drivers/base.py, run against each driver.

dir (a temp directory; data calls inline, and in worker threads as on NFS), legacy (both shipped
script sets, on localhost), rbd (a real one-node Ceph, one RADOS namespace for the module), iscsi
(a real tgtd, its own IQN_PREFIX and STORE per test), memory, and memory-core: the memory driver
with its optional capabilities taken away, to hold a core-only driver's refusals to the contract
too. Every test starts on empty storage and its images are deleted afterwards. What is particular
to one driver (COW depth, the trash, tgtd restarts, the scripts...) stays in its own test file.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import random
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.randomio import random_io_handle
from tm2fs.drivers import BUILTIN, driver_class
from tm2fs.drivers.base import (
    OPTIONAL,
    Cloning,
    Driver,
    Handle,
    HypervisorSource,
    NativeSource,
    Resizable,
    Sized,
    supports,
)
from tm2fs.drivers.dir import DirDriver
from tm2fs.drivers.iscsi import IscsiDriver
from tm2fs.drivers.legacy import LegacyDriver
from tm2fs.drivers.memory import MemoryDriver
from tm2fs.errors import InvalidArgument, Tm2Error, Unsupported

MIB = 2**20
GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]


class CoreMemory(MemoryDriver):
    """The memory driver with only the core: every optional capability as `Driver` leaves it."""

    cheap_clone = False
    size = Driver.size
    resize = Driver.resize
    clone = Driver.clone
    local_path = Driver.local_path
    source = Driver.source


class ThreadedDir(DirDriver):
    """dir as on a filesystem that can hang (NFS, CephFS...): every data call in a worker thread."""

    async def start(self) -> None:
        await super().start()
        self.remote = True


@dataclass(frozen=True)
class Kind:
    id: str
    #: monitor's USED follows writes at once (rbd's comes from the cluster's `ceph df`, later)
    prompt_usage: bool = True
    #: local_path names a file holding the image's bytes
    native: bool = False
    #: has every optional capability (memory-core has none: test_optional_capabilities_*)
    complete: bool = True


SLOW_CEPH = [pytest.mark.ceph, pytest.mark.slow]
SLOW_ISCSI = [pytest.mark.iscsi, pytest.mark.slow]
KINDS = [
    pytest.param(Kind("dir", native=True), id="dir"),
    pytest.param(Kind("dir-threaded", native=True), id="dir-threaded"),
    pytest.param(Kind("legacy", native=True), id="legacy"),
    pytest.param(Kind("legacy-ssh", native=True), id="legacy-ssh"),
    pytest.param(Kind("rbd", prompt_usage=False), id="rbd", marks=SLOW_CEPH),
    pytest.param(Kind("iscsi"), id="iscsi", marks=SLOW_ISCSI),
    pytest.param(Kind("memory"), id="memory"),
    pytest.param(Kind("memory-core", complete=False), id="memory-core"),
]
COMPLETE = [p for p in KINDS if p.values[0].complete]


def key() -> str:
    """As the core makes them (and the iscsi driver requires them): 32 hex digits."""
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------ the drivers


@pytest.fixture(scope="module")
def tgt() -> Iterator[object]:
    from tests.servers.tgt import TgtServer

    with TgtServer() as server:
        yield server


@pytest.fixture(scope="module")
def rbd_namespace(ceph_cluster: object) -> str:
    """A RADOS namespace of the session's pool for this module, so keys() sees only its images."""
    name = f"conformance{os.getpid()}"
    ceph_cluster.rbd("namespace", "create", "--pool", ceph_cluster.pool, "--namespace", name)
    return name


def make(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Driver:
    state = tmp_path / "state"
    if kind in ("dir", "dir-threaded"):
        cls = ThreadedDir if kind == "dir-threaded" else DirDriver
        return cls(DirDriver.validate({"PATH": str(tmp_path / "images")}, state, "b"), state)
    if kind in ("legacy", "legacy-ssh"):
        conf = "tm_ssh.conf" if kind == "legacy-ssh" else "tm_shared.conf"
        raw = LegacyDriver.validate({"TM_CONF": conf, "PATH": str(tmp_path / "images")}, state, "b")
        return LegacyDriver(raw, state)
    if kind == "rbd":
        from tm2fs.drivers.rbd import RbdDriver

        cluster = request.getfixturevalue("ceph_cluster")
        raw = {"POOL": cluster.pool, "CEPH_CONF": cluster.conf_path, "CONNECT_TIMEOUT": "10",
               "NAMESPACE": request.getfixturevalue("rbd_namespace")}
        return RbdDriver(RbdDriver.validate(raw, state, "b"), state)
    if kind == "iscsi":
        server = request.getfixturevalue("tgt")
        raw = {"PORTAL": server.portal, "STORE": str(tmp_path / "store"), "TIMEOUT": "5",
               "TGT_CONTROL": str(server.control), "IQN_PREFIX": f"iqn.2026-11.org.tm2fs:c{key()[:12]}"}
        return IscsiDriver(IscsiDriver.validate(raw, state, "b"), state)
    cls = CoreMemory if kind == "memory-core" else MemoryDriver
    return cls(MemoryDriver.validate({"CAPACITY": "4G"}, state, "b"), state)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    return request.param


@pytest.fixture
async def driver(kind: Kind, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Driver]:
    """A started driver on empty storage; whatever the test left is deleted afterwards."""
    d = make(kind.id, request, tmp_path)
    await d.start()
    assert await d.keys() == []
    yield d
    for k in await d.keys() or []:
        await d.delete(k)
    assert await d.keys() == []
    await d.stop()
    if isinstance(d, IscsiDriver):
        assert d.sessions() == 0, "the test leaked initiator sessions"


@contextmanager
def fails_with(code: int | None = None) -> Iterator[pytest.ExceptionInfo]:
    """An OSError, or a Tm2Error (which carries an errno too), with errno `code` if given."""
    with pytest.raises((OSError, Tm2Error)) as e:
        yield e
    if code is not None:
        assert e.value.errno == code, e.value


async def write(d: Driver, k: str, *pieces: tuple[int, bytes]) -> None:
    h = await d.open(k, writable=True)
    try:
        for offset, data in pieces:
            assert await h.apwrite(offset, data) == len(data)
        await h.aflush()
    finally:
        await h.aclose()


async def read(d: Driver, k: str, offset: int, size: int) -> bytes:
    h = await d.open(k, writable=False)
    try:
        return await h.apread(offset, size)
    finally:
        await h.aclose()


# ------------------------------------------------------------------------------ registry and contract


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_driver_is_found_by_name_and_implements_the_core(name: str) -> None:
    cls = driver_class(name)
    assert cls.name == name and issubclass(cls, Driver)
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves core methods out"


def test_unknown_driver_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(InvalidArgument, match="unknown TM 'nope'") as e:
        driver_class("nope")
    for name in BUILTIN:
        assert name in e.value.hint


def test_every_builtin_driver_is_an_entry_point_too() -> None:
    """Installed, drivers are found through the `tm2fs.drivers` entry points: the same list."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["tm2fs.drivers"] == BUILTIN


def test_a_driver_without_a_core_method_cannot_be_made(tmp_path: Path) -> None:
    class Forgetful(Driver):
        name = "forgetful"

        @classmethod
        def validate(cls, tm_raw: dict, state_dir: Path, backend_name: str) -> dict:
            return tm_raw

    with pytest.raises(TypeError, match=r"allocate.*delete.*keys.*monitor.*open"):
        Forgetful({}, tmp_path)


async def test_optional_capabilities_work_or_are_refused_alike(driver: Driver, kind: Kind) -> None:
    k, other = key(), key()
    await driver.allocate(k, MIB)
    assert {supports(driver, c) for c in OPTIONAL} <= {True, False}
    if not supports(driver, Sized):
        with pytest.raises(Unsupported, match="size is not supported"):
            await driver.size(k)
    if not supports(driver, Resizable):
        with pytest.raises(Unsupported, match="resize is not supported"):
            await driver.resize(k, 2 * MIB)
    if not supports(driver, Cloning):
        assert not driver.cheap_clone
        with pytest.raises(Unsupported, match="clone is not supported"):
            await driver.clone(k, other)
        assert await driver.keys() == [k]
    path = driver.local_path(k)
    assert (path is not None) == kind.native
    if not supports(driver, NativeSource):
        assert path is None
    source = driver.source(k)  # how a hypervisor reaches it natively: the file where there is one
    if not supports(driver, HypervisorSource):
        assert source is None
    if path is not None:
        assert source == {"type": "file", "path": path}
    elif source is not None:
        assert source["type"] in ("rbd", "iscsi") and k in json.dumps(source)
    if path is not None:  # the image's bytes are there
        assert os.stat(path).st_size == MIB and os.stat(path).st_blocks == 0  # and thin
        await write(driver, k, (100, b"native"))
        with open(path, "rb") as f:
            assert f.read() == bytes(100) + b"native" + bytes(MIB - 106)
    with pytest.raises(ValueError):
        supports(driver, Handle)


# ------------------------------------------------------------------------------ allocate, keys, delete


async def test_allocate_is_thin_exact_and_exclusive(driver: Driver, kind: Kind) -> None:
    big, odd, empty = key(), key(), key()
    before = await driver.monitor()
    await driver.allocate(big, 10 * GIB)
    await driver.allocate(odd, 3 * MIB + 5)
    await driver.allocate(empty, 0)
    if kind.prompt_usage:
        assert (await driver.monitor()).used == before.used  # thin: nothing written yet
    if supports(driver, Sized):
        assert await driver.size(big) == 10 * GIB
        assert await driver.size(odd) == 3 * MIB + 5
        assert await driver.size(empty) == 0
    assert sorted(await driver.keys()) == sorted([big, odd, empty])
    h = await driver.open(odd, writable=True)
    assert isinstance(h, Handle)
    assert await h.apread(0, 4 * MIB) == bytes(3 * MIB + 5)  # zeros, and reads stop at the end
    assert await h.apread(3 * MIB + 5, 10) == b""
    assert await h.apread(10 * MIB, 10) == b""
    await h.apwrite(3 * MIB, b"keep")
    await h.aclose()
    with fails_with(errno.EEXIST):
        await driver.allocate(odd, MIB)
    assert await read(driver, odd, 3 * MIB - 1, 100) == b"\0keep\0"  # the old image as it was
    if supports(driver, Sized):
        assert await driver.size(odd) == 3 * MIB + 5
    h = await driver.open(big, writable=False)
    assert await h.apread(9 * GIB, 16) == bytes(16)
    await h.aclose()


async def test_allocated_counts_what_is_written_not_the_size(driver: Driver, kind: Kind) -> None:
    """st_blocks on the mount comes from here: a thin image holds about what was written (rbd
    counts whole 4 MiB objects), not its size."""
    k = key()
    await driver.allocate(k, GIB)
    empty = await driver.allocated(k)
    await write(driver, k, (0, b"x" * MIB), (512 * MIB, b"y"))
    held = await driver.allocated(k)
    assert empty is not None and held is not None
    assert empty < MIB
    assert MIB < held <= 8 * MIB


async def test_delete_removes_the_key_and_is_idempotent(driver: Driver) -> None:
    a, b = key(), key()
    await driver.allocate(a, MIB)
    await driver.allocate(b, MIB)
    await write(driver, a, (0, b"a"))
    assert sorted(await driver.keys()) == sorted([a, b])
    await driver.delete(a)
    assert await driver.keys() == [b]
    await driver.delete(a)  # deleting what is gone is not an error
    assert await driver.keys() == [b]
    with fails_with():
        await driver.open(a, writable=False)
    if supports(driver, Sized):
        with fails_with(errno.ENOENT):
            await driver.size(a)
    await driver.allocate(a, 2 * MIB)  # the key is free again, for a new, empty image
    assert await read(driver, a, 0, 1) == b"\0"
    assert sorted(await driver.keys()) == sorted([a, b])


async def test_missing_images_fail_and_create_nothing(driver: Driver) -> None:
    missing, dst = key(), key()
    with fails_with():
        await driver.open(missing, writable=True)
    if supports(driver, Sized):
        with fails_with(errno.ENOENT):
            await driver.size(missing)
    if supports(driver, Resizable):
        with fails_with():
            await driver.resize(missing, MIB)
    if supports(driver, Cloning):
        with fails_with():
            await driver.clone(missing, dst)
    assert await driver.keys() == []


BAD_KEYS = ["", ".", "..", "a/b", "../" + "0" * 29, "/etc/passwd", "0" * 16 + "\0" + "0" * 15, "x\ny"]


async def test_bad_keys_are_refused_and_change_nothing(driver: Driver, tmp_path: Path) -> None:
    good = key()
    await driver.allocate(good, MIB)
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    for bad in BAD_KEYS:
        calls = [driver.allocate(bad, MIB), driver.delete(bad), driver.open(bad, True)]
        if supports(driver, Sized):
            calls.append(driver.size(bad))
        if supports(driver, Resizable):
            calls.append(driver.resize(bad, MIB))
        if supports(driver, Cloning):
            calls += [driver.clone(good, bad), driver.clone(bad, key())]
        for call in calls:
            with pytest.raises(InvalidArgument, match="invalid image key"):
                await call
    assert await driver.keys() == [good]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing


# ------------------------------------------------------------------------------ the data path


@pytest.mark.parametrize("seed", [11])
async def test_random_io_matches_the_model(driver: Driver, seed: int) -> None:
    k = key()
    data = await random_io_handle(driver, k, seed, steps=150, limit=4 * MIB)
    h = await driver.open(k, writable=False)
    assert await h.apread(0, len(data) + MIB) == data
    assert await h.apread(len(data), 10) == b""
    await h.aclose()
    if supports(driver, Sized):
        assert await driver.size(k) == len(data)


async def test_small_and_unaligned_writes(driver: Driver) -> None:
    """Pieces of blocks, across block edges, past the end: what block storage reads-modifies-writes."""
    rng = random.Random(3)
    k = key()
    await driver.allocate(k, 3 * 4096 + 100)
    model = bytearray(3 * 4096 + 100)
    h = await driver.open(k, writable=True)
    for offset in (0, 1, 511, 512, 513, 4095, 4096, 8191, len(model) - 1, len(model) + 700):
        for n in (1, 3, 511, 512, 513, 4096, 5000):
            data = rng.randbytes(n)
            assert await h.apwrite(offset, data) == n
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + n] = data
            start, end = max(0, offset - 600), offset + n + 600
            assert await h.apread(start, end - start) == bytes(model[start:end])
    await h.aflush()
    await h.aclose()
    if supports(driver, Sized):
        assert await driver.size(k) == len(model)
    assert await read(driver, k, 0, len(model) + 1) == model


async def test_truncate_cuts_and_regrows_zeros(driver: Driver) -> None:
    k = key()
    await driver.allocate(k, 0)
    h = await driver.open(k, writable=True)
    data = random.Random(5).randbytes(70_000)
    await h.apwrite(0, data)
    await h.atruncate(1000)
    await h.atruncate(5000)
    assert await h.apread(0, 10_000) == data[:1000] + bytes(4000)
    await h.aflush()
    await h.aclose()
    if supports(driver, Sized):
        assert await driver.size(k) == 5000
    assert await read(driver, k, 0, 10_000) == data[:1000] + bytes(4000)


async def test_overlapping_calls_on_one_handle(driver: Driver) -> None:
    rng = random.Random(42)
    k = key()
    size = 8 * MIB + 123
    await driver.allocate(k, size)
    model = bytearray(size)
    h = await driver.open(k, writable=True)

    async def put(offset: int, data: bytes) -> None:
        assert await h.apwrite(offset, data) == len(data)

    for _ in range(3):  # batches of concurrent writes to disjoint ranges
        async with trio.open_nursery() as nursery:
            used: list[tuple[int, int]] = []
            for _ in range(16):
                n = rng.randrange(1, 300_000)
                offset = rng.randrange(0, size - n)
                if any(offset < e and s < offset + n for s, e in used):
                    continue
                used.append((offset, offset + n))
                model[offset:offset + n] = data = rng.randbytes(n)
                nursery.start_soon(put, offset, data)
    got: list[bytes] = [b""] * 8

    async def get(i: int) -> None:
        got[i] = await h.apread(i * MIB, MIB + 200)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(get, i)
    for i in range(8):
        assert got[i] == bytes(model[i * MIB:(i + 1) * MIB + 200])
    await h.aflush()
    await h.aclose()
    h = await driver.open(k, writable=False)
    whole = bytearray()
    for offset in range(0, size, 4 * MIB):
        whole += await h.apread(offset, 4 * MIB)
    await h.aclose()
    assert whole == model


async def test_read_only_handles_refuse_changes(driver: Driver) -> None:
    k = key()
    await driver.allocate(k, MIB)
    await write(driver, k, (10, b"before"))
    h = await driver.open(k, writable=False)
    with fails_with():
        await h.apwrite(0, b"no")
    with fails_with():
        await h.atruncate(10)
    assert await h.apread(0, 20) == bytes(10) + b"before" + bytes(4)
    await h.aclose()
    assert await read(driver, k, 0, 20) == bytes(10) + b"before" + bytes(4)
    if supports(driver, Sized):
        assert await driver.size(k) == MIB


async def test_an_unused_handle_closes_at_once(driver: Driver) -> None:
    """What the core does with the handle of an open that lost a race to the same image."""
    k = key()
    await driver.allocate(k, MIB)
    await write(driver, k, (0, b"data"))
    h = await driver.open(k, writable=True)
    h.close()
    assert await read(driver, k, 0, 4) == b"data"


# ------------------------------------------------------------------------------ size, resize, clone


@pytest.mark.parametrize("kind", COMPLETE, indirect=True)
async def test_resize_grows_and_shrinks_a_closed_image(driver: Driver) -> None:
    assert supports(driver, Resizable)
    k = key()
    await driver.allocate(k, 8 * MIB)
    await driver.resize(k, 24 * MIB)
    if supports(driver, Sized):
        assert await driver.size(k) == 24 * MIB
    await write(driver, k, (5 * MIB, b"kept"), (20 * MIB, b"cut"))
    await driver.resize(k, 10 * MIB + 7)  # shrink, to an unaligned size
    if supports(driver, Sized):
        assert await driver.size(k) == 10 * MIB + 7
    assert await read(driver, k, 5 * MIB, 4) == b"kept"
    assert await read(driver, k, 10 * MIB, 100) == bytes(7)
    await driver.resize(k, 24 * MIB)  # what the shrink cut stays cut
    assert await read(driver, k, 20 * MIB, 3) == bytes(3)
    assert await read(driver, k, 5 * MIB, 4) == b"kept"


@pytest.mark.parametrize("kind", COMPLETE, indirect=True)
async def test_clone_is_equal_then_independent(driver: Driver, kind: Kind) -> None:
    assert supports(driver, Cloning)
    src, dst, other = key(), key(), key()
    size = 32 * MIB
    await driver.allocate(src, size)
    head, tail = os.urandom(4096), os.urandom(MIB)
    await write(driver, src, (0, head), (20 * MIB, tail))
    used = (await driver.monitor()).used
    done: list[int] = []
    await driver.clone(src, dst, done.append)
    assert done == sorted(done) and all(0 <= n <= size for n in done)
    assert sorted(await driver.keys()) == sorted([src, dst])
    if supports(driver, Sized):
        assert await driver.size(dst) == size
    if kind.prompt_usage:  # thin: the holes stay holes (and a cheap clone shares the rest)
        grown = (await driver.monitor()).used - used
        assert grown < 4 * MIB and (grown == 0 or not driver.cheap_clone)
    assert await read(driver, dst, 0, 4096) == head
    assert await read(driver, dst, 20 * MIB, MIB) == tail
    assert await read(driver, dst, 4096, MIB) == bytes(MIB)
    assert await read(driver, dst, size - 10, 100) == bytes(10)
    await write(driver, dst, (0, b"CLONE"))
    await write(driver, src, (20 * MIB, b"SOURCE"))
    assert await read(driver, src, 0, 8) == head[:8]
    assert await read(driver, dst, 0, 8) == b"CLONE" + head[5:8]
    assert await read(driver, dst, 20 * MIB, 8) == tail[:8]
    await driver.allocate(other, MIB)
    with fails_with(errno.EEXIST):
        await driver.clone(src, other)
    assert await read(driver, other, 0, MIB) == bytes(MIB)  # the existing image as it was
    await driver.delete(src)
    assert sorted(await driver.keys()) == sorted([dst, other])
    assert await read(driver, dst, 20 * MIB, 8) == tail[:8]  # the source's deletion is not its


# ------------------------------------------------------------------------------ capacity, start


async def test_monitor_figures_are_sane_and_count_what_is_written(driver: Driver, kind: Kind) -> None:
    cap = await driver.monitor()
    assert cap.total is not None and cap.free is not None and cap.used is not None
    assert cap.total > 0 and 0 <= cap.free <= cap.total and cap.used >= 0
    k = key()
    await driver.allocate(k, GIB)
    await write(driver, k, (0, os.urandom(MIB)))
    if kind.prompt_usage:
        after = await driver.monitor()
        assert after.total == cap.total
        assert MIB <= after.used - cap.used < GIB // 2  # only the written blocks count
        assert 0 <= after.free <= after.total


async def test_start_again_changes_nothing(driver: Driver) -> None:
    k = key()
    await driver.allocate(k, MIB)
    await write(driver, k, (7, b"still"))
    await driver.start()
    assert await driver.keys() == [k]
    assert await read(driver, k, 7, 5) == b"still"
