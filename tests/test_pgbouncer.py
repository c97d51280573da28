"""Past a few hundred hosts PostgreSQL's connections run out: the daemons' transactions then go
through PgBouncer in transaction mode, while LISTEN, which needs a session of its own, goes to
PostgreSQL directly (--listen-db). A real PgBouncer in front of a real PostgreSQL."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.daemon import Daemon
from tests.servers.pgbouncer import PgBouncer

pytestmark = [pytest.mark.mount, pytest.mark.postgres, pytest.mark.slow]
POOL = 3  # PgBouncer's server connections for the database


@pytest.fixture
def bouncer(pg_server: Any) -> Iterator[PgBouncer]:
    with PgBouncer(pg_server, pool_size=POOL) as b:
        yield b


def ok(proc: Any) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def until(check: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "not within the limit"
        time.sleep(0.01)


def test_hosts_through_pgbouncer_hear_each_other(pg_server: Any, bouncer: PgBouncer,
                                                   tmp_path: Path) -> None:
    name = f"bouncer{random.randrange(10**9)}"
    direct = pg_server.new_database(name)
    daemons = []
    try:
        for host in ("h1", "h2", "h3"):
            (tmp_path / host).mkdir()
            daemons.append(Daemon(tmp_path / host, db_url=bouncer.url(name), host=host,
                                  extra=("--listen-db", direct)).start())
        a, b, c = daemons
        for i in range(30):  # enough statements for psycopg to prepare them, were it allowed
            (a.mnt / "local" / f"img{i}").write_bytes(b"x" * i)
            ok(b.tm2("allocate", f"auto:vm-{i}/disk.0", "1M"))
        until(lambda: all((c.mnt / "local" / f"img{i}").exists() for i in range(30)))
        until(lambda: (c.mnt / "local" / "vm-29" / "disk.0").exists())
        assert (c.mnt / "local" / "img29").stat().st_size == 29
        ok(c.tm2("resize", "local:vm-3/disk.0", "2M"))
        until(lambda: (a.mnt / "local" / "vm-3" / "disk.0").stat().st_size == 2 * 2**20)
        engine = sa.create_engine(direct)
        with engine.connect() as conn:
            server_side = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"),
                {"d": name}).scalar_one()
        engine.dispose()
        # PgBouncer's pool, and one LISTEN session per host: not two connections per host
        assert server_side <= POOL + len(daemons), server_side
    finally:
        for d in daemons:
            d.stop()


def test_listen_through_pgbouncer_is_refused_with_the_way_out(pg_server: Any, bouncer: PgBouncer,
                                                               tmp_path: Path) -> None:
    """PgBouncer in transaction mode accepts LISTEN and then delivers nothing: hosts would
    silently stop hearing each other. The daemon proves its LISTEN hears, and says what to do."""
    name = f"bouncer{random.randrange(10**9)}"
    pg_server.new_database(name)
    d = Daemon(tmp_path, db_url=bouncer.url(name), host="h1")
    with pytest.raises(RuntimeError) as e:
        d.start()
    assert "give --listen-db" in str(e.value)
