"""Clusters: hosts and backends belong to clusters, and a host places new images only on the
backends of its own clusters unless told otherwise (as OpenNebula's hosts use their cluster's
datastores). Two real daemons in two clusters on one PostgreSQL, and one daemon alone."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.mount


def ok(proc: Any) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def backend(d: Daemon, name: str, path: Path, cluster: str) -> None:
    ok(d.backend_cli("create", "--name", name, "--tm", "dir", "--tm-raw", f"PATH={path}",
                     "--cluster", cluster, "--cost", "1"))


def placed_on(d: Daemon, address: str, *options: str) -> str:
    return ok(d.tm2("allocate", address, "1M", *options)).strip().split(":")[0]


@pytest.fixture
def east_west(pg_server: Any, tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    url = pg_server.new_database(f"clusters{random.randrange(10**9)}")
    daemons = []
    try:
        for name, cluster in (("east1", "east"), ("west1", "west")):
            (tmp_path / name).mkdir()
            daemons.append(Daemon(tmp_path / name, db_url=url, host=name,
                                  extra=("--cluster", cluster)).start())
        backend(daemons[0], "eastdisk", tmp_path / "eastdisk", "east")
        backend(daemons[0], "westdisk", tmp_path / "westdisk", "west")
        yield daemons[0], daemons[1]
    finally:
        for d in daemons:
            d.stop()


@pytest.mark.postgres
@pytest.mark.slow
def test_each_host_places_in_its_own_cluster(east_west: tuple[Daemon, Daemon]) -> None:
    east, west = east_west
    for i in range(5):
        assert placed_on(east, f"auto:vm-{i}/disk.0") == "eastdisk"
        assert placed_on(west, f"auto:vm-{i}/disk.1") == "westdisk"
    # told otherwise: another cluster, or any
    assert placed_on(east, "auto:vm-x/disk.0", "--cluster", "west") == "westdisk"
    assert placed_on(west, "auto:vm-y/disk.0", "--cluster", "*", "--requirements",
                     'NAME = "eastdisk"') == "eastdisk"
    hosts = {h["NAME"]: h for h in json.loads(ok(east.backend_cli("hosts", "--json")))}
    assert hosts["east1"]["CLUSTERS"] == ["east"] and hosts["west1"]["CLUSTERS"] == ["west"]
    table = ok(west.backend_cli("hosts"))
    assert "CLUSTERS" in table.splitlines()[0] and "west" in table
    listed = {b["NAME"]: b["CLUSTER"] for b in json.loads(ok(west.backend_cli("list", "--json")))}
    assert listed["eastdisk"] == "east" and listed["westdisk"] == "west"


def test_explain_says_a_backend_is_in_another_cluster(tmp_path: Path) -> None:
    with Daemon(tmp_path, extra=("--cluster", "east")) as d:
        backend(d, "westdisk", tmp_path / "westdisk", "west")
        backend(d, "eastdisk", tmp_path / "eastdisk", "east")
        verdicts = {v["NAME"]: v["VERDICT"]
                    for v in json.loads(ok(d.tm2("place", "1M", "--explain", "--json")))}
        assert verdicts["eastdisk"] == "candidate"
        assert verdicts["westdisk"].startswith("cluster is west, not east")
        # `local`, made at first start, is in the default cluster: not this host's either
        assert verdicts["local"].startswith("cluster is default")
        nowhere = d.tm2("allocate", "auto:img", "1M", "--cluster", "north")
        assert nowhere.returncode != 0 and b"cluster is east, not north" in nowhere.stderr
        bad = d.tm2("allocate", "auto:img", "1M", "--cluster", "a/b")
        assert bad.returncode != 0 and b"cluster 'a/b' contains '/'" in bad.stderr
        assert "img" not in d.tm2("info", "local:img").stdout.decode()
