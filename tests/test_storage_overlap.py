"""A backend's storage never overlaps another's, the state directory or a system directory; the
crash sweep deletes only in a directory whose marker proves it is the backend's (issue #13)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.daemon import Daemon
from tm2fs import errors as err
from tm2fs.core import ROOT, Service
from tm2fs.core.ownership import MARKER
from tm2fs.store import SCHEMA_VERSION, PoolStore, schema_info

FOREIGN = "a" * 32  # a file named like an image key that this backend did not make


async def dir_backend(service: Service, name: str, path: Path | str) -> dict:
    return await service.create_backend(ROOT, {"NAME": name, "TM": "dir", "TM_RAW": f"PATH={path}"})


async def write_all(service: Service, address: str, data: bytes) -> None:
    of = await service.open_address(address, ROOT, writable=True, create=True, truncate=True)
    try:
        await service.write(of, 0, data)
        await service.fsync(of)
    finally:
        await service.release(of)


async def refused(service: Service, spec: dict, *words: str) -> str:
    """The create is refused with InvalidArgument whose message has `words`; nothing is added."""
    before = [b["NAME"] for b in await service.list_backends()]
    with pytest.raises(err.InvalidArgument) as e:
        await service.create_backend(ROOT, spec)
    for w in words:
        assert w in e.value.message, e.value.message
    assert [b["NAME"] for b in await service.list_backends()] == before
    return e.value.message


def marker(directory: Path | str) -> dict:
    return json.loads((Path(directory) / MARKER).read_text())


def pool_id(store: PoolStore) -> str:
    with store.read() as tx:
        return tx.pool_id()


# ------------------------------------------------------------------------------ create, update


async def test_same_path_as_another_backend_is_refused(service: Service, tmp_path: Path) -> None:
    await dir_backend(service, "b1", tmp_path / "b1")
    msg = await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/b1"},
                        "backend b1", str(tmp_path / "b1"))
    assert "is the directory of" in msg
    # the trailing slash and `..` spell the same directory
    await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/x/../b1/"},
                  "backend b1")
    # so does the default backend's directory
    local = (await service.backend_info("local"))["TM_RAW"]["PATH"]
    await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={local}"}, "backend local")


async def test_path_inside_or_around_another_backend_is_refused(service: Service,
                                                                tmp_path: Path) -> None:
    await dir_backend(service, "b1", tmp_path / "outer" / "b1")
    await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/outer/b1/sub"},
                  "is inside the directory of backend b1")
    assert not (tmp_path / "outer" / "b1" / "sub").exists()  # refused before it was made
    await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/outer"},
                  "contains the directory of backend b1")
    await dir_backend(service, "b2", tmp_path / "outer" / "b2")  # a sibling is fine
    await dir_backend(service, "b3", tmp_path / "outer" / "b1x")  # a prefix of the name too


async def test_symlinks_and_bind_mounts_are_seen_through(service: Service, tmp_path: Path) -> None:
    await dir_backend(service, "b1", tmp_path / "b1")
    (tmp_path / "link").symlink_to(tmp_path / "b1")
    await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/link"},
                  "backend b1")
    (tmp_path / "bind").mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "b1"), str(tmp_path / "bind")], check=True)
    try:
        await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/bind"},
                      "is the directory of backend b1")
        await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/bind/sub"},
                      "is inside the directory of backend b1")
    finally:
        subprocess.run(["umount", str(tmp_path / "bind")], check=True)


async def test_state_directory_is_refused(service: Service, tmp_path: Path) -> None:
    state = tmp_path / "state"
    for path, how in ((state, "is the daemon's state directory"),
                      (state / "sub", "is inside the daemon's state directory"),
                      (state / "backends", "is inside the daemon's state directory"),
                      (tmp_path, "contains the daemon's state directory")):
        await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={path}"}, how)
    # the state directory's own shelf of backends is where the default ones go
    await service.create_backend(ROOT, {"NAME": "b2", "TM": "dir"})
    await dir_backend(service, "b3", state / "backends" / "elsewhere")


@pytest.mark.parametrize("path", ["/", "/etc", "/usr", "/var", "/bin", "/lib", "/lib64", "/proc",
                                  "/sys", "/dev", "/run", "/boot", "/sbin", "/usr/../etc", "/etc/"])
async def test_system_directories_are_refused(service: Service, path: str) -> None:
    await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={path}"},
                  "is a system directory")


@pytest.fixture
def var_lib_dir() -> Iterator[Path]:
    path = Path("/var/lib") / f"tm2fs-overlap-test-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_below_var_is_allowed(service: Service, var_lib_dir: Path) -> None:
    await dir_backend(service, "b2", var_lib_dir)
    assert marker(var_lib_dir)["backend"] == service.find_backend("b2").id


async def test_legacy_backend_on_a_dir_backend_s_path_is_refused(service: Service,
                                                                  tmp_path: Path) -> None:
    await dir_backend(service, "b1", tmp_path / "b1")
    await refused(service, {"NAME": "old", "TM": "legacy", "TM_RAW": {"PATH": str(tmp_path / "b1")}},
                  "backend b1")
    await refused(service, {"NAME": "old", "TM": "legacy", "TM_RAW": {"PATH": "/etc"}},
                  "is a system directory")
    await service.create_backend(ROOT, {"NAME": "old", "TM": "legacy",
                                        "TM_RAW": {"PATH": str(tmp_path / "old")}})
    await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/old"},
                  "backend old")


async def test_update_to_another_backend_s_path_is_refused(service: Service, tmp_path: Path) -> None:
    await dir_backend(service, "b1", tmp_path / "b1")
    await dir_backend(service, "b2", tmp_path / "b2")
    for path, how in ((tmp_path / "b1", "backend b1"), ("/", "system directory"),
                      (tmp_path / "state", "state directory")):
        with pytest.raises(err.InvalidArgument, match=how):
            await service.update_backend(ROOT, "b2", {"TM_RAW": f"PATH={path}"})
        assert (await service.backend_info("b2"))["TM_RAW"]["PATH"] == str(tmp_path / "b2")
    # its own directory is no overlap; a new empty one gets the marker
    await service.update_backend(ROOT, "b2", {"TM_RAW": f"PATH={tmp_path}/b2"})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / FOREIGN).write_bytes(b"someone's disk")
    with pytest.raises(err.InvalidArgument, match=r"1 image file\(s\) this backend did not make"):
        await service.update_backend(ROOT, "b2", {"TM_RAW": f"PATH={tmp_path}/full"})
    await service.update_backend(ROOT, "b2", {"TM_RAW": f"PATH={tmp_path}/b2new"})
    assert marker(tmp_path / "b2new")["backend"] == service.find_backend("b2").id
    assert not (tmp_path / "b2" / MARKER).exists()  # the old directory is free again
    await dir_backend(service, "b3", tmp_path / "b2")


async def test_a_backend_another_host_just_added_counts(service: Service, store: PoolStore,
                                                       tmp_path: Path) -> None:
    """A row this host has not heard of yet is checked in the create's own transaction."""
    with store.begin() as tx:  # as another daemon on the same pool store would add it
        tx.insert_backend(tm="dir", tm_raw={"PATH": str(tmp_path / "theirs")}, state="READY",
                          name="theirs", root_ino=0)
    assert "theirs" not in [b["NAME"] for b in await service.list_backends()]
    with pytest.raises(err.InvalidArgument, match="is inside the directory of backend theirs"):
        await dir_backend(service, "b2", tmp_path / "theirs" / "sub")
    with pytest.raises(err.InvalidArgument, match="is the directory of backend theirs"):
        await service.update_backend(ROOT, "local", {"TM_RAW": f"PATH={tmp_path}/theirs"})
    with store.read() as tx:
        assert [b.name for b in tx.backends()] == ["local", "theirs"]


