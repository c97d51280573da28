"""Native sources and native attachments (issue 14): what a hypervisor is told, the rules around
it (permissions, backends, leases, migrations) and the store's upgrade to schema version 5."""

from __future__ import annotations

import errno
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.daemon import Daemon, service_on
from tm2fs import errors as err
from tm2fs.core import ROOT, Caller, Service
from tm2fs.core.native import libvirt_disk, qemu_blockdev
from tm2fs.store import SCHEMA_VERSION, PoolStore, schema_info

TENANT = Caller(1000, 1000)


async def image(svc: Service, address: str, mode: int = 0o600) -> dict:
    return await svc.allocate(address, "1M", ROOT, mode=mode)


# ---------------------------------------------------------------------- what hypervisors are told


async def test_a_dir_image_s_source_is_its_file_in_every_form(service: Service) -> None:
    info = await image(service, "local:vm.img")
    data = service.source("local:vm.img", ROOT, dev="vdb")
    path = service.local_path("local:vm.img", ROOT)
    assert path and data["SOURCE"] == {"type": "file", "path": path}
    assert json.loads(data["QEMU"]) == {"driver": "raw", "node-name": f"tm2fs-{info['ID']}",
                                        "file": {"driver": "file", "filename": path}}
    disk = ET.fromstring(data["LIBVIRT"])
    assert (disk.tag, disk.get("type"), disk.get("device")) == ("disk", "file", "disk")
    assert disk.find("source").get("file") == path  # type: ignore[union-attr]
    assert disk.find("target").get("dev") == "vdb"  # type: ignore[union-attr]
    with pytest.raises(err.InvalidArgument):
        service.source("local:vm.img", ROOT, dev="vda'/><x")


async def test_source_needs_read_permission(service: Service) -> None:
    await image(service, "local:private.img", mode=0o600)
    with pytest.raises(err.PermissionDenied):
        service.source("local:private.img", TENANT)
    await image(service, "local:shared.img", mode=0o644)
    assert service.source("local:shared.img", TENANT)["SOURCE"]["type"] == "file"


async def test_a_backend_without_native_path_says_mount_only(service: Service) -> None:
    await service.create_backend(ROOT, {"NAME": "mem", "TM": "memory"})
    await image(service, "mem:a.img")
    with pytest.raises(err.Unsupported, match="no native path"):
        service.source("mem:a.img", ROOT)
    with pytest.raises(err.Unsupported):
        await service.attach("mem:a.img", "/vm/disk", ROOT, native=True)
    ino = (await service.image_info("mem:a.img", ROOT))["INO"]
    assert service.source_xattr(ino, ROOT) is None


def test_network_disks_render_as_libvirt_and_qemu_take_them() -> None:
    rbd = {"type": "rbd", "pool": "vms", "namespace": "tenant1", "image": "k" * 32,
           "monitors": [{"host": "10.0.0.1", "port": 3300, "protocol": "v2"},
                        {"host": "10.0.0.2", "port": None, "protocol": None}],
           "client_id": "tm2fs", "keyring": "/etc/ceph/k", "conf": "/etc/ceph/c&'.conf"}
    disk = ET.fromstring(libvirt_disk(rbd))
    src = disk.find("source")
    assert src is not None and (disk.get("type"), src.get("protocol")) == ("network", "rbd")
    assert src.get("name") == f"vms/tenant1/{'k' * 32}"
    assert [(h.get("name"), h.get("port")) for h in src.findall("host")] == [
        ("10.0.0.1", "3300"), ("10.0.0.2", None)]
    assert src.find("config").get("file") == "/etc/ceph/c&'.conf"  # type: ignore[union-attr]
    secret = src.find("auth/secret")
    assert secret is not None and secret.get("usage") == "ceph client.tm2fs"
    assert qemu_blockdev(rbd, "n")["file"]["server"] == [{"host": "10.0.0.1", "port": "3300"},
                                                         {"host": "10.0.0.2", "port": "3300"}]
    # a msgr2 monitor on another port cannot be written as host:port: the conf file names it
    odd = {**rbd, "keyring": None, "monitors": [{"host": "h", "port": 4000, "protocol": "v2"}]}
    src = ET.fromstring(libvirt_disk(odd)).find("source")
    assert src is not None and src.findall("host") == [] and src.find("auth") is None
    assert "server" not in qemu_blockdev(odd, "n")["file"]
    iscsi = {"type": "iscsi", "portal": "127.0.0.1:3260", "host": "127.0.0.1", "port": 3260,
             "iqn": "iqn.2026-11.org.tm2fs:" + "a" * 32, "lun": 1,
             "initiator": "iqn.2026-11.org.tm2fs:initiator:h", "chap": None}
    src = ET.fromstring(libvirt_disk(iscsi, "sdb")).find("source")
    assert src is not None and src.get("name") == iscsi["iqn"] + "/1"
    assert src.find("initiator/iqn").get("name") == iscsi["initiator"]  # type: ignore[union-attr]
    assert qemu_blockdev(iscsi, "n")["file"] == {
        "driver": "iscsi", "transport": "tcp", "portal": "127.0.0.1:3260", "target": iscsi["iqn"],
        "lun": 1, "initiator-name": iscsi["initiator"]}


