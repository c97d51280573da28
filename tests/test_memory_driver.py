"""The `memory` driver's own parts (the contract is tests/test_driver_conformance.py): TM_RAW, its
CAPACITY and shared blocks, pools by NAME, fault injection, and the core's rules for hung,
failing and full backends, shown with injected faults instead of stopped servers."""

from __future__ import annotations

import errno
import itertools
import time
import uuid
from pathlib import Path

import pytest
import trio

from tm2fs import errors as err
from tm2fs.core import ROOT, Service
from tm2fs.drivers.base import Capacity
from tm2fs.drivers.memory import BLOCK, MemoryDriver, heal, inject

MIB = 2**20


def make(tmp_path: Path, **raw: str) -> MemoryDriver:
    return MemoryDriver(MemoryDriver.validate(raw, tmp_path, "b"), tmp_path)


def key() -> str:
    return uuid.uuid4().hex


async def put(d: MemoryDriver, k: str, offset: int, data: bytes) -> None:
    h = await d.open(k, True)
    await h.apwrite(offset, data)
    await h.aclose()


def test_validate_fills_defaults_and_refuses(tmp_path: Path) -> None:
    raw = MemoryDriver.validate({}, tmp_path, "m1")
    assert raw["CAPACITY"] == str(2**30) and raw["NAME"].startswith("m1-")
    assert MemoryDriver.validate({}, tmp_path, "m1")["NAME"] != raw["NAME"]  # a new pool each time
    assert MemoryDriver.validate({"capacity": "512M", "name": "p.1"}, tmp_path, "m") == \
        {"CAPACITY": str(512 * MIB), "NAME": "p.1"}
    for bad, message in [({"CAPACITY": "0"}, "positive"), ({"CAPACITY": "lots"}, "not understood"),
                         ({"NAME": "a/b"}, "not a plain name"), ({"NAME": "-x"}, "not a plain name"),
                         ({"PATH": "/x"}, "unknown TM_RAW")]:
        with pytest.raises(err.InvalidArgument, match=message):
            MemoryDriver.validate(bad, tmp_path, "m")


async def test_capacity_counts_distinct_blocks_and_refuses_more(tmp_path: Path) -> None:
    d = make(tmp_path, CAPACITY=str(8 * BLOCK))
    a, b = key(), key()
    await d.allocate(a, 100 * MIB)  # thin: allocating takes nothing
    assert await d.monitor() == Capacity(8 * BLOCK, 8 * BLOCK, 0)
    await put(d, a, BLOCK - 1, bytes(2))  # two blocks, partly written
    await put(d, a, 10 * BLOCK, b"x" * (3 * BLOCK))
    assert (await d.monitor()).used == 5 * BLOCK
    await d.clone(a, b)  # shares every block
    assert (await d.monitor()).used == 5 * BLOCK
    await put(d, b, 10 * BLOCK, b"y")  # b's own copy of one block
    assert (await d.monitor()).used == 6 * BLOCK
    h = await d.open(b, True)
    with pytest.raises(OSError) as e:
        await h.apwrite(20 * BLOCK, bytes(3 * BLOCK))  # three more do not fit
    assert e.value.errno == errno.ENOSPC
    assert await h.apread(20 * BLOCK, 10) == bytes(10) and (await d.monitor()).used == 6 * BLOCK
    await h.apwrite(20 * BLOCK, bytes(2 * BLOCK))  # two do
    assert (await d.monitor()).free == 0
    await h.aclose()
    await d.delete(a)  # b still holds the shared blocks
    assert (await d.monitor()).used == 8 * BLOCK - BLOCK
    await d.resize(b, 0)
    assert (await d.monitor()).used == 0


async def test_drivers_of_one_name_share_the_pool(tmp_path: Path) -> None:
    name = f"shared-{key()[:8]}"
    first = make(tmp_path, NAME=name)
    k = key()
    await first.allocate(k, MIB)
    await put(first, k, 0, b"seen by both")
    second = make(tmp_path, NAME=name, CAPACITY="2G")  # as after a TM_RAW update
    assert await second.keys() == [k]
    h = await second.open(k, False)
    assert await h.apread(0, 12) == b"seen by both"
    await h.aclose()
    assert (await first.monitor()).total == 2 * 2**30
    assert await make(tmp_path).keys() == []  # another NAME: another pool


