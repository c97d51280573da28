"""The throwaway PostgreSQL fixture itself: it starts, answers, and leaves nothing behind."""

from __future__ import annotations

import psycopg
import pytest

from tests.servers.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_starts_answers_and_cleans_up() -> None:
    with PostgresServer() as pg:
        with psycopg.connect(pg.url.replace("+psycopg", "")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        pid = int((pg.data / "postmaster.pid").read_text().split()[0])
        directory = pg.dir
    assert not directory.exists()
    assert not running(pid)


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its reaping by PID 1 is pending)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
