"""The engine: SQLite (WAL, the embedded default) or PostgreSQL, the schema made or migrated at
start, transactions for callers outside the store worker (tests, tools), and durability."""

from __future__ import annotations

import json
import logging
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from ..model import ROOT_INO, now_ns
from . import schema
from .schema import CHANNEL, meta, node, schema_info
from .tx import Tx

log = logging.getLogger(__name__)
PROBE_WAIT = 5.0  # seconds a new LISTEN connection has to hear its own probe


class PoolStore:
    """Owns the engine; `begin()` gives a transaction, `read()` a consistent read."""

    def __init__(self, url: str, listen_url: str | None = None) -> None:
        """`listen_url`: PostgreSQL reached directly, for LISTEN, when `url` goes through a pooler
        in transaction mode (PgBouncer), which cannot carry a session's LISTEN."""
        self.url = url
        self.listen_url = listen_url or url
        self.engine = _engine(url, pooled=self.listen_url != url)
        self._migrate()

    @property
    def shared(self) -> bool:
        """Whether several hosts can share this store (PostgreSQL); SQLite is one host's."""
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def begin(self) -> Iterator[Tx]:
        """A write transaction (on SQLite it takes the write lock at once). A uniqueness
        violation (two hosts making the same name at once) is `Exists`, as a check would say."""
        try:
            with self.engine.begin() as conn:
                yield Tx(conn)
        except sa.exc.IntegrityError as e:
            from ..errors import Exists

            raise Exists("it exists (made concurrently elsewhere)",
                         "look again: another host made it meanwhile") from e

    def sync(self) -> None:
        """Make every committed transaction durable against power loss. PostgreSQL's commits are
        (synchronous_commit). SQLite runs with synchronous=NORMAL (a commit reaches the WAL in the
        OS, safe from a crash of the daemon): here one tiny commit under synchronous=FULL fsyncs
        the WAL, and with it every commit before. (SQLite's own file handles only: a descriptor
        opened and closed on its files elsewhere in the process would drop its POSIX locks.)"""
        if self.engine.dialect.name != "sqlite":
            return
        raw = self.engine.raw_connection()
        try:
            db = raw.driver_connection
            assert db is not None
            db.execute("PRAGMA synchronous=FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("UPDATE schema_info SET version = version")
                db.execute("COMMIT")
            finally:
                db.execute("PRAGMA synchronous=NORMAL")
        finally:
            raw.close()

    def listen(self) -> Any:
        """A dedicated psycopg connection LISTENing on the change channel (PostgreSQL only),
        proven to hear: a pooler in transaction mode (PgBouncer) accepts LISTEN and then
        delivers nothing, and hosts would silently stop hearing each other."""
        import psycopg

        url = sa.make_url(self.listen_url).set(drivername="postgresql")
        conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True,
                               connect_timeout=10)
        try:
            conn.execute(f"LISTEN {CHANNEL}")
            token = uuid.uuid4().hex
            with self.engine.begin() as c:
                c.execute(sa.select(sa.func.pg_notify(CHANNEL, json.dumps({"probe": token}))))
            deadline = time.monotonic() + PROBE_WAIT
            while (left := deadline - time.monotonic()) > 0:
                if any(token in n.payload for n in conn.notifies(timeout=left, stop_after=1)):
                    return conn
            raise RuntimeError(
                f"change notifications do not arrive through {url.render_as_string()}: LISTEN "
                "needs a session of its own (PgBouncer in transaction mode cannot give one); "
                "give --listen-db with a URL that reaches PostgreSQL directly")
        except BaseException:
            conn.close()
            raise

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only transaction: never takes SQLite's write lock."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(tm2fs_read=True)
            with conn.begin():
                yield Tx(conn)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> PoolStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self.begin() as tx:
            meta.create_all(tx.c)
            row = tx.c.execute(sa.select(schema_info.c.version)).first()
            if row is None:
                tx.c.execute(schema_info.insert().values(id=1, version=schema.SCHEMA_VERSION,
                                                          pool_id=schema.new_pool_id()))
                t = now_ns()
                tx.c.execute(node.insert().values(
                    ino=ROOT_INO, parent=None, name="", backend_id=None, mode=stat.S_IFDIR | 0o755,
                    uid=0, gid=0, atime_ns=t, mtime_ns=t, ctime_ns=t))
                if tx.c.dialect.name == "postgresql":  # explicit ino above: move the sequence on
                    tx.c.execute(sa.text(
                        "SELECT setval(pg_get_serial_sequence('namespace', 'ino'), 1)"))
                return
            version = row[0]
            if version > schema.SCHEMA_VERSION:
                raise RuntimeError(
                    f"pool store schema is version {version}, newer than this tm2fs "
                    f"({schema.SCHEMA_VERSION}): upgrade tm2fs")
            for v in range(version, schema.SCHEMA_VERSION):
                log.info("migrating pool store schema %d -> %d", v, v + 1)
                schema.MIGRATIONS[v - 1](tx.c)
            tx.c.execute(schema_info.update().values(version=schema.SCHEMA_VERSION))


def _engine(url: str, pooled: bool = False) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # a commit survives a crash of the daemon at once (it is in the WAL, in the OS);
            # against power loss the WAL is fsynced by `sync()`: on fsync, and within a second
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # Writers take the lock up front: no deadlock between two readers that both upgrade.
            read = conn.get_execution_options().get("tm2fs_read")
            conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

        return engine
    # No pre-ping (a round trip per transaction): a dead connection fails its statement, the pool
    # drops it, and the next transaction connects again. A server that stops answering is noticed
    # by TCP keepalives instead of hanging the store worker for ever.
    # Through a pooler in transaction mode consecutive transactions may run on different server
    # connections: no server-side prepared statements (psycopg prepares a query run 5 times).
    return sa.create_engine(url, pool_size=2, max_overflow=2, connect_args={
        "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
        "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30000,
        **({"prepare_threshold": None} if pooled else {})})


def sqlite_url(path: str) -> str:
    return f"sqlite:///{path}"
