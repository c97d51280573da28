"""The FUSE handlers called directly (no kernel): they translate, call the service, map errors.

Each test builds a fresh service on SQLite with the default `local` backend. `ctx` stands in for
pyfuse3's RequestContext (only uid/gid/pid/umask are read), `fields` for SetattrFields (read-only
attributes in pyfuse3), and `readdir_reply` is replaced by a recorder (it needs a kernel token).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from tm2fs import fs
from tm2fs.core import ROOT, Service
from tm2fs.store import PoolStore

CTX = SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022)
USER = SimpleNamespace(uid=1000, gid=1000, pid=2, umask=0o022)
RDWR = os.O_RDWR


@pytest.fixture
async def svc(tmp_path: Path) -> Service:
    store = PoolStore(f"sqlite:///{tmp_path}/pool.db")
    mnt = tmp_path / "mnt"
    service = Service(store, tmp_path, host="testhost", mountpoint=str(mnt))
    await service.start()
    await service.ensure_default_backend()
    yield service
    await service.stop()
    store.close()


@pytest.fixture
def ops(svc: Service) -> fs.Operations:
    return fs.Operations(svc)


@pytest.fixture
def listing(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[tuple[bytes, int, int]]]:
    """Replace readdir_reply: `listing(n)` accepts n entries, then answers False (buffer full)."""
    state: dict[str, Any] = {"room": 10**9, "got": []}

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if state["room"] <= 0:
            return False
        state["room"] -= 1
        state["got"].append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(fs.pyfuse3, "readdir_reply", reply)

    def set_room(room: int) -> list[tuple[bytes, int, int]]:
        state["room"] = room
        state["got"] = []
        return state["got"]

    return set_room


def fields(**update: bool) -> SimpleNamespace:
    names = ("mode", "uid", "gid", "size", "atime", "mtime", "ctime")
    return SimpleNamespace(**{f"update_{n}": update.get(n, False) for n in names})


def attrs(**values: int) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    for k, v in values.items():
        setattr(a, k, v)
    return a


async def readdir_all(ops: fs.Operations, ino: int, listing: Callable) -> list[bytes]:
    got = listing(10**9)
    fh = await ops.opendir(ino, CTX)
    await ops.readdir(fh, 0, None)
    await ops.releasedir(fh)
    return [name for name, _, _ in got]


async def local_ino(ops: fs.Operations) -> int:
    return (await ops.lookup(pyfuse3.ROOT_INODE, b"local", CTX)).st_ino


async def errno_of(coro: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as e:
        await coro
    return e.value.errno


async def make_file(ops: fs.Operations, parent: int, name: bytes, data: bytes = b"") -> int:
    fi, entry = await ops.create(parent, name, stat.S_IFREG | 0o644, RDWR, CTX)
    if data:
        assert await ops.write(fi.fh, 0, data) == len(data)
    await ops.flush(fi.fh)
    await ops.release(fi.fh)
    return entry.st_ino


# ---------------------------------------------------------------------- metadata


async def test_root_and_backend_directory(ops: fs.Operations, listing: Callable) -> None:
    root = await ops.getattr(pyfuse3.ROOT_INODE, CTX)
    assert stat.S_ISDIR(root.st_mode) and root.st_ino == pyfuse3.ROOT_INODE
    assert await readdir_all(ops, pyfuse3.ROOT_INODE, listing) == [b"local"]
    local = await ops.lookup(pyfuse3.ROOT_INODE, b"local", CTX)
    assert stat.S_ISDIR(local.st_mode)
    assert stat.S_IMODE(local.st_mode) == 0o1777  # a shared datastore, sticky like /tmp
    assert (local.st_nlink, local.st_uid, local.st_gid) == (2, 0, 0)
    assert local.entry_timeout == local.attr_timeout == fs.CACHE_TIMEOUT
    assert local.st_blksize == 128 * 1024
    assert (await ops.lookup(local.st_ino, b".", CTX)).st_ino == local.st_ino
    assert (await ops.lookup(local.st_ino, b"..", CTX)).st_ino == pyfuse3.ROOT_INODE
    assert (await ops.lookup(pyfuse3.ROOT_INODE, b"..", CTX)).st_ino == pyfuse3.ROOT_INODE
    assert await errno_of(ops.lookup(pyfuse3.ROOT_INODE, b"nope", CTX)) == errno.ENOENT
    assert await readdir_all(ops, local.st_ino, listing) == []


async def test_readdir_resumes_after_the_last_inode(ops: fs.Operations,
                                                    listing: Callable) -> None:
    local = await local_ino(ops)
    names = [f"f{i}".encode() for i in range(7)]
    for name in names:
        await make_file(ops, local, name)
    fh = await ops.opendir(local, CTX)
    seen: list[bytes] = []
    start = 0
    for _ in range(10):
        got = listing(3)  # the kernel's buffer takes three entries per call
        await ops.readdir(fh, start, None)
        if not got:
            break
        assert all(next_id == ino for _, ino, next_id in got)  # cookie = the entry's inode
        seen += [name for name, _, _ in got]
        start = got[-1][2]
    assert seen == names  # each exactly once, in creation (inode) order
    # an entry removed between calls does not shift the others
    got = listing(2)
    await ops.readdir(fh, 0, None)
    await ops.unlink(local, b"f2", CTX)
    rest = listing(100)
    await ops.readdir(fh, got[-1][2], None)
    assert [n for n, _, _ in got] + [n for n, _, _ in rest] == [n for n in names if n != b"f2"]


async def test_opendir_on_a_file_is_enotdir(ops: fs.Operations) -> None:
    ino = await make_file(ops, await local_ino(ops), b"img")
    assert await errno_of(ops.opendir(ino, CTX)) == errno.ENOTDIR


async def test_statfs_reports_the_pool(ops: fs.Operations, svc: Service) -> None:
    st = await ops.statfs(CTX)
    local = svc.find_backend("local")
    assert st.f_bsize == st.f_frsize == 4096
    assert st.f_blocks == local.total // 4096 > 0
    assert st.f_bfree == st.f_bavail == local.free // 4096
    assert st.f_namemax == 255
    assert st.f_files == st.f_ffree > 10**6


def test_statvfs_with_unknown_capacity() -> None:
    st = fs._statvfs(None, None)
    assert (st.f_blocks, st.f_bfree, st.f_bavail) == (0, 0, 0)


# ---------------------------------------------------------------------- data


async def test_create_write_read_fsync_release(ops: fs.Operations, svc: Service,
                                               tmp_path: Path) -> None:
    local = await local_ino(ops)
    fi, entry = await ops.create(local, b"disk.img", stat.S_IFREG | 0o640, RDWR, CTX)
    assert stat.S_ISREG(entry.st_mode) and stat.S_IMODE(entry.st_mode) == 0o640
    assert entry.st_size == 0
    assert fi.keep_cache is False and fi.direct_io is True  # no page cache on the mount
    assert await ops.write(fi.fh, 0, b"hello") == 5
    assert await ops.write(fi.fh, 4096 + 5, b"world") == 5
    assert (await ops.getattr(entry.st_ino, CTX)).st_size == 4096 + 10
    assert await ops.read(fi.fh, 0, 5) == b"hello"
    assert await ops.read(fi.fh, 3, 4) == b"lo\0\0"
    assert await ops.read(fi.fh, 4096, 100) == b"\0" * 5 + b"world"  # short at EOF
    assert await ops.read(fi.fh, 10**6, 10) == b""
    await ops.fsync(fi.fh, False)
    info = await svc.image_info("local:disk.img", ROOT)
    assert info["SIZE"] == 4096 + 10  # committed by fsync while still open
    await ops.flush(fi.fh)  # close(2)
    await ops.release(fi.fh)
    backing = tmp_path / "backends" / "local" / info["KEY"]
    assert backing.read_bytes() == b"hello" + b"\0" * 4096 + b"world"
    got = await ops.getattr(entry.st_ino, CTX)
    # st_blocks: what the backing file holds (measured at close(2)), not the size
    assert (got.st_size, got.st_blocks) == (4106, backing.stat().st_blocks)
    # reopen read-only: writes are refused by the service, reads work
    fi = await ops.open(entry.st_ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 5) == b"hello"
    assert await errno_of(ops.write(fi.fh, 0, b"x")) == errno.EACCES
    await ops.release(fi.fh)
    assert ops._files == {}


async def test_open_flags_truncate_and_append(ops: fs.Operations, svc: Service) -> None:
    local = await local_ino(ops)
    ino = await make_file(ops, local, b"log", b"0123456789")
    fi = await ops.open(ino, os.O_WRONLY | os.O_APPEND, CTX)
    assert await ops.write(fi.fh, 0, b"ab") == 2  # offset ignored: appended
    await ops.release(fi.fh)
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 100) == b"0123456789ab"
    await ops.release(fi.fh)
    fi = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, CTX)
    assert (await ops.getattr(ino, CTX)).st_size == 0
    await ops.release(fi.fh)
    assert (await svc.image_info("local:log", ROOT))["SIZE"] == 0


async def test_truncate_through_setattr(ops: fs.Operations, svc: Service, tmp_path: Path) -> None:
    local = await local_ino(ops)
    ino = await make_file(ops, local, b"img", b"abcdef")
    # closed file: the driver resizes
    out = await ops.setattr(ino, attrs(st_size=10 * 2**20), fields(size=True), None, CTX)
    assert out.st_size == 10 * 2**20
    key = (await svc.image_info("local:img", ROOT))["KEY"]
    backing = tmp_path / "backends" / "local" / key
    assert backing.stat().st_size == 10 * 2**20
    assert (await svc.image_info("local:img", ROOT))["SIZE"] == 10 * 2**20
    # open file (ftruncate): the open image is resized and the size committed
    fi = await ops.open(ino, RDWR, CTX)
    out = await ops.setattr(ino, attrs(st_size=3), fields(size=True), fi.fh, CTX)
    assert out.st_size == 3
    assert await ops.read(fi.fh, 0, 100) == b"abc"
    await ops.release(fi.fh)
    assert backing.stat().st_size == 3 == (await svc.image_info("local:img", ROOT))["SIZE"]
    assert await errno_of(ops.setattr(local, attrs(st_size=0), fields(size=True), None,
                                      CTX)) == errno.EISDIR


async def test_setattr_mode_owner_times(ops: fs.Operations) -> None:
    ino = await make_file(ops, await local_ino(ops), b"img")
    out = await ops.setattr(ino, attrs(st_mode=stat.S_IFREG | 0o600, st_uid=7, st_gid=8,
                                       st_atime_ns=10**18, st_mtime_ns=2 * 10**18),
                            fields(mode=True, uid=True, gid=True, atime=True, mtime=True),
                            None, CTX)
    assert (stat.S_IFMT(out.st_mode), stat.S_IMODE(out.st_mode)) == (stat.S_IFREG, 0o600)
    assert (out.st_uid, out.st_gid, out.st_atime_ns, out.st_mtime_ns) == (7, 8, 10**18, 2 * 10**18)
    again = await ops.getattr(ino, CTX)
    assert (again.st_uid, again.st_mtime_ns) == (7, 2 * 10**18)
    assert await errno_of(ops.setattr(pyfuse3.ROOT_INODE, attrs(st_mode=0o700),
                                      fields(mode=True), None, CTX)) == errno.EPERM


async def test_caller_comes_from_the_request_context(ops: fs.Operations) -> None:
    local = await local_ino(ops)
    fi, entry = await ops.create(local, b"users", stat.S_IFREG | 0o600, RDWR, USER)
    await ops.release(fi.fh)
    assert (entry.st_uid, entry.st_gid) == (1000, 1000)
    d = await ops.mkdir(local, b"dir", stat.S_IFDIR | 0o750, USER)
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (1000, 1000, 0o750)
    link = await ops.symlink(local, b"ln", b"users", USER)
    assert (link.st_uid, stat.S_ISLNK(link.st_mode)) == (1000, True)


# ---------------------------------------------------------------------- namespace


async def test_mkdir_rmdir(ops: fs.Operations, listing: Callable) -> None:
    local = await local_ino(ops)
    d = await ops.mkdir(local, b"vm-42", stat.S_IFDIR | 0o755, CTX)
    assert stat.S_ISDIR(d.st_mode) and d.st_nlink == 2
    await make_file(ops, d.st_ino, b"disk.0", b"x")
    assert await errno_of(ops.mkdir(local, b"vm-42", 0o755, CTX)) == errno.EEXIST
    assert await errno_of(ops.rmdir(local, b"vm-42", CTX)) == errno.ENOTEMPTY
    assert await errno_of(ops.unlink(local, b"vm-42", CTX)) == errno.EISDIR
    assert await errno_of(ops.rmdir(d.st_ino, b"disk.0", CTX)) == errno.ENOTDIR
    await ops.unlink(d.st_ino, b"disk.0", CTX)
    await ops.rmdir(local, b"vm-42", CTX)
    assert await readdir_all(ops, local, listing) == []
    assert await errno_of(ops.rmdir(local, b"vm-42", CTX)) == errno.ENOENT


async def test_unlink_removes_the_data(ops: fs.Operations, tmp_path: Path) -> None:
    local = await local_ino(ops)
    await make_file(ops, local, b"img", b"data")
    backing = tmp_path / "backends" / "local"
    assert len(os.listdir(backing)) == 2  # the image and the backend's marker
    await ops.unlink(local, b"img", CTX)
    assert os.listdir(backing) == [".tm2fs-backend"]
    assert await errno_of(ops.lookup(local, b"img", CTX)) == errno.ENOENT
    assert await errno_of(ops.unlink(local, b"img", CTX)) == errno.ENOENT


async def test_unlink_while_open_keeps_data_until_release(ops: fs.Operations,
                                                          tmp_path: Path) -> None:
    local = await local_ino(ops)
    ino = await make_file(ops, local, b"img", b"still here")
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    await ops.unlink(local, b"img", CTX)
    assert await ops.read(fi.fh, 0, 100) == b"still here"
    assert len(os.listdir(tmp_path / "backends" / "local")) == 2  # with the marker
    await ops.release(fi.fh)
    assert os.listdir(tmp_path / "backends" / "local") == [".tm2fs-backend"]


async def test_rename_inside_a_backend_is_metadata_only(ops: fs.Operations, svc: Service,
                                                        tmp_path: Path) -> None:
    local = await local_ino(ops)
    ino = await make_file(ops, local, b"a.img", b"payload")
    key = (await svc.image_info("local:a.img", ROOT))["KEY"]
    d = await ops.mkdir(local, b"vm", 0o755, CTX)
    await ops.rename(local, b"a.img", d.st_ino, b"b.img", 0, CTX)
    assert await errno_of(ops.lookup(local, b"a.img", CTX)) == errno.ENOENT
    moved = await ops.lookup(d.st_ino, b"b.img", CTX)
    assert moved.st_ino == ino
    info = await svc.image_info("local:vm/b.img", ROOT)
    assert (info["KEY"], info["SIZE"]) == (key, 7)
    assert sorted(os.listdir(tmp_path / "backends" / "local")) == [".tm2fs-backend", key]
    # replacing an existing file drops the old image's data
    await make_file(ops, local, b"c.img", b"other")
    await ops.rename(d.st_ino, b"b.img", local, b"c.img", 0, CTX)
    assert (await svc.image_info("local:c.img", ROOT))["KEY"] == key
    assert sorted(os.listdir(tmp_path / "backends" / "local")) == [".tm2fs-backend", key]


async def test_rename_flags(ops: fs.Operations) -> None:
    local = await local_ino(ops)
    await make_file(ops, local, b"a", b"1")
    await make_file(ops, local, b"b", b"2")
    assert await errno_of(ops.rename(local, b"a", local, b"b", pyfuse3.RENAME_NOREPLACE,
                                     CTX)) == errno.EEXIST
    assert await errno_of(ops.rename(local, b"a", local, b"b", pyfuse3.RENAME_EXCHANGE,
                                     CTX)) == errno.EOPNOTSUPP
    await ops.rename(local, b"a", local, b"c", pyfuse3.RENAME_NOREPLACE, CTX)
    assert (await ops.lookup(local, b"c", CTX)).st_size == 1
    d = await ops.mkdir(local, b"d", 0o755, CTX)
    sub = await ops.mkdir(d.st_ino, b"sub", 0o755, CTX)
    assert await errno_of(ops.rename(local, b"d", sub.st_ino, b"x", 0, CTX)) == errno.EINVAL


async def test_rename_across_backends_is_exdev(ops: fs.Operations, svc: Service,
                                               tmp_path: Path) -> None:
    await svc.create_backend(ROOT, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/backends/b2"})
    local = await local_ino(ops)
    b2 = (await ops.lookup(pyfuse3.ROOT_INODE, b"b2", CTX)).st_ino
    await make_file(ops, local, b"img", b"data")
    assert await errno_of(ops.rename(local, b"img", b2, b"img", 0, CTX)) == errno.EXDEV
    assert (await ops.lookup(local, b"img", CTX)).st_size == 4  # unchanged
    assert await errno_of(ops.lookup(b2, b"img", CTX)) == errno.ENOENT
    # backends themselves are not renamed through the mount
    assert await errno_of(ops.rename(pyfuse3.ROOT_INODE, b"b2", pyfuse3.ROOT_INODE, b"b3", 0,
                                     CTX)) == errno.EPERM


async def test_symlink_to_an_image_is_an_attachment(ops: fs.Operations, svc: Service) -> None:
    async def nbvm() -> int:
        return {b["NAME"]: b for b in await svc.list_backends()}["local"]["NBVM"]

    local = await local_ino(ops)
    await make_file(ops, local, b"disk.img", b"x")
    d = await ops.mkdir(local, b"vm-1", 0o755, CTX)
    link = await ops.symlink(d.st_ino, b"disk.0", b"../disk.img", CTX)
    assert stat.S_ISLNK(link.st_mode) and link.st_size == len(b"../disk.img")
    assert await ops.readlink(link.st_ino, CTX) == b"../disk.img"
    assert await nbvm() == 1
    info = await svc.image_info("local:disk.img", ROOT)
    assert [a["PATH"] for a in info["ATTACHMENTS"]] == [f"{svc.mountpoint}/local/vm-1/disk.0"]
    # a link that points nowhere on the mount is just a symlink
    await ops.symlink(d.st_ino, b"other", b"/etc/hostname", CTX)
    assert await nbvm() == 1
    await ops.unlink(d.st_ino, b"disk.0", CTX)
    assert await nbvm() == 0
    assert (await svc.image_info("local:disk.img", ROOT))["ATTACHMENTS"] == []
    assert await errno_of(ops.readlink(d.st_ino, CTX)) == errno.EINVAL


async def test_hard_links_and_special_files_are_refused(ops: fs.Operations) -> None:
    local = await local_ino(ops)
    ino = await make_file(ops, local, b"img")
    assert await errno_of(ops.link(ino, local, b"img2", CTX)) == errno.EPERM
    assert await errno_of(ops.mknod(local, b"fifo", stat.S_IFIFO | 0o644, 0, CTX)) == errno.EPERM
    made = await ops.mknod(local, b"plain", stat.S_IFREG | 0o644, 0, CTX)
    assert stat.S_ISREG(made.st_mode)


async def test_bad_names(ops: fs.Operations) -> None:
    local = await local_ino(ops)
    long = b"x" * 256
    assert await errno_of(ops.create(local, long, 0o644, RDWR, CTX)) == errno.ENAMETOOLONG
    assert await errno_of(ops.mkdir(local, long, 0o755, CTX)) == errno.ENAMETOOLONG
    assert await errno_of(ops.symlink(local, long, b"t", CTX)) == errno.ENAMETOOLONG
    assert await errno_of(ops.lookup(local, long, CTX)) == errno.ENAMETOOLONG
    await make_file(ops, local, b"x" * 255)  # the limit itself is fine
    assert await errno_of(ops.create(local, b"\xff\xfe", 0o644, RDWR, CTX)) == errno.EINVAL
    # the top level holds only backends
    assert await errno_of(ops.create(pyfuse3.ROOT_INODE, b"img", 0o644, RDWR, CTX)) == errno.EPERM
    assert await errno_of(ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o755, CTX)) == errno.EPERM
    assert await errno_of(ops.symlink(pyfuse3.ROOT_INODE, b"l", b"t", CTX)) == errno.EPERM
    assert await errno_of(ops.rmdir(pyfuse3.ROOT_INODE, b"local", CTX)) == errno.EPERM


# ---------------------------------------------------------------------- backend states


async def test_disabled_backend_is_read_only(ops: fs.Operations, svc: Service) -> None:
    local = await local_ino(ops)
    ino = await make_file(ops, local, b"img", b"data")
    fi_rw = await ops.open(ino, RDWR, CTX)  # opened before: writes still refused after
    await svc.set_enabled(ROOT, "local", False)
    assert await errno_of(ops.write(fi_rw.fh, 0, b"new")) == errno.EROFS
    await ops.release(fi_rw.fh)
    assert await errno_of(ops.open(ino, os.O_WRONLY, CTX)) == errno.EROFS
    assert await errno_of(ops.create(local, b"new", 0o644, RDWR, CTX)) == errno.EROFS
    assert await errno_of(ops.mkdir(local, b"d", 0o755, CTX)) == errno.EROFS
    assert await errno_of(ops.unlink(local, b"img", CTX)) == errno.EROFS
    assert await errno_of(ops.setattr(ino, attrs(st_size=0), fields(size=True), None,
                                      CTX)) == errno.EROFS
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 10) == b"data"
    await ops.release(fi.fh)
    await svc.set_enabled(ROOT, "local", True)
    fi = await ops.open(ino, RDWR, CTX)
    assert await ops.write(fi.fh, 0, b"DATA") == 4
    await ops.release(fi.fh)


@pytest.mark.logs_ok  # the service logs the backend's fall to ERROR
async def test_error_backend_answers_eio_and_the_rest_works(ops: fs.Operations, svc: Service,
                                                            tmp_path: Path) -> None:
    await svc.create_backend(ROOT, {"NAME": "b2", "TM": "dir", "TM_RAW": f"PATH={tmp_path}/backends/b2"})
    local = await local_ino(ops)
    b2 = (await ops.lookup(pyfuse3.ROOT_INODE, b"b2", CTX)).st_ino
    ino = await make_file(ops, local, b"img", b"data")
    held = await ops.open(ino, os.O_RDONLY, CTX)
    backing = tmp_path / "backends" / "local"
    backing.rename(tmp_path / "away")
    bid = svc.find_backend("local").id
    await svc.monitor_backend(bid)
    assert svc.find_backend("local").state == "ERROR"
    assert await errno_of(ops.open(ino, os.O_RDONLY, CTX)) == errno.EIO
    assert await errno_of(ops.read(held.fh, 0, 4)) == errno.EIO
    assert await errno_of(ops.create(local, b"new", 0o644, RDWR, CTX)) == errno.EIO
    assert (await ops.getattr(ino, CTX)).st_size == 4  # metadata still answers
    await make_file(ops, b2, b"fine", b"ok")  # the rest of the tree works
    fi = await ops.open((await ops.lookup(b2, b"fine", CTX)).st_ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 10) == b"ok"
    await ops.release(fi.fh)
    # back: the directory returns and a monitor succeeds
    (tmp_path / "away").rename(backing)
    await svc.monitor_backend(bid)
    assert svc.find_backend("local").state == "READY"
    assert await ops.read(held.fh, 0, 10) == b"data"
    await ops.release(held.fh)
    fi = await ops.open(ino, RDWR, CTX)
    assert await ops.write(fi.fh, 4, b"!") == 1
    await ops.release(fi.fh)


@pytest.mark.logs_ok  # the service logs the backend's fall to ERROR
async def test_an_io_fault_on_the_inline_data_path_turns_the_backend_error(
        ops: fs.Operations, svc: Service) -> None:
    """A local dir image is read inline, without the timeout's cancel scope: its faults must
    still turn the backend ERROR. /proc/self/mem answers EIO at offset 0, as a failing disk."""
    local = await local_ino(ops)
    ino = await make_file(ops, local, b"img", b"data")
    fi = await ops.open(ino, RDWR, CTX)
    handle = svc.files.pool.open_ino[ino].handle
    faulty = os.open("/proc/self/mem", os.O_RDWR)
    os.dup2(faulty, handle.fd)
    os.close(faulty)
    assert await errno_of(ops.read(fi.fh, 0, 4)) == errno.EIO
    assert svc.find_backend("local").state == "ERROR"
    assert await errno_of(ops.write(fi.fh, 0, b"x")) == errno.EIO  # ERROR answers at once
    await ops.release(fi.fh)


# ---------------------------------------------------------------------- kernel cache invalidation


async def test_changes_not_made_through_the_mount_invalidate_kernel_caches(
        ops: fs.Operations, svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    token = trio.lowlevel.current_trio_token()

    def inval_inode(ino: int, attr_only: bool = False) -> None:
        assert trio.lowlevel.in_trio_run() is False  # a worker thread, never the trio loop
        calls.append(("inode", ino))
        raise FileNotFoundError(errno.ENOENT, "not cached")  # normal: the kernel knew nothing

    def inval_entry(parent: int, name: bytes, deleted: int = 0) -> None:
        calls.append(("entry", parent, name))

    monkeypatch.setattr(fs.pyfuse3, "trio_token", token)  # as while pyfuse3.main() runs
    monkeypatch.setattr(fs.pyfuse3, "invalidate_inode", inval_inode)
    monkeypatch.setattr(fs.pyfuse3, "invalidate_entry", inval_entry)

    async def settled(expected: int) -> list[tuple]:
        with trio.move_on_after(2):  # the invalidations run in worker threads
            while len(calls) < expected:
                await trio.sleep(0.002)
        await trio.sleep(0.05)  # and nothing more arrives
        got = sorted(calls)
        calls.clear()
        return got

    local = await local_ino(ops)
    ino = await make_file(ops, local, b"img", b"data")
    await ops.mkdir(local, b"d", 0o755, CTX)
    assert await settled(0) == []  # the kernel made these changes itself: nothing to invalidate
    await svc.resize("local:img", "1M", ROOT)  # as `tm2 resize` does through the API
    assert await settled(1) == [("inode", ino)]
    await svc.delete("local:img", ROOT)  # the entry, the inode, and its folder (new mtime)
    assert await settled(3) == sorted([("entry", local, b"img"), ("inode", ino), ("inode", local)])
    await svc.set_enabled(ROOT, "local", False)
    assert await settled(2) == [("entry", pyfuse3.ROOT_INODE, b"local"), ("inode", local)]
    monkeypatch.setattr(fs.pyfuse3, "trio_token", None)  # not mounted: nothing is attempted
    await svc.set_enabled(ROOT, "local", True)
    assert await settled(0) == []


# ---------------------------------------------------------------------- error mapping


@pytest.mark.logs_ok
async def test_unexpected_errors_are_logged_and_become_eio(
        ops: fs.Operations, svc: Service, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def boom(ino: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(svc, "getattr", boom)
    assert await errno_of(ops.getattr(pyfuse3.ROOT_INODE, CTX)) == errno.EIO
    records = [r for r in caplog.records if r.name == "tm2fs.fs"]
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert records[0].exc_info and "a bug" in str(records[0].exc_info[1])


async def test_os_errors_keep_their_errno(ops: fs.Operations, svc: Service,
                                          monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    def nospace(ino: int) -> None:
        raise OSError(errno.ENOSPC, "full")

    monkeypatch.setattr(svc, "getattr", nospace)
    assert await errno_of(ops.getattr(pyfuse3.ROOT_INODE, CTX)) == errno.ENOSPC

    def bare(ino: int) -> None:
        raise OSError("no errno")

    monkeypatch.setattr(svc, "getattr", bare)
    assert await errno_of(ops.getattr(pyfuse3.ROOT_INODE, CTX)) == errno.EIO
    assert not [r for r in caplog.records if r.name == "tm2fs.fs"]  # expected errors: no log


def test_mount_options() -> None:
    opts = fs.mount_options()
    assert {"fsname=tm2fs", "subtype=tm2fs", "allow_other", "default_permissions"} <= opts
    assert set(pyfuse3.default_options) <= opts
    assert fs.Operations.enable_writeback_cache is False