async def test_a_directory_with_another_s_images_or_marker_is_refused(service: Service,
                                                                      tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / FOREIGN).write_bytes(b"someone's disk")
    await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/full"},
                  "1 image file(s) this backend did not make", FOREIGN)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MARKER).write_text('{"pool": "0123", "backend": 7}\n')
    await refused(service, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/other"},
                  "names backend 7 of pool 0123")
    assert (tmp_path / "full" / FOREIGN).read_bytes() == b"someone's disk"


async def test_marker_names_pool_and_backend(service: Service, store: PoolStore,
                                             tmp_path: Path) -> None:
    await dir_backend(service, "b1", tmp_path / "b1")
    b1 = service.find_backend("b1")
    assert marker(tmp_path / "b1") == {"pool": pool_id(store), "backend": b1.id}
    assert len(pool_id(store)) == 32
    local = service.find_backend("local")
    assert marker(local.tm_raw["PATH"]) == {"pool": pool_id(store), "backend": local.id}
    # deleting the backend drops its marker: the directory can serve a new backend
    await service.delete_backend(ROOT, "b1")
    assert not (tmp_path / "b1" / MARKER).exists()
    await dir_backend(service, "b1again", tmp_path / "b1")
    assert marker(tmp_path / "b1")["backend"] == service.find_backend("b1again").id


