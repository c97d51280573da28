"""Hosts hear each other's changes as rows: two services (two hosts) on one real PostgreSQL.

A notification carries the rows a transaction changed, so the host that hears it applies them
without a transaction of its own. Notifications, a host's own commits and re-reads reach memory in
different orders; row versions and the ids of deleted rows keep the newest."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from tm2fs import hosts
from tm2fs.core import Service
from tm2fs.store import PoolStore, Tx
from tm2fs.store.schema import CHANNEL

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def pg_url(pg_server: Any, tmp_path: Path) -> str:
    return pg_server.new_database(f"notes{abs(hash(tmp_path)) % 10**9}")


@pytest.fixture
async def two(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Service, Service]]:
    stores = [PoolStore(pg_url), PoolStore(pg_url)]
    a = Service(stores[0], tmp_path / "a", host="hostA", mountpoint=str(tmp_path / "mntA"))
    b = Service(stores[1], tmp_path / "b", host="hostB", mountpoint=str(tmp_path / "mntB"))
    await a.start()
    await a.ensure_default_backend()
    await b.start()
    yield a, b
    await b.stop()
    await a.stop()
    for s in stores:
        s.close()


class Heard:
    """A LISTEN connection of the test's own: the payloads exactly as hosts receive them."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True)
        self.conn.execute(f"LISTEN {CHANNEL}")
        self.queue: list[dict[str, Any]] = []

    def naming(self, ino: int) -> dict[str, Any]:
        """The next notification that names entry `ino` (others, e.g. a monitor's, are
        skipped)."""
        for _ in range(50):
            while self.queue:
                data = self.queue.pop(0)
                named = data.get("dn", []) + data.get("n", []) + [r[0] for r in data.get("rn", [])]
                if ino in named:
                    return data
            self.queue.extend(json.loads(n.payload) for n in self.conn.notifies(timeout=0.1))
        raise AssertionError(f"no notification named entry {ino}")


@pytest.fixture
def heard(pg_url: str) -> Iterator[Heard]:
    h = Heard(pg_url)
    yield h
    h.conn.close()


def folder(tx: Tx, parent: int, name: str) -> int:
    return tx.insert_node(parent=parent, name=name, backend_id=1, mode=stat.S_IFDIR | 0o755,
                          uid=0, gid=0)


async def until(check: Any, limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not check():
            await trio.sleep(0.005)


async def test_a_change_arrives_as_rows_and_costs_the_hearer_no_transaction(
        two: tuple[Service, Service]) -> None:
    a, b = two
    root = a.find_backend("local").root_ino
    async with trio.open_nursery() as nursery:
        await nursery.start(hosts.listen, b)
        await until(lambda: root in b.pool.nodes)
        before = b.transactions
        inos = [await a.pool.write(lambda tx, i=i: folder(tx, root, f"vm-{i}")) for i in range(20)]
        await until(lambda: all(i in b.pool.nodes for i in inos))
        await a.pool.write(lambda tx: tx.update_node(inos[0], name="renamed"))
        await until(lambda: b.pool.nodes[inos[0]].name == "renamed")
        await a.pool.write(lambda tx: tx.delete_node(inos[1]))
        await until(lambda: inos[1] not in b.pool.nodes)
        bid = a.find_backend("local").id
        await a.pool.write(lambda tx: tx.update_backend(bid, cost=42, tags=["SSD"]))
        await until(lambda: b.pool.backend_rows[bid].cost == 42)
        assert b.pool.backend_rows[bid].tags == ["SSD"]
        assert b.transactions == before  # nothing re-read
        assert b.pool.children[root]["renamed"] == inos[0] and "vm-1" not in b.pool.children[root]
        nursery.cancel_scope.cancel()


async def test_a_late_notification_does_not_undo_a_newer_change(
        two: tuple[Service, Service], heard: Heard) -> None:
    """B hears the rename before the create, and the delete before the rename: B keeps the
    newest, and a deleted entry does not come back."""
    a, b = two
    root = a.find_backend("local").root_ino
    ino = await a.pool.write(lambda tx: folder(tx, root, "first"))
    await a.pool.write(lambda tx: tx.update_node(ino, name="second"))
    created, renamed = heard.naming(ino), heard.naming(ino)
    assert [r[2] for r in created["rn"] if r[0] == ino] == ["first"]
    await b.pool.remote_change(json.dumps(renamed))
    await b.pool.remote_change(json.dumps(created))
    assert b.pool.nodes[ino].name == "second" and "first" not in b.pool.children[root]

    # the same content at a newer version still wins over an older version heard later
    other = await a.pool.write(lambda tx: folder(tx, root, "x"))
    await a.pool.write(lambda tx: tx.update_node(other, name="y"))
    await a.pool.write(lambda tx: tx.update_node(other, name="x"))
    x1, y2, x3 = heard.naming(other), heard.naming(other), heard.naming(other)
    for note in (x1, x3, y2):  # "x", "x" again (newer), then "y" late
        await b.pool.remote_change(json.dumps(note))
    assert b.pool.nodes[other].name == "x" and "y" not in b.pool.children[root]

    await a.pool.write(lambda tx: tx.delete_node(ino))
    deleted = heard.naming(ino)
    assert ino in deleted["dn"]
    await b.pool.remote_change(json.dumps(deleted))
    await b.pool.remote_change(json.dumps(renamed))
    assert ino not in b.pool.nodes and "second" not in b.pool.children[root]


async def test_a_change_too_big_for_one_notification_is_re_read(
        two: tuple[Service, Service], heard: Heard) -> None:
    a, b = two
    root = a.find_backend("local").root_ino

    def many(tx: Tx) -> list[int]:
        return [folder(tx, root, f"d{i:04d}-" + "x" * 100) for i in range(200)]

    inos = await a.pool.write(many)
    payload = heard.naming(inos[0])
    assert "rn" not in payload and inos[-1] in payload["n"]  # ids only: the rows did not fit
    before = b.transactions
    await b.pool.remote_change(json.dumps(payload))
    assert b.transactions == before + 1 and all(i in b.pool.nodes for i in inos)