# ---------------------------------------------------------------------- native attachments


async def test_a_native_attachment_counts_pins_and_ends_like_any(service: Service) -> None:
    await image(service, "local:vm.img")
    a = await service.attach("local:vm.img", "/vm/42/disk.0", ROOT, native=True)
    assert a["NATIVE"] and a["SOURCE"]["type"] == "file" and "<disk" in a["LIBVIRT"]
    [row] = (await service.image_info("local:vm.img", ROOT))["ATTACHMENTS"]
    assert row["NATIVE"] and not row["ON_MOUNT"]
    assert (await service.backend_info("local"))["NBVM"] == 1
    with pytest.raises(err.Busy, match="attached"):
        await service.delete("local:vm.img", ROOT)
    await service.detach("local:vm.img", "/vm/42/disk.0", ROOT)
    assert (await service.backend_info("local"))["NBVM"] == 0
    await service.delete("local:vm.img", ROOT)


async def test_a_native_attachment_needs_write_permission_and_a_writable_backend(
        service: Service) -> None:
    await image(service, "local:ro.img", mode=0o644)
    with pytest.raises(err.PermissionDenied):  # the VM would write it, past the mount's checks
        await service.attach("local:ro.img", "/vm/1/disk", TENANT, native=True)
    await service.attach("local:ro.img", "/vm/1/disk", TENANT)  # through the mount: as before
    await service.set_enabled(ROOT, "local", False)
    with pytest.raises(err.ReadOnly):
        await service.attach("local:ro.img", "/vm/2/disk", ROOT, native=True)


