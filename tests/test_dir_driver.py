"""The `dir` driver's own parts: TM_RAW, the sparse copy, a vanished directory, filesystems that
can hang. The contract (allocate, data path, clone, capacity, keys) is test_driver_conformance.py."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import pytest

from tm2fs.drivers.dir import DirDriver, FileHandle, _sparse_copy
from tm2fs.errors import InvalidArgument
from tm2fs.mounts import filesystem_type


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


KPF_DIRTY_OR_WRITEBACK = 1 << 4 | 1 << 8  # linux/kernel-page-flags.h


def _dirty_pages(path: Path) -> int:
    """The file's pages still dirty or under writeback (/proc/kpageflags, through a mapping of
    the file: looking does not write anything back)."""
    page, n = os.sysconf("SC_PAGE_SIZE"), path.stat().st_size // os.sysconf("SC_PAGE_SIZE")
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), n * page) as m, \
            open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as flags:
        first = ctypes.addressof(ctypes.c_char.from_buffer(m)) // page
        left = 0
        for i in range(n):
            m[i * page]  # mapped in
            pagemap.seek((first + i) * 8)
            pfn = int.from_bytes(pagemap.read(8), "little") & ((1 << 55) - 1)
            flags.seek(pfn * 8)
            left += bool(int.from_bytes(flags.read(8), "little") & KPF_DIRTY_OR_WRITEBACK)
        return left


@pytest.mark.skipif(os.geteuid() != 0, reason="/proc/kpageflags is root's")
def test_a_sequential_run_goes_to_the_disk_without_waiting_for_fsync(tmp_path: Path) -> None:
    """Write-behind: without it the kernel leaves these pages dirty for dirty_expire_centisecs
    (30 s by default) or until an fsync."""
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("no disk under tmp_path")
    path = tmp_path / "img"
    handle = FileHandle(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    try:
        for i in range(16):
            assert handle.pwrite(i * 2**20, b"x" * 2**20) == 2**20
        deadline = time.monotonic() + 20
        while (left := _dirty_pages(path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == 0, f"{left} pages still dirty"
    finally:
        handle.close()
