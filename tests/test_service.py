"""The service layer's rules, on SQLite and PostgreSQL: actions, admin, bad input, recovery."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tm2fs import errors as err
from tm2fs.core import ROOT, Caller, Service
from tm2fs.store import PoolStore

USER = Caller(1000, 1000)


async def snapshot(service: Service) -> list[dict]:
    """What a user could see of the pool, minus clocks."""
    out = []
    for b in await service.list_backends():
        b = {k: v for k, v in b.items() if k not in ("UPDATED", "MONITORED", "FREE", "USED", "AVAILABLE")}
        b["IMAGES"] = [(i["PATH"], i["SIZE"]) for i in (await service.backend_info(b["ID"], True))["IMAGES"]]
        out.append(b)
    return out


async def write_all(service: Service, address: str, data: bytes) -> None:
    of = await service.open_address(address, ROOT, writable=True, create=True, truncate=True)
    try:
        await service.write(of, 0, data)
        await service.fsync(of)
    finally:
        await service.release(of)


async def read_all(service: Service, address: str) -> bytes:
    of = await service.open_address(address, ROOT, writable=False)
    try:
        return await service.read(of, 0, of.image.size)
    finally:
        await service.release(of)


async def second_backend(service: Service, tmp_path: Path, name: str = "b2") -> dict:
    return await service.create_backend(ROOT, {"NAME": name, "TM": "dir",
                                               "TM_RAW": f"PATH={tmp_path}/{name}"})


async def test_default_backend(service: Service, tmp_path: Path) -> None:
    [b] = await service.list_backends()
    assert (b["NAME"], b["STATE"], b["TM"], b["ROLE"], b["NBIMAGE"]) == ("local", "READY", "dir",
                                                                        "SAN", 0)
    assert b["TM_RAW"]["PATH"] == str(tmp_path / "state" / "backends" / "local")
    assert b["CAPACITY"] > 0 and 0 <= b["FREE"] <= b["CAPACITY"]
    await service.ensure_default_backend()  # idempotent
    assert len(await service.list_backends()) == 1


async def test_eleven_actions(service: Service, tmp_path: Path) -> None:
    await second_backend(service, tmp_path)
    info = await service.allocate("local:a.img", "10M", ROOT)  # allocate
    assert info["SIZE"] == 10 * 2**20
    assert service.get_size("local:a.img", ROOT) == 10 * 2**20  # get-size
    await write_all(service, "local:a.img", b"x" * 5000)  # write (replaces, like `cat >`)
    assert await read_all(service, "local:a.img") == b"x" * 5000  # read
    await service.resize("local:a.img", "1M", ROOT)  # resize (grow)
    assert service.get_size("local:a.img", ROOT) == 2**20
    assert (await read_all(service, "local:a.img"))[:5001] == b"x" * 5000 + b"\0"
    await service.clone("local:a.img", "local:b.img", ROOT)  # clone inside a backend
    await service.clone("local:a.img", "b2:c.img", ROOT)  # clone across backends
    assert await read_all(service, "b2:c.img") == await read_all(service, "local:a.img")
    # push/get are write/read with exclusive create; through the service they share open_address
    of = await service.open_address("b2:pushed", ROOT, writable=True, create=True, exclusive=True)
    await service.write(of, 0, b"pushed")
    await service.release(of)
    with pytest.raises(err.Exists):
        await service.open_address("b2:pushed", ROOT, writable=True, create=True, exclusive=True)
    link = str(tmp_path / "disk.0")
    await service.attach("local:a.img", link, ROOT)  # attach
    assert (await service.backend_info("local"))["NBVM"] == 1
    with pytest.raises(err.Busy):
        await service.delete("local:a.img", ROOT)
    await service.detach("local:a.img", link, ROOT)  # detach
    await service.delete("local:a.img", ROOT)  # delete
    with pytest.raises(err.NotFound):
        service.get_size("local:a.img", ROOT)
    counts = {b["NAME"]: (b["NBIMAGE"], b["NBVM"]) for b in await service.list_backends()}
    assert counts == {"local": (1, 0), "b2": (2, 0)}


async def test_clone_is_independent_and_sparse(service: Service) -> None:
    await service.allocate("local:base", "64M", ROOT)
    of = await service.open_address("local:base", ROOT, writable=True)
    await service.write(of, 2**20, b"data")
    await service.release(of)
    await service.clone("local:base", "local:copy", ROOT)
    of = await service.open_address("local:copy", ROOT, writable=True)
    await service.write(of, 2**20, b"DATA")
    await service.release(of)
    assert (await read_all(service, "local:base"))[2**20:2**20 + 4] == b"data"
    assert (await read_all(service, "local:copy"))[2**20:2**20 + 4] == b"DATA"
    path = service.local_path("local:copy", ROOT)
    assert os.stat(path).st_blocks * 512 < 2**20  # 64 MiB image, a few KiB on disk


async def test_resize_refuses_to_shrink_unless_asked(service: Service) -> None:
    await service.allocate("local:a", "2M", ROOT)
    with pytest.raises(err.InvalidArgument, match="shrink") as e:
        await service.resize("local:a", "1M", ROOT)
    assert "--shrink" in e.value.hint
    assert service.get_size("local:a", ROOT) == 2 * 2**20
    await service.resize("local:a", "1M", ROOT, shrink=True)
    assert service.get_size("local:a", ROOT) == 2**20


@pytest.mark.parametrize("address", ["local:..", "local:", "local:a\0b",
                                     "local:" + "x" * 256, "local:/abs", "nocolon", ":x",
                                     "nosuch:a", "99:a", "local:a//b"])
async def test_bad_addresses_change_nothing(service: Service, address: str) -> None:
    before = await snapshot(service)
    with pytest.raises(err.Tm2Error) as e:
        await service.allocate(address, "1M", ROOT)
    assert e.value.status in (400, 404)
    assert await snapshot(service) == before


@pytest.mark.parametrize("size", ["-1", "10Q", "1.5.2G", "", "abc", "9E", str(2**63)])
async def test_bad_sizes_change_nothing(service: Service, size: str) -> None:
    before = await snapshot(service)
    with pytest.raises(err.Tm2Error) as e:
        await service.allocate("local:x", size, ROOT)
    assert e.value.status == 400
    assert await snapshot(service) == before
    assert os.listdir((await service.backend_info("local"))["TM_RAW"]["PATH"]) == [".tm2fs-backend"]


async def test_larger_than_the_backend_is_refused(service: Service) -> None:
    cap = (await service.backend_info("local"))["CAPACITY"]
    with pytest.raises(err.NoSpace, match="cannot take"):
        await service.allocate("local:huge", cap + 1, ROOT)
    assert (await service.backend_info("local"))["NBIMAGE"] == 0


@pytest.mark.parametrize("spec", [
    {"NAME": "a/b", "TM": "dir"}, {"NAME": "..", "TM": "dir"}, {"NAME": "", "TM": "dir"},
    {"NAME": "x" * 256, "TM": "dir"}, {"NAME": "a\0b", "TM": "dir"}, {"NAME": "ok"},
    {"NAME": "ok", "TM": "nosuchdriver"}, {"NAME": "ok", "TM": "dir", "ROLE": "BOSS"},
    {"NAME": "ok", "TM": "dir", "COST": "cheap"}, {"NAME": "ok", "TM": "dir", "CAPACITY": "-5G"},
    {"NAME": "ok", "TM": "dir", "TM_RAW": "PATH=relative/dir"},
    {"NAME": "ok", "TM": "dir", "TM_RAW": "PATH=/dev/null/x"},
    {"NAME": "ok", "TM": "dir", "TM_RAW": "NOPE=1"}, {"NAME": "ok", "TM": "dir", "TIMEOUT": "0"},
    {"NAME": "ok", "TM": "dir", "USER": "no-such-user-here"},
    {"NAME": "ok", "TM": "dir", "PERMISSIONS": "rwx"}, {"NAME": "ok", "TM": "dir", "TAGS": "a b"},
    {"NAME": "local", "TM": "dir"},
])
async def test_bad_backend_specs_change_nothing(service: Service, spec: dict) -> None:
    before = await snapshot(service)
    with pytest.raises(err.Tm2Error) as e:
        await service.create_backend(ROOT, spec)
    assert e.value.status in (400, 409)
    assert await snapshot(service) == before


async def test_only_root_administers(service: Service) -> None:
    before = await snapshot(service)
    with pytest.raises(err.PermissionDenied):
        await service.create_backend(USER, {"NAME": "mine", "TM": "dir"})
    for call in (service.update_backend(USER, "local", {"COST": 1}),
                 service.set_enabled(USER, "local", False),
                 service.delete_backend(USER, "local")):
        with pytest.raises(err.PermissionDenied):
            await call
    assert await snapshot(service) == before


async def test_user_and_group_come_from_the_caller(service: Service, tmp_path: Path) -> None:
    b = await service.create_backend(ROOT, {"NAME": "shared", "TM": "dir",
                                            "TM_RAW": f"PATH={tmp_path}/shared",
                                            "USER": "1000", "GROUP": "1000", "PERMISSIONS": "0770"})
    assert (b["UID"], b["GID"], b["PERMISSIONS"]) == (1000, 1000, "0770")
    info = await service.allocate("shared:img", "1M", USER)
    attr = service.getattr(info["INO"])
    assert (attr.uid, attr.gid) == (1000, 1000)
    with pytest.raises(err.PermissionDenied):  # other users cannot enter a 0770 backend
        await service.allocate("shared:img2", "1M", Caller(2000, 2000))
    with pytest.raises(err.PermissionDenied):
        await service.delete("shared:img", Caller(2000, 2000))
    assert await service.allocate("shared:img3", "1M", Caller(2000, 1000))  # group member


async def test_delete_backend_refused_while_it_holds_images(service: Service, tmp_path: Path) -> None:
    await second_backend(service, tmp_path)
    await service.allocate("b2:a", "1M", ROOT)
    with pytest.raises(err.Busy, match="holds 1 image"):
        await service.delete_backend(ROOT, "b2")
    assert (await service.backend_info("b2"))["NBIMAGE"] == 1
    await service.delete_backend(ROOT, "b2", force=True)
    assert [b["NAME"] for b in await service.list_backends()] == ["local"]
    assert os.listdir(tmp_path / "b2") == []


async def test_update_backend(service: Service) -> None:
    b = await service.update_backend(ROOT, "local", {"NAME": "fast", "COST": "10",
                                                     "TAGS": "SSD,ISCSI", "DISK_TYPE": "FILE",
                                                     "CAPACITY": "1G"})
    assert (b["NAME"], b["COST"], b["TAGS"], b["ATTRS"]) == ("fast", 10, ["SSD", "ISCSI"],
                                                             {"DISK_TYPE": "FILE"})
    assert b["CAPACITY"] == 2**30 and b["FREE"] <= 2**30
    assert service.lookup(1, "fast").ino == service.find_backend("fast").root_ino
    with pytest.raises(err.NotFound):
        service.lookup(1, "local")
    b = await service.update_backend(ROOT, "fast", {"DISK_TYPE": ""})  # empty removes
    assert b["ATTRS"] == {}
    with pytest.raises(err.InvalidArgument):
        await service.update_backend(ROOT, "fast", {"TM": "rbd"})


async def test_disabled_backend_is_read_only(service: Service) -> None:
    await service.allocate("local:a", "1M", ROOT)
    await service.set_enabled(ROOT, "local", False)
    assert (await service.backend_info("local"))["STATE"] == "DISABLED"
    with pytest.raises(err.ReadOnly):
        await service.allocate("local:b", "1M", ROOT)
    with pytest.raises(err.ReadOnly):
        await service.delete("local:a", ROOT)
    assert len(await read_all(service, "local:a")) == 2**20
    await service.monitor_backend(service.find_backend("local").id)  # stays DISABLED
    assert (await service.backend_info("local"))["STATE"] == "DISABLED"
    await service.set_enabled(ROOT, "local", True)
    assert (await service.backend_info("local"))["STATE"] == "READY"
    await service.delete("local:a", ROOT)


@pytest.mark.logs_ok
async def test_error_backend_answers_eio_and_recovers(service: Service, tmp_path: Path) -> None:
    await second_backend(service, tmp_path)
    await write_all(service, "local:a", b"keep me")
    path = Path((await service.backend_info("local"))["TM_RAW"]["PATH"])
    path.rename(path.with_name("moved"))
    await service.monitor_backend(service.find_backend("local").id)
    info = await service.backend_info("local")
    assert info["STATE"] == "ERROR" and "gone" in info["ERROR"]
    with pytest.raises(err.BackendUnavailable) as e:
        await read_all(service, "local:a")
    assert e.value.errno == 5  # EIO
    await service.allocate("b2:still-works", "1M", ROOT)  # the rest of the pool works
    path.with_name("moved").rename(path)
    await service.monitor_backend(service.find_backend("local").id)
    assert (await service.backend_info("local"))["STATE"] == "READY"
    assert await read_all(service, "local:a") == b"keep me"


async def test_namespace_rules(service: Service, tmp_path: Path) -> None:
    root = service.find_backend("local").root_ino
    d = await service.mkdir(root, "vm-42", 0o755, ROOT)
    with pytest.raises(err.Exists):
        await service.mkdir(root, "vm-42", 0o755, ROOT)
    with pytest.raises(err.NotPermitted):  # the top level holds only backends
        await service.mkdir(1, "newdir", 0o755, ROOT)
    await service.allocate("local:vm-42/disk.0", "1M", ROOT)
    with pytest.raises(err.NotEmpty):
        await service.rmdir(root, "vm-42", ROOT)
    key = (await service.image_info("local:vm-42/disk.0", ROOT))["KEY"]
    await service.rename(d.ino, "disk.0", root, "moved", ROOT)  # metadata only: key unchanged
    assert (await service.image_info("local:moved", ROOT))["KEY"] == key
    await second_backend(service, tmp_path)
    with pytest.raises(err.CrossBackend) as e:
        await service.rename(root, "moved", service.find_backend("b2").root_ino, "x", ROOT)
    assert e.value.errno == 18  # EXDEV
    with pytest.raises(err.InvalidArgument):  # a directory into itself
        await service.rename(root, "vm-42", d.ino, "inner", ROOT)
    await service.allocate("local:other", "2M", ROOT)
    await service.rename(root, "other", root, "moved", ROOT)  # replaces, old data goes
    assert service.get_size("local:moved", ROOT) == 2 * 2**20
    assert (await service.backend_info("local"))["NBIMAGE"] == 1


async def test_symlink_on_the_mount_is_an_attachment(service: Service) -> None:
    root = service.find_backend("local").root_ino
    await service.allocate("local:img", "1M", ROOT)
    d = await service.mkdir(root, "vm-1", 0o755, ROOT)
    await service.symlink(d.ino, "disk.0", "../img", ROOT)
    await service.symlink(d.ino, "abs", f"{service.mountpoint}/local/img", ROOT)
    await service.symlink(d.ino, "elsewhere", "/etc/passwd", ROOT)
    info = await service.image_info("local:img", ROOT)
    assert sorted(a["PATH"] for a in info["ATTACHMENTS"]) == [
        f"{service.mountpoint}/local/vm-1/abs", f"{service.mountpoint}/local/vm-1/disk.0"]
    assert (await service.backend_info("local"))["NBVM"] == 2
    await service.rename(d.ino, "disk.0", d.ino, "disk.1", ROOT)
    assert f"{service.mountpoint}/local/vm-1/disk.1" in [
        a["PATH"] for a in (await service.image_info("local:img", ROOT))["ATTACHMENTS"]]
    with pytest.raises(err.Busy):
        await service.detach("local:img", f"{service.mountpoint}/local/vm-1/abs", ROOT)
    await service.unlink(d.ino, "disk.1", ROOT)
    await service.unlink(d.ino, "abs", ROOT)
    assert (await service.backend_info("local"))["NBVM"] == 0


async def test_unlinked_while_open_keeps_data_until_close(service: Service) -> None:
    await write_all(service, "local:a", b"still here")
    path = service.local_path("local:a", ROOT)
    of = await service.open_address("local:a", ROOT, writable=False)
    await service.delete("local:a", ROOT)
    assert await service.read(of, 0, 100) == b"still here"
    assert os.path.exists(path)
    await service.release(of)
    assert not os.path.exists(path)
    assert (await service.backend_info("local"))["NBIMAGE"] == 0


async def test_fsync_commits_size(service: Service, store: PoolStore) -> None:
    info = await service.allocate("local:a", 0, ROOT)
    of = await service.open_address("local:a", ROOT, writable=True)
    await service.write(of, 4096, b"z" * 100)
    assert service.getattr(info["INO"]).size == 4196  # live size while open
    with store.read() as tx:
        assert tx.image(info["ID"]).size == 0  # not yet committed
    await service.fsync(of)
    with store.read() as tx:
        assert tx.image(info["ID"]).size == 4196
    await service.release(of)


async def test_reconcile_after_crash(service: Service, store: PoolStore, tmp_path: Path) -> None:
    """A daemon killed mid-way leaves unnamed keys, orphan rows and stale sizes: all are fixed."""
    await write_all(service, "local:kept", b"k" * 10)
    backing = Path((await service.backend_info("local"))["TM_RAW"]["PATH"])
    (backing / ("f" * 32)).write_bytes(b"leftover")  # allocated, crashed before the rows
    os.truncate(service.local_path("local:kept", ROOT), 4096)  # written, crashed before fsync
    with store.begin() as tx:  # rows of an image whose unlink did not finish
        tx.insert_image(service.find_backend("local").id, "e" * 32, 1)
    fresh = await Service(store, tmp_path / "state", host="testhost").start()
    fixed = await fresh.reconcile()
    assert fixed == {"orphans": 1, "leftovers": 1, "sizes": 1, "links": 0,
                     "reservations": 0, "leases": 0}
    assert fresh.get_size("local:kept", ROOT) == 4096
    assert sorted(os.listdir(backing)) == [".tm2fs-backend",  # the marker: the sweep's licence
                                           (await service.image_info("local:kept", ROOT))["KEY"]]
    assert await fresh.reconcile() == {"orphans": 0, "leftovers": 0, "sizes": 0, "links": 0,
                                       "reservations": 0, "leases": 0}
    await fresh.stop(clean=False)


async def test_statfs(service: Service) -> None:
    root = service.find_backend("local").root_ino
    cap = service.statfs(root)
    assert cap.total and cap.free is not None and cap.free <= cap.total
    assert service.statfs(1).total == cap.total


async def test_permissions_parse(service: Service, tmp_path: Path) -> None:
    b = await service.create_backend(ROOT, {"NAME": "one", "TM": "dir", "PERMISSIONS": "um- u-- ---",
                                            "TM_RAW": f"PATH={tmp_path}/one"})
    assert b["PERMISSIONS"] == "0751"
    root = service.find_backend("one").root_ino
    assert stat.S_IMODE(service.getattr(root).mode) == 0o751
