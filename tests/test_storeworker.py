"""The store worker: transactions off the loop, applied to memory in commit order; writes queued
together share one commit (group commit) without one failing job taking the others with it."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
import trio

from tm2fs import errors as err
from tm2fs.core import Service
from tm2fs.model import ROOT_INO
from tm2fs.store import Tx


def folder(tx: Tx, parent: int, name: str) -> int:
    return tx.insert_node(parent=parent, name=name, backend_id=1, mode=stat.S_IFDIR | 0o755,
                          uid=0, gid=0)


async def queued_behind_a_slow_job(service: Service, jobs: list) -> list:
    """Run `jobs` (functions of a Tx) while the worker is busy, so they queue up together."""
    results: list = [None] * len(jobs)

    async def one(i: int) -> None:
        try:
            results[i] = await service.pool.write(jobs[i])
        except Exception as e:
            results[i] = e

    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.pool.write, lambda tx: time.sleep(0.3))
        await trio.sleep(0.05)  # the slow job is running in the worker thread now
        for i in range(len(jobs)):
            nursery.start_soon(one, i)
    return results


async def test_writes_queued_together_share_one_commit(service: Service) -> None:
    """On SQLite (one writer); on PostgreSQL each its own (two hosts' batches could deadlock)."""
    root = service.find_backend("local").root_ino
    before = service.transactions
    inos = await queued_behind_a_slow_job(
        service, [lambda tx, i=i: folder(tx, root, f"d{i}") for i in range(40)])
    assert all(isinstance(i, int) for i in inos)
    if service.store.shared:
        assert service.transactions - before == 41
    else:
        assert service.transactions - before <= 3  # the slow one, then the 40 in one or two
    assert {service.pool.nodes[i].name for i in inos} == {f"d{i}" for i in range(40)}


async def test_a_failing_job_rolls_back_alone(service: Service) -> None:
    root = service.find_backend("local").root_ino

    def half_then_fail(tx: Tx) -> None:
        folder(tx, root, "half")
        raise err.InvalidArgument("refused after a first statement")

    results = await queued_behind_a_slow_job(service, [
        lambda tx: folder(tx, root, "a"), half_then_fail, lambda tx: folder(tx, root, "b"),
        lambda tx: folder(tx, root, "a")])  # the same name again: a uniqueness violation
    assert isinstance(results[2], int)
    assert isinstance(results[1], err.InvalidArgument)
    # trio starts the callers in no set order: one of the two "a" got there first
    assert sorted(type(r).__name__ for r in (results[0], results[3])) == ["Exists", "int"]
    names = {n.name for n in service.pool.listing(root)}
    assert {"a", "b"} <= names and "half" not in names
    with service.store.read() as tx:  # memory and the store agree
        assert tx.child(root, "half") is None and tx.child(root, "a") is not None


async def test_memory_follows_commits_in_order(service: Service) -> None:
    """Many changes of one entry, queued together (in whatever order trio starts the callers):
    memory ends as the store ends."""
    results = await queued_behind_a_slow_job(service, [
        lambda tx, t=t: tx.update_node(ROOT_INO, mtime_ns=t, ctime_ns=t) for t in range(1, 51)])
    assert not any(isinstance(r, Exception) for r in results)
    with service.store.read() as tx:
        stored = tx.node(ROOT_INO)
    assert stored is not None
    assert service.pool.nodes[ROOT_INO] == stored


@pytest.mark.logs_ok
async def test_a_job_not_started_in_time_is_withdrawn_and_changes_nothing(
        service: Service, tmp_path: Path) -> None:
    root = service.find_backend("local").root_ino
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.pool.write, lambda tx: time.sleep(1.0))
        await trio.sleep(0.05)
        with pytest.raises(err.StoreUnavailable, match="nothing was changed") as e:
            await service.pool.db.write(lambda tx: folder(tx, root, "late"), timeout=0.2)
        assert not e.value.maybe_done
    await service.pool.write(lambda tx: None)  # the queue has drained
    assert service.pool.child(root, "late") is None
    with service.store.read() as tx:
        assert tx.child(root, "late") is None
