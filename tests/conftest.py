"""Shared fixtures: pool stores on SQLite and on a throwaway PostgreSQL, a service, log policing.

Like S3QL's test plugin, any test that logs an unexpected WARNING or worse fails: silent errors
must not hide behind green tests. A test that expects such logs says so with
`@pytest.mark.logs_ok`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tm2fs.core import Service
from tm2fs.store import PoolStore


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "logs_ok: the test expects WARNING/ERROR log records")


@pytest.fixture(autouse=True)
def _no_unexpected_warnings(request: pytest.FixtureRequest,
                            caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    if request.node.get_closest_marker("logs_ok"):
        return
    bad = [r for when in ("setup", "call") for r in caplog.get_records(when)
           if r.levelno >= logging.WARNING]
    if bad:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)
        pytest.fail(f"unexpected log records (mark the test logs_ok if expected):\n{lines}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[object]:
    """The real tm2fs daemon on a temp state dir, mounted; always unmounted in teardown."""
    from tests.daemon import Daemon

    with Daemon(tmp_path) as d:
        yield d


@pytest.fixture
def public_daemon() -> Iterator[object]:
    """The daemon in a directory every user can reach: its socket and mount serve `nobody` too."""
    from tests.daemon import Daemon, public_dir

    with public_dir() as top, Daemon(top) as d:
        yield d


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """One throwaway PostgreSQL for the session, started only if a test asks for it."""
    from tests.servers.postgres import PostgresServer

    with PostgresServer() as server:
        yield server


_db_counter = iter(range(1, 10**6))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres,
                                                                   pytest.mark.slow])])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty pool store URL on each engine: the same code must run on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/pool.db"
    server = request.getfixturevalue("pg_server")
    return server.new_database(f"t{next(_db_counter)}")


@pytest.fixture
def store(store_url: str) -> Iterator[PoolStore]:
    s = PoolStore(store_url)
    yield s
    s.close()


@pytest.fixture
async def service(store: PoolStore, tmp_path: Path) -> AsyncIterator[Service]:
    """A service with the embedded default: the `local` directory backend."""
    svc = Service(store, tmp_path / "state", host="testhost", mountpoint=str(tmp_path / "mnt"))
    await svc.start()
    await svc.ensure_default_backend()
    yield svc
    await svc.stop()


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[object]:
    """One throwaway one-node Ceph cluster for the session, started only if a test asks for it."""
    from tests.servers.ceph import CephCluster

    with CephCluster() as cluster:
        yield cluster