async def test_faults_by_call_kind_and_count(tmp_path: Path) -> None:
    d = make(tmp_path)
    k = key()
    await d.allocate(k, MIB)
    inject(d, "eio", calls=["write"])
    h = await d.open(k, True)
    with pytest.raises(OSError, match="write: injected EIO") as e:
        await h.apwrite(0, b"x")
    assert e.value.errno == errno.EIO
    assert await h.apread(0, 1) == b"\0"  # other calls work
    heal(d)
    await h.apwrite(0, b"x")
    once = inject(d.pool_name, "enospc", times=1)
    with pytest.raises(OSError) as e:
        await d.monitor()
    assert e.value.errno == errno.ENOSPC and once not in d.pool.faults
    await d.monitor()  # only the next call failed
    inject(d, "hang", calls=["read", "flush"])
    with trio.move_on_after(0.2) as scope:
        await h.apread(0, 1)
    assert scope.cancelled_caught
    slow = inject(d, "slow", calls=["size"], seconds=0.3)
    t = time.monotonic()
    assert await d.size(k) == MIB
    assert time.monotonic() - t >= 0.3
    heal(d, slow)
    assert [f.kind for f in d.pool.faults] == ["hang"]
    heal(d)
    await h.aflush()
    await h.aclose()
    for bad in ({"kind": "melt"}, {"kind": "eio", "calls": ["reed"]}):
        with pytest.raises(ValueError):
            inject(d, bad.pop("kind"), **bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the core's rules


async def memory_backend(service: Service, timeout: float = 0.5) -> str:
    """A memory backend `m` with a short TIMEOUT; returns its pool NAME."""
    name = f"svc-{key()[:8]}"
    await service.create_backend(ROOT, {"NAME": "m", "TM": "memory", "TIMEOUT": str(timeout),
                                        "TM_RAW": f"NAME={name} CAPACITY=64M"})
    return name


@pytest.mark.logs_ok
async def test_a_hung_call_times_out_turns_the_backend_error_and_recovers(service: Service) -> None:
    name = await memory_backend(service)
    of = await service.open_address("m:disk", ROOT, writable=True, create=True)
    await service.write(of, 0, b"kept")
    await service.fsync(of)
    inject(name, "hang", calls=["read"])
    t = time.monotonic()
    with pytest.raises(err.BackendUnavailable, match=r"read timed out after 0\.5s") as e:
        await service.read(of, 0, 4)
    assert e.value.errno == errno.EIO and time.monotonic() - t < 2
    assert (await service.backend_info("m"))["STATE"] == "ERROR"
    with pytest.raises(err.BackendUnavailable):  # ERROR answers EIO at once
        await service.read(of, 0, 4)
    await service.allocate("local:still-works", "1M", ROOT)  # the rest of the pool works
    heal(name)
    await service.monitor_backend(service.find_backend("m").id)
    assert (await service.backend_info("m"))["STATE"] == "READY"
    assert await service.read(of, 0, 4) == b"kept"
    await service.release(of)


@pytest.mark.logs_ok
async def test_eio_turns_the_backend_error_and_a_failing_monitor_keeps_it(service: Service) -> None:
    name = await memory_backend(service)
    inject(name, "eio", calls=["allocate", "monitor"])
    with pytest.raises(err.BackendUnavailable, match="injected EIO"):
        await service.allocate("m:a", "1M", ROOT)
    assert (await service.backend_info("m"))["STATE"] == "ERROR"
    await service.monitor_backend(service.find_backend("m").id)
    info = await service.backend_info("m")
    assert info["STATE"] == "ERROR" and "injected EIO" in info["ERROR"]
    heal(name)
    await service.monitor_backend(service.find_backend("m").id)
    await service.allocate("m:a", "1M", ROOT)
    assert (await service.backend_info("m"))["NBIMAGE"] == 1


async def test_a_full_backend_answers_enospc_and_stays_ready(service: Service) -> None:
    name = await memory_backend(service)
    of = await service.open_address("m:big", ROOT, writable=True, create=True)
    await service.write(of, 0, b"x" * MIB)
    inject(name, "enospc", calls=["write"])  # full before the pool's figures say so
    with pytest.raises(err.NoSpace, match="backend m is full") as e:
        await service.write(of, MIB, b"y" * MIB)
    assert e.value.errno == errno.ENOSPC
    heal(name)
    assert (await service.backend_info("m"))["STATE"] == "READY"
    await service.write(of, MIB, b"y" * MIB)
    await service.release(of)


# ---------------------------------------------------------------------- the core's own rules


async def test_replaced_and_deleted_drivers_are_stopped(service: Service,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A TM_RAW change makes a new driver and a deleted backend drops its own: the old ones must
    be stopped (connections, sessions, threads), not left running."""
    stopped: list[MemoryDriver] = []
    real_stop = MemoryDriver.stop

    async def stop(self: MemoryDriver) -> None:
        stopped.append(self)
        await real_stop(self)

    monkeypatch.setattr(MemoryDriver, "stop", stop)
    await memory_backend(service)
    bid = service.find_backend("m").id
    first = service.backends.runtimes[bid].driver
    await service.update_backend(ROOT, "m", {"TM_RAW": "CAPACITY=32M"})
    second = service.backends.runtimes[bid].driver
    assert second is not first
    await service.monitor_all()  # the next monitor pass stops what was replaced
    assert stopped == [first]
    await service.delete_backend(ROOT, "m")
    assert stopped == [first, second]


async def test_a_long_clone_inside_its_backend_keeps_the_backend_ready(service: Service) -> None:
    """Whole-image work gets time for its size: a clone slower than TIMEOUT (0.5 s here) is not
    a hung backend."""
    name = await memory_backend(service)
    await service.allocate("m:src", "16M", ROOT)
    inject(name, "slow", calls=["clone"], seconds=1.0)
    await service.clone("m:src", "m:copy", ROOT)
    heal(name)
    assert (await service.backend_info("m"))["STATE"] == "READY"
    assert service.get_size("m:copy", ROOT) == 16 * MIB


@pytest.mark.logs_ok
async def test_a_failed_commit_changes_neither_memory_nor_data(service: Service,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory changes only after the transaction that justifies it commits: an unlink whose
    commit fails leaves the name, the image and its bytes as they were."""
    from tm2fs.store import Tx

    name = await memory_backend(service)
    of = await service.open_address("m:keep", ROOT, writable=True, create=True)
    await service.write(of, 0, b"precious")
    await service.fsync(of)

    def broken(self: Tx, ino: int) -> None:
        raise RuntimeError("the pool store went away mid-transaction")

    monkeypatch.setattr(Tx, "delete_node", broken)
    with pytest.raises(RuntimeError):
        await service.delete("m:keep", ROOT)  # while open: its data would go at the last close
    monkeypatch.undo()
    await service.release(of)
    assert service.get_size("m:keep", ROOT) == len(b"precious")
    of = await service.open_address("m:keep", ROOT, writable=False)
    assert await service.read(of, 0, 8) == b"precious"
    await service.release(of)
    assert name


@pytest.mark.logs_ok
async def test_a_failing_background_step_never_ends_its_loop(autojump_clock: object,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """One failure policy for every background loop: a failing step (the pool store away) is
    logged once and tried again with a growing pause; the loop goes on and recovers."""
    from tm2fs.background import every

    calls: list[float] = []

    async def step() -> None:
        calls.append(trio.current_time())
        if len(calls) <= 3:
            raise err.StoreUnavailable("the pool store did not answer")

    with trio.move_on_after(60):
        await every("test loop", 1.0, step)
    assert len(calls) > 10  # it went on after the failures
    pauses = [b - a for a, b in itertools.pairwise(calls)]
    assert pauses[:3] == [2.0, 4.0, 8.0] and pauses[3] == 1.0  # backoff, then back to normal
    errors = [r for r in caplog.records if r.name == "tm2fs.background" and r.levelname == "ERROR"]
    assert len(errors) == 1  # the same error is logged once
