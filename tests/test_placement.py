"""Placement: the seed's example pool, capacity limits under concurrency, explanations, bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio

from tm2fs import errors as err
from tm2fs import placement
from tm2fs.core import ROOT, Caller, Service
from tm2fs.store import Backend, PoolStore

M = 2**20
USER = Caller(1000, 1000)


def backend(**kw: object) -> Backend:
    values = dict(id=1, name="b", state="READY", tm="dir", tm_raw={}, capacity=None, total=1000,
                  free=1000, used=0, cost=0, overcommit=1.0, reserved=0.0, priority=0,
                  role="SAN", tags=[], attrs={}, cluster="default", timeout=30.0, error=None,
                  root_ino=2, created=0.0, updated=0.0, monitored=None)
    values.update(kw)
    return Backend(**values)  # type: ignore[arg-type]


def test_room_virtual_and_real_limits() -> None:
    b = backend(total=1000, free=600, reserved=0.1, overcommit=2.0)
    r = placement.room(b, allocated=1500)
    assert r.limit == 1800  # (1000 - 100) x 2
    assert r.real_free == 500  # 600 free - 100 reserved
    assert r.available == 300  # the virtual limit binds first
    assert r.refusal(300) is None
    assert "virtual space" in r.refusal(301)
    assert "real space" in placement.room(backend(total=1000, free=150, reserved=0.1), 0).refusal(60)
    unknown = placement.room(backend(total=None, free=None), 10**15)
    assert unknown.available is None and unknown.refusal(10**15) is None  # unknown is no limit


# ---------------------------------------------------------------------- the seed's pool

SEED = (
    [dict(NAME=f"fast{i}", TAGS="SSD,ISCSI", COST=10, CAPACITY="256M") for i in range(1, 6)]
    + [dict(NAME=f"slow{i}", TAGS="HDD7K,ISCSI", COST=3, CAPACITY="512M") for i in range(1, 11)]
    + [dict(NAME="ceph", TAGS="DISTRIBUTED,CEPH", COST=5, CAPACITY="1G", OVERCOMMIT=2)]
    + [dict(NAME="repo", TAGS="NFS", COST=1, CAPACITY="2G", ROLE="REPOSITORY")]
)


async def seed_pool(service: Service, tmp_path: Path) -> None:
    await service.delete_backend(ROOT, "local")
    for spec in SEED:
        await service.create_backend(ROOT, {"TM": "dir", "TM_RAW": f"PATH={tmp_path}/{spec['NAME']}",
                                            **spec})


class Model:
    """An independent, naive re-statement of the rules: what the policy says should happen."""

    def __init__(self, backends: list[dict]) -> None:
        self.b = {v["NAME"]: dict(v, ALLOCATED=0) for v in backends}

    def room(self, v: dict) -> int:
        reserve = int(v["CAPACITY"] * v["RESERVED"])
        limit = int((v["CAPACITY"] - reserve) * v["OVERCOMMIT"])
        return min(limit - v["ALLOCATED"], int((v["FREE"] - reserve) * v["OVERCOMMIT"]))

    def choose(self, size: int, want: str | None, role: str = "SAN") -> str | None:
        fits = [v for v in self.b.values() if v["ROLE"] == role and self.room(v) >= size
                and (want is None or want in v["TAGS"])]
        if not fits:
            return None
        best = min(fits, key=lambda v: (v["COST"], -self.room(v), v["ID"]))
        best["ALLOCATED"] += size
        return best["NAME"]


@pytest.mark.slow
async def test_seed_pool_thousand_disks_land_where_the_policy_says(service: Service,
                                                                   tmp_path: Path) -> None:
    await seed_pool(service, tmp_path)
    model = Model(await service.list_backends())
    rng = random.Random(7)
    wants = [("TAGS @> SSD", "SSD"), ("TAGS @> DISTRIBUTED", "DISTRIBUTED"), ("", None),
             ("TAGS @> HDD7K & COST < 5", "HDD7K")]
    landed: dict[str | None, int] = {}
    for i in range(1000):
        text, tag = rng.choices(wants, weights=[3, 1, 5, 1])[0]
        size = rng.randrange(4, 24) * M
        expected = model.choose(size, tag)
        try:
            info = await service.allocate(f"auto:vm-{i}/disk.0", size, ROOT,
                                          place={"requirements": text})
            got = info["BACKEND"]
            assert info["ADDRESS"] == f"{got}:vm-{i}/disk.0"
        except err.NoSpace:
            got = None
        assert got == expected, f"disk {i} ({size // M}M, {text!r})"
        landed[got] = landed.get(got, 0) + 1
    # the pool filled up: every SAN backend was used and many disks found no room
    assert all(landed.get(v["NAME"]) for v in model.b.values() if v["ROLE"] == "SAN")
    assert landed.get(None, 0) > 100 and "repo" not in landed
    for v in await service.list_backends():  # nobody past its ratio, and nothing left reserved
        assert v["ALLOCATED"] <= v["CAPACITY"] * v["OVERCOMMIT"]
        assert v["ALLOCATED"] == model.b[v["NAME"]]["ALLOCATED"]
    with service.store.read() as tx:
        assert tx.reservations() == []


async def test_policies_order_candidates(service: Service, tmp_path: Path) -> None:
    await service.delete_backend(ROOT, "local")
    for name, cost, cap, prio in (("a", 5, "100M", 1), ("b", 1, "300M", 3), ("c", 1, "200M", 2)):
        await service.create_backend(ROOT, {"NAME": name, "TM": "dir", "COST": cost, "CAPACITY": cap,
                                            "PRIORITY": prio, "TM_RAW": f"PATH={tmp_path}/{name}"})

    async def order(**options: str) -> list[str]:
        return [v["NAME"] for v in await service.explain(ROOT, "1M", **options) if v["ORDER"]]

    assert await order() == ["b", "c", "a"]  # cost: lowest COST, then most AVAILABLE
    assert await order(policy="packing") == ["a", "c", "b"]
    assert await order(policy="striping") == ["b", "c", "a"]
    assert await order(policy="fixed") == ["b", "c", "a"]
    assert await order(rank="-PRIORITY") == ["a", "c", "b"]
    assert await order(rank="COST * 1000 - AVAILABLE / 1M") == ["a", "c", "b"]
    assert await order(requirements='NAME = "[ab]"') == ["b", "a"]


async def test_explain_says_why_for_every_backend(service: Service, tmp_path: Path) -> None:
    await service.create_backend(ROOT, {"NAME": "ssd", "TM": "dir", "TAGS": "SSD", "CAPACITY": "64M",
                                        "TM_RAW": f"PATH={tmp_path}/ssd"})
    await service.create_backend(ROOT, {"NAME": "off", "TM": "dir", "TAGS": "SSD",
                                        "TM_RAW": f"PATH={tmp_path}/off"})
    await service.create_backend(ROOT, {"NAME": "repo", "TM": "dir", "ROLE": "REPOSITORY",
                                        "TM_RAW": f"PATH={tmp_path}/repo"})
    await service.set_enabled(ROOT, "off", False)
    verdicts = {v["NAME"]: v for v in await service.explain(ROOT, "100M", requirements="TAGS @> SSD")}
    assert "requirements" in verdicts["local"]["VERDICT"] and "TAGS" in verdicts["local"]["VERDICT"]
    assert "virtual space" in verdicts["ssd"]["VERDICT"]
    assert verdicts["off"]["VERDICT"].startswith("state is DISABLED")
    assert verdicts["repo"]["VERDICT"] == "role is REPOSITORY, not SAN"
    with pytest.raises(err.NoSpace) as e:
        await service.allocate("auto:x", "100M", ROOT, place={"requirements": "TAGS @> SSD"})
    assert "ssd: virtual space" in e.value.message and "--explain" in e.value.hint
    # a repository is chosen for base images, and only when asked
    assert [v["NAME"] for v in await service.explain(ROOT, "1M", role="REPOSITORY") if v["ORDER"]] == ["repo"]


async def test_permission_filters_backends(service: Service, tmp_path: Path) -> None:
    await service.create_backend(ROOT, {"NAME": "mine", "TM": "dir", "USER": "1000",
                                        "PERMISSIONS": "0700", "TM_RAW": f"PATH={tmp_path}/mine"})
    await service.create_backend(ROOT, {"NAME": "theirs", "TM": "dir", "COST": 0,
                                        "PERMISSIONS": "0755", "TM_RAW": f"PATH={tmp_path}/theirs"})
    verdicts = {v["NAME"]: v for v in await service.explain(USER, "1M")}
    assert verdicts["theirs"]["VERDICT"].startswith("permission denied")
    info = await service.allocate("auto:vm/disk", "1M", USER)
    assert info["BACKEND"] in ("mine", "local")  # local is 1777 by default


@pytest.mark.parametrize("text, error", [
    ("TAGS @>", "expected"),
    ("FRE > 1G", "unknown attribute"),
    ("(COST > 1", r"'\('"),
    ('NAME = "x', "string"),
])
async def test_bad_requirements_create_nothing(service: Service, text: str, error: str) -> None:
    before = await service.list_backends()
    with pytest.raises(err.InvalidArgument, match=error) as e:
        await service.allocate("auto:vm-1/disk.0", "1M", ROOT, place={"requirements": text})
    assert e.value.status == 400
    assert await service.list_backends() == before
    assert (await service.backend_info("local", True))["IMAGES"] == []
    with pytest.raises(err.NotFound):  # not even the VM folder
        await service.image_info("local:vm-1", ROOT)


async def test_requirements_that_match_nothing_say_so(service: Service) -> None:
    with pytest.raises(err.InvalidArgument, match="match no backend"):
        await service.allocate("auto:d", "1M", ROOT, place={"requirements": "TAGS @> NVME"})
    with pytest.raises(err.InvalidArgument, match="policy"):
        await service.explain(ROOT, "1M", policy="random")
    with pytest.raises(err.InvalidArgument):
        await service.explain(ROOT, "1M", role="CACHE")


async def test_reservations_are_given_back_on_failure(service: Service, tmp_path: Path) -> None:
    info = await service.allocate("auto:d1", "1M", ROOT)
    assert info["BACKEND"] == "local"
    with pytest.raises(err.Exists):  # placed, then the name is taken: the promise is returned
        await service.allocate("auto:d1", "1M", ROOT)
    with pytest.raises(err.NotFound):
        await service.clone("local:nope", "auto:d2", ROOT)
    await service.clone("local:d1", "auto:vm/d2", ROOT)
    with service.store.read() as tx:
        assert tx.reservations() == []
        assert tx.allocated(1) == 2 * M
    assert (await service.backend_info("local"))["ALLOCATED"] == 2 * M


async def test_explicit_backend_and_growth_respect_the_limit(service: Service, tmp_path: Path) -> None:
    await service.create_backend(ROOT, {"NAME": "small", "TM": "dir", "CAPACITY": "10M",
                                        "RESERVED": "20%", "TM_RAW": f"PATH={tmp_path}/small"})
    await service.allocate("small:a", "6M", ROOT)
    with pytest.raises(err.NoSpace, match="cannot take"):
        await service.allocate("small:b", "3M", ROOT)  # 6 + 3 > (10 - 2) x 1
    with pytest.raises(err.NoSpace):
        await service.resize("small:a", "9M", ROOT)
    await service.update_backend(ROOT, "small", {"OVERCOMMIT": "2"})
    await service.resize("small:a", "9M", ROOT)
    await service.allocate("small:b", "7M", ROOT)  # 16 <= 8 x 2
    assert (await service.backend_info("small"))["ALLOCATED"] == 16 * M


async def test_backend_placement_attributes_are_checked(service: Service, tmp_path: Path) -> None:
    for bad in ({"OVERCOMMIT": "0.5"}, {"OVERCOMMIT": "x"}, {"RESERVED": "95%"},
                {"PRIORITY": "high"}):
        with pytest.raises(err.InvalidArgument):
            await service.create_backend(ROOT, {"NAME": "z", "TM": "dir", **bad,
                                                "TM_RAW": f"PATH={tmp_path}/z"})
    with pytest.raises(err.InvalidArgument, match="reserved"):
        await service.create_backend(ROOT, {"NAME": "auto", "TM": "dir"})
    assert [b["NAME"] for b in await service.list_backends()] == ["local"]


# ---------------------------------------------------------------------- concurrency

WORKER = """
import json, sys, trio
from tm2fs import errors as err
from tm2fs.core import ROOT, Service
from tm2fs.store import PoolStore

