"""The `dir` driver's own parts: TM_RAW, the sparse copy, a vanished directory, filesystems that
can hang. The contract (allocate, data path, clone, capacity, keys) is test_driver_conformance.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tm2fs.drivers.dir import DirDriver, _sparse_copy
from tm2fs.errors import InvalidArgument


@pytest.fixture
def driver(tmp_path: Path) -> DirDriver:
    raw = DirDriver.validate({"PATH": str(tmp_path / "b")}, tmp_path, "b")
    return DirDriver(raw, tmp_path)


def test_validate_defaults_and_refuses(tmp_path: Path) -> None:
    assert DirDriver.validate({}, tmp_path, "x") == {"PATH": str(tmp_path / "backends" / "x")}
    for bad in ({"PATH": "rel"}, {"PATH": "/proc/nope/x"}, {"OTHER": "1"}):
        with pytest.raises(InvalidArgument):
            DirDriver.validate(bad, tmp_path, "x")


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