@pytest.mark.postgres
@pytest.mark.slow
async def test_takeover_hands_the_lease_to_a_migration_s_destination(
        pg_server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = pg_server.new_database("native_takeover")
    shared = tmp_path / "shared"
    async with service_on(url, tmp_path / "a", host="hostA") as a:
        await a.create_backend(ROOT, {"NAME": "nfs", "TM": "dir", "TM_RAW": f"PATH={shared}"})
        await image(a, "nfs:vm.img", mode=0o666)
        await a.attach("nfs:vm.img", "/vm/disk", ROOT, native=True)
        async with service_on(url, tmp_path / "b", host="hostB") as b:
            with pytest.raises(err.Busy, match="hostA"):
                await b.attach("nfs:vm.img", "/vm/disk", ROOT, native=True)
            with pytest.raises(err.NotPermitted):  # only who could end hostA's attachment
                await b.attach("nfs:vm.img", "/vm/disk", TENANT, native=True, takeover=True)
            got = await b.attach("nfs:vm.img", "/vm/disk", ROOT, native=True, takeover=True)
            assert got["TAKEN_FROM"] == "hostA"
            assert "taken over from host hostA by hostB" in caplog.text
            with pytest.raises(err.Busy, match="hostB"):  # hostA may no longer write it
                await a.open_address("nfs:vm.img", ROOT, writable=True)
            await a.detach("nfs:vm.img", "/vm/disk", ROOT)  # the source host's VM is gone...
            with pytest.raises(err.Busy, match="hostB"):  # ...without hostB's lease
                await a.open_address("nfs:vm.img", ROOT, writable=True)
            await b.detach("nfs:vm.img", "/vm/disk", ROOT)
        await a.release(await a.open_address("nfs:vm.img", ROOT, writable=True))


# ---------------------------------------------------------------------- the store


def test_a_v4_store_s_attachments_are_through_the_mount(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    with PoolStore(url) as s, s.begin() as tx:
        bid = tx.insert_backend(name="old", tm="dir", root_ino=0)
        tx.c.exec_driver_sql(f"INSERT INTO image (backend_id, key, size, created) "
                             f"VALUES ({bid}, 'k', 0, 0)")
        iid = tx.c.exec_driver_sql("SELECT id FROM image").scalar_one()
    engine = sa.create_engine(url)
    with engine.begin() as c:  # as tm2fs of schema version 4 left it
        c.exec_driver_sql("ALTER TABLE attachment DROP COLUMN native")
        c.exec_driver_sql(f"INSERT INTO attachment (image_id, host, path, created, uid) "
                          f"VALUES ({iid}, 'h', '/vm/disk', 0, 0)")
        c.exec_driver_sql("UPDATE schema_info SET version = 4")
    engine.dispose()
    with PoolStore(url) as s, s.begin() as tx:
        assert tx.c.execute(sa.select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION == 5
        [old] = tx.attachments(image_id=iid)
        assert old.native is False or old.native == 0
        tx.insert_attachment(iid, "h", "/vm/disk2", native=True)
        assert [bool(a.native) for a in tx.attachments(image_id=iid)] == [False, True]


# ---------------------------------------------------------------------- the CLI and the mount


@pytest.mark.mount
def test_tm2_source_attach_native_and_the_mount_s_attribute(daemon: Daemon, tmp_path: Path) -> None:
    def ok(*args: str, user: int | None = None) -> str:
        done = daemon.tm2(*args, user=user)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    ok("allocate", "local:vm.img", "1M")
    src = json.loads(ok("source", "local:vm.img"))
    assert src["type"] == "file" and os.path.isfile(src["path"])
    assert json.loads(ok("source", "--format", "qemu", "local:vm.img"))["file"]["filename"] == src["path"]
    disk = ET.fromstring(ok("source", "--format", "libvirt", "--dev", "sdc", "local:vm.img"))
    assert disk.find("source").get("file") == src["path"]  # type: ignore[union-attr]
    on_mount = daemon.mnt / "local" / "vm.img"
    assert json.loads(os.getxattr(on_mount, "user.tm2fs.source")) == src
    assert "user.tm2fs.source" in os.listxattr(on_mount)
    with pytest.raises(OSError) as e:
        os.getxattr(on_mount, "user.other")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.getxattr(daemon.mnt / "local", "user.tm2fs.source")
    assert e.value.errno == errno.ENODATA

    link = tmp_path / "vm-42" / "disk.0"
    link.parent.mkdir()
    link.write_text("in the way")  # PATH cannot be made: the attachment is undone
    assert daemon.tm2("attach", "--native", "local:vm.img", str(link)).returncode == 1
    assert json.loads(ok("info", "--json", "local:vm.img"))["ATTACHMENTS"] == []
    link.unlink()
    ok("attach", "--native", "local:vm.img", str(link))
    assert os.readlink(link) == src["path"]  # the hypervisor opens the file itself
    info = json.loads(ok("info", "--json", "local:vm.img"))
    assert [(a["PATH"], a["NATIVE"]) for a in info["ATTACHMENTS"]] == [(str(link), True)]
    assert daemon.backends()["local"]["NBVM"] == 1
    assert daemon.tm2("delete", "local:vm.img").returncode == 1
    # the VM writes the file itself: the mount and the API may read it, not write beside it
    assert on_mount.read_bytes() == bytes(2**20)
    with pytest.raises(OSError) as e:
        open(on_mount, "r+b").close()
    assert e.value.errno == errno.EBUSY
    refused = daemon.tm2("write", "local:vm.img", input=b"x")
    assert refused.returncode == 1 and b"attached natively" in refused.stderr
    ok("detach", "local:vm.img", str(link))
    open(on_mount, "r+b").close()
    assert not os.path.lexists(link)
    assert daemon.backends()["local"]["NBVM"] == 0
    inside = daemon.tm2("attach", "--native", "local:vm.img", str(daemon.mnt / "local" / "x"))
    assert inside.returncode == 1 and b"on the mount" in inside.stderr


async def test_a_backend_remote_here_has_no_native_path_here(tmp_path: Path) -> None:
    """A `dir` backend local to another host: neither a source nor a native attachment here
    (as there is no mount path here either); on its own host, both."""
    url = f"sqlite:///{tmp_path}/pool.db"
    async with service_on(url, tmp_path / "o", host="otherhost") as other:
        await other.create_backend(ROOT, {"NAME": "theirs", "TM": "dir",
                                          "TM_RAW": f"PATH={tmp_path}/theirs\nHOST=otherhost"})
        await image(other, "theirs:vm.img")
        assert other.source("theirs:vm.img", ROOT)["SOURCE"]["type"] == "file"
    async with service_on(url, tmp_path / "h", host="testhost") as here:
        with pytest.raises(err.Remote):
            here.source("theirs:vm.img", ROOT)
        with pytest.raises(err.Remote):
            await here.attach("theirs:vm.img", "/vm/disk", ROOT, native=True)