url, state, host, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

async def main():
    service = await Service(PoolStore(url), state, host=host).start()
    ok = full = 0
    for i in range(count):
        try:
            await service.allocate(f"auto:{host}/d{i}", (1 + i % 3) * 2**20, ROOT)
            ok += 1
        except err.NoSpace:
            full += 1
    await service.stop()
    print(json.dumps({"ok": ok, "full": full}))

trio.run(main)
"""


@pytest.mark.slow
async def test_many_processes_never_overcommit(store_url: str, tmp_path: Path) -> None:
    """8 processes x 200 placements at once on 4 small backends: room for about a fifth."""
    store = PoolStore(store_url)
    service = await Service(store, tmp_path / "state", host="setup").start()
    for i, (cap, ratio) in enumerate((("48M", 1), ("64M", 1), ("32M", 2), ("40M", 1.5))):
        await service.create_backend(ROOT, {"NAME": f"b{i}", "TM": "dir", "CAPACITY": cap,
                                            "OVERCOMMIT": ratio, "TM_RAW": f"PATH={tmp_path}/b{i}"})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [await trio.lowlevel.open_process(
        [sys.executable, "-c", WORKER, store_url, str(tmp_path / "state"), f"p{n}", "200"],
        stdout=subprocess.PIPE, env=env) for n in range(8)]
    results = []
    for p in procs:
        out = await p.stdout.receive_some(1 << 16)  # type: ignore[union-attr]
        assert await p.wait() == 0
        results.append(json.loads(out))
    ok = sum(r["ok"] for r in results)
    assert ok + sum(r["full"] for r in results) == 1600
    with store.read() as tx:
        assert tx.reservations() == []
        images = tx.images()
        assert len(images) == ok  # every success is an image, every failure left nothing
        for b in tx.backends():
            limit = b.total * b.overcommit
            allocated = sum(im.size for im in images if im.backend_id == b.id)
            assert allocated <= limit, f"{b.name} over-committed: {allocated} > {limit}"
            assert allocated > limit - 3 * M  # and it did fill up
            assert sorted(os.listdir(b.tm_raw["PATH"])) == sorted([".tm2fs-backend", *(
                im.key for im in images if im.backend_id == b.id)])
        rows = tx.c.execute(sa.text("SELECT count(*) FROM namespace WHERE image_id IS NOT NULL"))
        assert rows.scalar_one() == ok
    await service.stop()
    store.close()


# ---------------------------------------------------------------------- store migration


def test_v1_store_is_migrated(store_url: str) -> None:
    """A pool store made by the first release (no placement columns) opens and gains them."""
    s = PoolStore(store_url)
    with s.begin() as tx:
        tx.insert_backend(name="old", tm="dir", root_ino=0)
        for column in ("overcommit", "reserved", "priority"):
            tx.c.exec_driver_sql(f"ALTER TABLE storagebackend_pool DROP COLUMN {column}")
        for table in ("reservation", "host", "host_backend", "lease"):
            tx.c.exec_driver_sql(f"DROP TABLE {table}")
        tx.c.exec_driver_sql("ALTER TABLE schema_info DROP COLUMN pool_id")
        tx.c.exec_driver_sql("UPDATE schema_info SET version = 1")
    s.close()
    s = PoolStore(store_url)
    with s.read() as tx:
        b = tx.backend_by_name("old")
        assert (b.overcommit, b.reserved, b.priority) == (1.0, 0.0, 0)
        assert tx.reservations() == []
    s.close()


# ---------------------------------------------------------------------- through the CLI


@pytest.mark.mount
def test_tm2_place_allocate_push_clone_auto(daemon, tmp_path: Path) -> None:
    def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()

    ok(daemon.backend_cli("create", "--name", "ssd1", "--tm", "dir", "--tags", "SSD", "--cost", "10",
                          "--tm-raw", f"PATH={tmp_path}/ssd1"))
    ok(daemon.backend_cli("create", "--name", "repo", "--tm", "dir", "--role", "REPOSITORY",
                          "--tm-raw", f"PATH={tmp_path}/repo"))
    table = ok(daemon.tm2("place", "1G", "-r", "TAGS @> SSD", "--explain"))
    lines = {line.split()[2]: line for line in table.splitlines()[2:] if line.split()}
    assert "candidate" in lines["ssd1"] and "requirements" in lines["local"]
    assert "role is REPOSITORY" in lines["repo"]
    assert ok(daemon.tm2("place", "1G")).strip() == "local"  # cost 0 beats cost 10
    assert ok(daemon.tm2("allocate", "auto:one-7/disk.0", "1M", "-r", "TAGS @> SSD")).strip() \
        == "ssd1:one-7/disk.0"
    assert (daemon.mnt / "ssd1" / "one-7" / "disk.0").stat().st_size == M
    (tmp_path / "base.img").write_bytes(b"base" * 1000)
    assert ok(daemon.tm2("push", str(tmp_path / "base.img"), "auto:base.img")).strip() == \
        "repo:base.img"
    assert (daemon.mnt / "repo" / "base.img").read_bytes() == b"base" * 1000
    assert ok(daemon.tm2("clone", "repo:base.img", "auto:one-7/disk.1", "--policy", "fixed")) \
        .strip() in ("local:one-7/disk.1", "ssd1:one-7/disk.1")
    bad = daemon.tm2("allocate", "auto:x", "1M", "-r", "TAGS @>")
    assert bad.returncode == 1 and "column" in bad.stderr.decode()
    data = json.loads(ok(daemon.tm2("place", "1M", "--json")))
    assert {v["NAME"] for v in data} == {"local", "ssd1", "repo"}


async def test_a_placement_costs_at_most_three_transactions(service: Service, tmp_path: Path) -> None:
    """`allocate auto:` is the reservation, the rows, and at most a share of the once-a-second
    snapshot re-read: the pool store is far away (PostgreSQL), every round trip counts."""
    for i in range(3):
        await service.create_backend(ROOT, {"NAME": f"p{i}", "TM": "dir", "CAPACITY": "1G",
                                            "TM_RAW": f"PATH={tmp_path}/p{i}"})
    await service.allocate("auto:vm/first", "1M", ROOT)  # makes the folder
    before = service.transactions
    for i in range(20):
        await service.allocate(f"auto:vm/d{i}", "1M", ROOT)
    assert (service.transactions - before) / 20 <= 3


async def test_room_taken_between_snapshot_and_reservation_is_no_space(
        service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate's reservation refused (other hosts filled them after the snapshot): the
    answer is 'no space' with a reason per backend, not 'requirements match no backend'."""
    await service.create_backend(ROOT, {"NAME": "cap1", "TM": "dir", "CAPACITY": "1G",
                                        "TM_RAW": f"PATH={tmp_path}/cap1"})

    async def taken(backend_id: int, size: int, key: str | None) -> int:
        raise err.NoSpace("backend cannot take it: filled by another host")

    monkeypatch.setattr(service.placing, "reserve", taken)
    with pytest.raises(err.NoSpace, match="room was just taken"):
        await service.allocate("auto:img", "1M", ROOT, place={"requirements": 'NAME = "cap*"'})