async def test_a_deleted_backend_s_marker_may_be_replaced(service: Service, tmp_path: Path) -> None:
    """A marker of this pool naming a backend that is gone (its removal failed) is stale."""
    await dir_backend(service, "b1", tmp_path / "b1")
    old = (tmp_path / "b1" / MARKER).read_text()
    await service.delete_backend(ROOT, "b1")
    (tmp_path / "b1" / MARKER).write_text(old)
    await dir_backend(service, "b2", tmp_path / "b1")


def test_a_v2_store_gets_a_pool_identity(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    PoolStore(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as c:  # as tm2fs of schema version 2 left it
        c.exec_driver_sql("ALTER TABLE schema_info DROP COLUMN pool_id")
        c.exec_driver_sql("UPDATE schema_info SET version = 2")
    engine.dispose()
    with PoolStore(url) as store, store.read() as tx:
        assert tx.c.execute(sa.select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
        first = tx.pool_id()
    assert len(first) == 32
    with PoolStore(url) as store:
        assert pool_id(store) == first  # made once


# ------------------------------------------------------------------------------ the sweep


async def fresh_reconcile(store: PoolStore, tmp_path: Path) -> dict[str, int]:
    fresh = await Service(store, tmp_path / "state", host="testhost").start()
    try:
        return await fresh.reconcile()
    finally:
        await fresh.stop(clean=False)


@pytest.mark.logs_ok  # the refusal to sweep is logged as an error
async def test_sweep_of_two_backends_on_one_directory_deletes_nothing(
        service: Service, store: PoolStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The pool an older tm2fs left: a second backend row on the first one's directory. Its
    sweep takes the first one's images for leftovers; the marker stops it."""
    await dir_backend(service, "b1", tmp_path / "b1")
    await write_all(service, "b1:disk", b"precious")
    key = (await service.image_info("b1:disk", ROOT))["KEY"]
    b1 = service.find_backend("b1")
    with store.begin() as tx:
        bid = tx.insert_backend(tm="dir", tm_raw=b1.tm_raw, state="READY", name="b2", root_ino=0)
        root = tx.insert_node(parent=1, name="b2", backend_id=bid, mode=0o40755, uid=0, gid=0)
        tx.update_backend(bid, root_ino=root)
    fixed = await fresh_reconcile(store, tmp_path)
    assert fixed["leftovers"] == 0
    assert (tmp_path / "b1" / key).read_bytes() == b"precious"
    assert f"backend b2: leftovers in {tmp_path / 'b1'} not swept" in caplog.text
    assert f"names backend {b1.id} of pool" in caplog.text


@pytest.mark.logs_ok
async def test_sweep_without_marker_and_with_unknown_files_deletes_nothing(
        service: Service, store: PoolStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    await dir_backend(service, "b1", tmp_path / "b1")
    await write_all(service, "b1:disk", b"mine")
    (tmp_path / "b1" / MARKER).unlink(missing_ok=True)  # a pool made before markers
    (tmp_path / "b1" / FOREIGN).write_bytes(b"not known to this pool")
    assert (await fresh_reconcile(store, tmp_path))["leftovers"] == 0
    assert (tmp_path / "b1" / FOREIGN).read_bytes() == b"not known to this pool"
    assert not (tmp_path / "b1" / MARKER).exists()  # not claimed either
    assert "has no marker of this backend and holds 1 image file(s)" in caplog.text


@pytest.mark.logs_ok
async def test_sweep_with_a_foreign_marker_deletes_nothing(
        service: Service, store: PoolStore, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    await dir_backend(service, "b1", tmp_path / "b1")
    (tmp_path / "b1" / MARKER).write_text('{"pool": "feedface", "backend": 1}\n')
    (tmp_path / "b1" / FOREIGN).write_bytes(b"the other pool's")
    assert (await fresh_reconcile(store, tmp_path))["leftovers"] == 0
    assert (tmp_path / "b1" / FOREIGN).exists()
    assert "names backend 1 of pool feedface" in caplog.text


async def test_marker_less_directory_of_known_images_is_claimed_and_swept(
        service: Service, store: PoolStore, tmp_path: Path) -> None:
    """An existing pool upgraded: the directory holds only its own images, so it gets the
    marker at start, and from then on leftovers are swept as before."""
    await dir_backend(service, "b1", tmp_path / "b1")
    await write_all(service, "b1:disk", b"mine")
    (tmp_path / "b1" / MARKER).unlink(missing_ok=True)
    assert (await fresh_reconcile(store, tmp_path))["leftovers"] == 0
    assert marker(tmp_path / "b1") == {"pool": pool_id(store),
                                       "backend": service.find_backend("b1").id}
    (tmp_path / "b1" / FOREIGN).write_bytes(b"crashed before its rows")
    assert (await fresh_reconcile(store, tmp_path))["leftovers"] == 1
    assert not (tmp_path / "b1" / FOREIGN).exists()


# ------------------------------------------------------------------------------ the real daemon


@pytest.mark.slow
@pytest.mark.logs_ok
def test_daemon_keeps_the_first_backend_s_data(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    shared = tmp_path / "shared"
    with Daemon(tmp_path) as d:
        assert d.backend_cli("create", "--name", "b1", "--tm", "dir", "--tm-raw",
                             f"PATH={shared}").returncode == 0
        (d.mnt / "b1" / "disk.img").write_bytes(b"first backend's data" * 1000)
        second = d.backend_cli("create", "--name", "b2", "--tm", "dir", "--tm-raw", f"PATH={shared}")
        assert second.returncode == 1
        assert b"backend b1" in second.stderr and b"Traceback" not in second.stderr
        root = d.backend_cli("create", "--name", "root", "--tm", "dir", "--tm-raw", "PATH=/")
        assert root.returncode == 1 and b"system directory" in root.stderr
        assert sorted(d.backends()) == ["b1", "local"]
        d.restart()
        assert (d.mnt / "b1" / "disk.img").read_bytes() == b"first backend's data" * 1000
        # a directory whose marker is gone and that holds a file the pool does not know: the
        # sweep at the next start deletes nothing there, and says why
        d.stop()
        (shared / MARKER).unlink(missing_ok=True)
        (shared / FOREIGN).write_bytes(b"another pool's disk")
        d.start()
        assert (shared / FOREIGN).read_bytes() == b"another pool's disk"
        assert (d.mnt / "b1" / "disk.img").read_bytes() == b"first backend's data" * 1000
        assert f"backend b1: leftovers in {shared} not swept" in d.logs()


@pytest.mark.slow
def test_a_backend_directory_on_the_mount_is_refused(tmp_path: Path) -> None:
    """A backend kept on the pool's own mount would send every write back through FUSE to the
    daemon itself: refused, written into it or reached through a symlink."""
    with Daemon(tmp_path) as d:
        (tmp_path / "onto").symlink_to(d.mnt / "local")
        for path, words in ((d.mnt / "local" / "inner", b"is on the pool's own mount"),
                            (d.mnt, b"is on the pool's own mount"),
                            (tmp_path / "onto" / "x", b"leads onto the pool's own mount")):
            out = d.backend_cli("create", "--name", "loop", "--tm", "dir", "--tm-raw", f"PATH={path}")
            assert out.returncode == 1 and words in out.stderr, out.stderr
            assert b"Traceback" not in out.stderr
        assert sorted(d.backends()) == ["local"]
        assert not (d.mnt / "local" / "inner").exists()
