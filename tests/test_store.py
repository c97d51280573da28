"""Pool store on SQLite and PostgreSQL: schema, constraints, counters, migrations."""

from __future__ import annotations

import stat

import pytest
import sqlalchemy as sa

from tm2fs import errors as err
from tm2fs.store import ROOT_INO, PoolStore
from tm2fs.store import schema as st


def test_fresh_store_has_root_and_version(store: PoolStore) -> None:
    with store.read() as tx:
        root = tx.node(ROOT_INO)
        assert root is not None and stat.S_ISDIR(root.mode) and root.parent is None
        assert tx.c.execute(sa.select(st.schema_info.c.version)).scalar_one() == st.SCHEMA_VERSION


def test_reopen_keeps_data_and_next_ino_is_fresh(store_url: str) -> None:
    s = PoolStore(store_url)
    with s.begin() as tx:
        bid = tx.insert_backend(name="a", tm="dir", root_ino=0)
        ino = tx.insert_node(parent=ROOT_INO, name="a", backend_id=bid, mode=stat.S_IFDIR | 0o755,
                             uid=0, gid=0)
    s.close()
    s = PoolStore(store_url)  # opening again must not re-create or migrate anything
    with s.read() as tx:
        assert tx.backend_by_name("a").id == bid
        assert ino > ROOT_INO
        assert [n.name for n in tx.children(ROOT_INO)] == ["a"]
    s.close()


def test_unique_names_per_directory(store: PoolStore) -> None:
    with store.begin() as tx:
        tx.insert_node(parent=ROOT_INO, name="x", backend_id=None, mode=stat.S_IFDIR, uid=0, gid=0)
    with pytest.raises(err.Exists), store.begin() as tx:
        tx.insert_node(parent=ROOT_INO, name="x", backend_id=None, mode=stat.S_IFDIR, uid=0, gid=0)
    with store.read() as tx:
        assert [n.name for n in tx.children(ROOT_INO)] == ["x"]


def test_failed_transaction_changes_nothing(store: PoolStore) -> None:
    with pytest.raises(RuntimeError), store.begin() as tx:
        tx.insert_backend(name="gone", tm="dir", root_ino=0)
        raise RuntimeError("boom")
    with store.read() as tx:
        assert tx.backends() == []


def test_counters_are_counted(store: PoolStore) -> None:
    with store.begin() as tx:
        a = tx.insert_backend(name="a", tm="dir", root_ino=0)
        b = tx.insert_backend(name="b", tm="dir", root_ino=0)
        i1 = tx.insert_image(a, "k1", 100)
        tx.insert_image(a, "k2", 50)
        tx.insert_image(b, "k3", 7)
        tx.insert_attachment(i1, "h1", "/x")
        tx.insert_attachment(i1, "h2", "/x")
    with store.read() as tx:
        assert tx.counters() == {a: (2, 2, 150), b: (1, 0, 7)}
    with store.begin() as tx:
        tx.delete_image(i1)  # its attachments go with it
        assert tx.attachments() == []
    with store.read() as tx:
        assert tx.counters() == {a: (1, 0, 50), b: (1, 0, 7)}


def test_orphan_images_are_found(store: PoolStore) -> None:
    with store.begin() as tx:
        a = tx.insert_backend(name="a", tm="dir", root_ino=0)
        named = tx.insert_image(a, "k1", 1)
        orphan = tx.insert_image(a, "k2", 1)
        tx.insert_node(parent=ROOT_INO, name="f", backend_id=a, mode=stat.S_IFREG | 0o600, uid=0,
                       gid=0, image_id=named)
    with store.read() as tx:
        assert [im.id for im in tx.orphan_images()] == [orphan]


def test_json_columns_round_trip(store: PoolStore) -> None:
    with store.begin() as tx:
        bid = tx.insert_backend(name="a", tm="dir", root_ino=0, tm_raw={"PATH": "/x y"},
                                tags=["SSD", "ISCSI"], attrs={"DISK_TYPE": "FILE"})
    with store.read() as tx:
        b = tx.backend(bid)
    assert (b.tm_raw, b.tags, b.attrs) == ({"PATH": "/x y"}, ["SSD", "ISCSI"], {"DISK_TYPE": "FILE"})


def test_newer_schema_is_refused(store_url: str) -> None:
    s = PoolStore(store_url)
    with s.begin() as tx:
        tx.c.execute(st.schema_info.update().values(version=st.SCHEMA_VERSION + 1))
    s.close()
    with pytest.raises(RuntimeError, match="upgrade tm2fs"):
        PoolStore(store_url)


def test_migrations_run_in_order(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store at an older version is brought to the current one by the listed steps, once."""
    s = PoolStore(store_url)
    s.close()
    ran: list[int] = []
    now = st.SCHEMA_VERSION
    monkeypatch.setattr(st, "SCHEMA_VERSION", now + 2)
    monkeypatch.setattr(st, "MIGRATIONS", [*st.MIGRATIONS, lambda c: ran.append(now + 1),
                                           lambda c: ran.append(now + 2)])
    s = PoolStore(store_url)
    with s.read() as tx:
        assert tx.c.execute(sa.select(st.schema_info.c.version)).scalar_one() == now + 2
    s.close()
    PoolStore(store_url).close()
    assert ran == [now + 1, now + 2]


def test_a_v4_store_gains_row_versions_and_host_clusters(store_url: str) -> None:
    """A store from before row versions and clusters opens; its rows start at version 0 and its
    hosts are in the default cluster."""
    s = PoolStore(store_url)
    with s.begin() as tx:
        bid = tx.insert_backend(name="old", tm="dir", root_ino=0)
        tx.upsert_host("h1", state="ONLINE", heartbeat=0, started=0)
        for table, column in (("namespace", "ver"), ("image", "ver"), ("storagebackend_pool", "ver"),
                              ("host", "clusters")):
            tx.c.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        tx.c.exec_driver_sql(f"INSERT INTO image (backend_id, key, size, created) VALUES ({bid}, 'k', 5, 0)")
        tx.c.exec_driver_sql("UPDATE schema_info SET version = 4")
    s.close()
    s = PoolStore(store_url)
    with s.read() as tx:
        assert tx.c.execute(sa.select(st.schema_info.c.version)).scalar_one() == st.SCHEMA_VERSION
        [im] = tx.images()
        assert (im.key, im.size, im.ver) == ("k", 5, 0) and tx.node(ROOT_INO).ver == 0
        assert [b.ver for b in tx.backends()] == [0]
        assert [h["clusters"] for h in tx.hosts()] == ['["default"]']
    s.close()
