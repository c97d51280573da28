"""The `dir` driver against a real directory: sparse files, clones, capacity, leftovers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tm2fs.drivers import driver_class
from tm2fs.drivers.dir import DirDriver, _sparse_copy
from tm2fs.errors import InvalidArgument


@pytest.fixture
def driver(tmp_path: Path) -> DirDriver:
    raw = DirDriver.validate({"PATH": str(tmp_path / "b")}, tmp_path, "b")
    return DirDriver(raw, tmp_path)


def test_registry_knows_dir_and_names_the_known_ones() -> None:
    assert driver_class("dir") is DirDriver
    with pytest.raises(InvalidArgument, match="unknown TM 'nope'") as e:
        driver_class("nope")
    assert "dir" in e.value.hint


def test_validate_defaults_and_refuses(tmp_path: Path) -> None:
    assert DirDriver.validate({}, tmp_path, "x") == {"PATH": str(tmp_path / "backends" / "x")}
    for bad in ({"PATH": "rel"}, {"PATH": "/proc/nope/x"}, {"OTHER": "1"}):
        with pytest.raises(InvalidArgument):
            DirDriver.validate(bad, tmp_path, "x")


async def test_allocate_is_sparse_and_exclusive(driver: DirDriver) -> None:
    await driver.allocate("k1", 10 * 2**30)
    st = os.stat(driver.local_path("k1"))
    assert st.st_size == 10 * 2**30 and st.st_blocks == 0
    assert await driver.size("k1") == 10 * 2**30
    with pytest.raises(FileExistsError):
        await driver.allocate("k1", 1)


async def test_handle_round_trip_and_resize(driver: DirDriver) -> None:
    await driver.allocate("k", 0)
    h = await driver.open("k", writable=True)
    assert h.pwrite(100, b"abc") == 3
    h.flush()
    assert h.pread(98, 10) == b"\0\0abc"
    h.truncate(101)
    assert h.pread(0, 1000) == b"\0" * 100 + b"a"
    h.close()
    await driver.resize("k", 4096)
    assert await driver.size("k") == 4096


async def test_clone_copies_only_data(driver: DirDriver) -> None:
    await driver.allocate("src", 256 * 2**20)
    h = await driver.open("src", writable=True)
    h.pwrite(0, b"head")
    h.pwrite(200 * 2**20, os.urandom(2**20))
    h.close()
    done: list[int] = []
    await driver.clone("src", "dst", done.append)
    a, b = Path(driver.local_path("src")), Path(driver.local_path("dst"))
    assert a.read_bytes() == b.read_bytes()
    assert os.stat(b).st_blocks * 512 < 4 * 2**20  # a reflink or a sparse copy, never 256 MiB
    with pytest.raises(FileExistsError):
        await driver.clone("src", "dst")


def test_sparse_copy_of_a_file_that_ends_in_a_hole(tmp_path: Path) -> None:
    src, dst = tmp_path / "s", tmp_path / "d"
    with open(src, "wb") as f:
        f.write(b"x" * 4096)
        f.truncate(64 * 2**20)
    with open(src, "rb") as s, open(dst, "wb") as d:
        _sparse_copy(s.fileno(), d.fileno(), None)
    assert os.stat(dst).st_size == 64 * 2**20
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks * 512 <= 2**20


async def test_monitor_counts_image_blocks(driver: DirDriver) -> None:
    before = await driver.monitor()
    await driver.allocate("k", 2**30)
    h = await driver.open("k", writable=True)
    h.pwrite(0, b"y" * 2**20)
    h.flush()
    h.close()
    after = await driver.monitor()
    assert after.total == before.total
    assert after.used - before.used >= 2**20
    assert after.used - before.used < 2**30  # thin: only written blocks count


async def test_delete_and_keys(driver: DirDriver) -> None:
    await driver.allocate("a", 1)
    await driver.allocate("b", 1)
    assert sorted(await driver.keys()) == ["a", "b"]
    await driver.delete("a")
    await driver.delete("a")  # already gone: fine, delete is idempotent
    assert await driver.keys() == ["b"]


async def test_start_fails_when_the_directory_is_gone(driver: DirDriver) -> None:
    os.rmdir(driver.root)
    with pytest.raises(FileNotFoundError):
        await driver.start()


def test_filesystems_that_can_hang_are_recognised(tmp_path: Path) -> None:
    from tm2fs.drivers.dir import filesystem_type, is_remote

    assert filesystem_type("/proc/self") == "proc"
    assert not is_remote(filesystem_type(tmp_path))
    for kind in ("nfs4", "cifs", "ceph", "fuse.sshfs", "fuse.tm2fs", "9p"):
        assert is_remote(kind)
    for kind in ("ext4", "xfs", "btrfs", "tmpfs", "zfs"):
        assert not is_remote(kind)
