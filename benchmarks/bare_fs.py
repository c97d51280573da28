"""A bare pyfuse3 + trio filesystem in memory: what one Python FUSE loop can do on this machine.

The ceiling to read tm2fs's metadata figures against (benchmarks/metadata.py runs it in the same
run). No storage, no database, no rules: inodes and directory entries are dicts, and each request
is answered from them on the trio loop. It mounts as tm2fs mounts (`tm2fs.fs.mount_options()`:
allow_other, default_permissions; entries and attributes cached for `tm2fs.fs.CACHE_TIMEOUT`),
so the kernel sends it the same requests: a create from a shell is lookup, create, flush,
release; `ls -l` is readdirplus (pyfuse3's only readdir) and what the kernel still asks after it.
Whatever tm2fs takes beyond this is tm2fs's own cost.

`serve` and `mounted` run any pyfuse3 filesystem in a subprocess until SIGTERM (the data-path
ceiling, benchmarks/pyfuse3_ceiling.py, could run its own with them).

    .venv/bin/python benchmarks/bare_fs.py MOUNTPOINT     # serves until SIGTERM
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tm2fs.fs import CACHE_TIMEOUT, mount_options
from tm2fs.mounts import is_mounted

ROOT = pyfuse3.ROOT_INODE


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class BareFS(pyfuse3.Operations):
    """The namespace in dicts; an inode's attributes are kept as the EntryAttributes replied."""

    supports_dot_lookup = True  # as tm2fs.fs.Operations
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.entries: dict[int, dict[bytes, int]] = {}  # directory inode -> name -> inode
        self.parent: dict[int, int] = {ROOT: ROOT}  # directory inode -> its parent
        self.opens: dict[int, int] = {}  # file inode -> open handles (fh is the inode)
        self.listings: dict[int, list[tuple[bytes, int]]] = {}  # opendir fh -> snapshot
        self._ino = itertools.count(ROOT + 1)
        self._fh = itertools.count(1)
        self.attrs[ROOT] = self._attr(ROOT, stat.S_IFDIR | 0o755, 0, 0)
        self.attrs[ROOT].st_nlink = 2
        self.entries[ROOT] = {}

    @staticmethod
    def _attr(ino: int, mode: int, uid: int, gid: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        now = time.time_ns()
        e.st_ino = ino
        e.st_mode = mode
        e.st_nlink = 1
        e.st_uid = uid
        e.st_gid = gid
        e.st_blksize = 128 * 1024
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = now
        e.entry_timeout = e.attr_timeout = CACHE_TIMEOUT
        return e

    def _get(self, ino: int) -> pyfuse3.EntryAttributes:
        try:
            return self.attrs[ino]
        except KeyError:
            raise _fail(errno.ENOENT) from None

    def _dir(self, ino: int) -> dict[bytes, int]:
        try:
            return self.entries[ino]
        except KeyError:
            raise _fail(errno.ENOTDIR) from None

    def _touch(self, ino: int) -> None:
        a = self.attrs[ino]
        a.st_mtime_ns = a.st_ctime_ns = time.time_ns()

    def _add(self, parent: int, name: bytes, mode: int,
             ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        names = self._dir(parent)
        if name in names:
            raise _fail(errno.EEXIST)
        ino = next(self._ino)
        attr = self.attrs[ino] = self._attr(ino, mode, ctx.uid, ctx.gid)
        names[name] = ino
        self._touch(parent)
        return attr

    def _drop(self, ino: int) -> None:
        """One name of `ino` is gone: the inode goes with its last name and last handle."""
        a = self.attrs[ino]
        a.st_nlink -= 1
        a.st_ctime_ns = time.time_ns()
        if a.st_nlink == 0 and not self.opens.get(ino):
            del self.attrs[ino]

    def _remove(self, parent: int, name: bytes, ino: int) -> None:
        """Take the entry `name` -> `ino` out of `parent`; an (empty) directory goes whole."""
        if ino in self.entries:
            if self.entries[ino]:
                raise _fail(errno.ENOTEMPTY)
            del self.entries[ino], self.parent[ino]
            self.attrs[parent].st_nlink -= 1
            self.attrs[ino].st_nlink = 1
        del self.entries[parent][name]
        self._touch(parent)
        self._drop(ino)

    # ------------------------------------------------------------------ lookups

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return self._get(parent_inode)
        if name == b"..":
            return self._get(self.parent[parent_inode])
        ino = self._dir(parent_inode).get(name)
        if ino is None:
            raise _fail(errno.ENOENT)
        return self.attrs[ino]

    async def getattr(self, inode, ctx=None):
        return self._get(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        a = self._get(inode)
        if fields.update_mode:
            a.st_mode = stat.S_IFMT(a.st_mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            a.st_uid = attr.st_uid
        if fields.update_gid:
            a.st_gid = attr.st_gid
        if fields.update_size:
            a.st_size = attr.st_size
        if fields.update_atime:
            a.st_atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            a.st_mtime_ns = attr.st_mtime_ns
        a.st_ctime_ns = time.time_ns()
        return a

    async def opendir(self, inode, ctx):
        fh = next(self._fh)
        self.listings[fh] = list(self._dir(inode).items())
        return fh

    async def readdir(self, fh, start_id, token):
        """The cookie is the index in the snapshot taken at opendir (entries gone since skipped)."""
        listing = self.listings[fh]
        for i in range(start_id, len(listing)):
            name, ino = listing[i]
            attr = self.attrs.get(ino)
            if attr is not None and not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return

    async def releasedir(self, fh):
        del self.listings[fh]

    # ------------------------------------------------------------------ namespace changes

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._add(parent_inode, name, mode, ctx)

    async def create(self, parent_inode, name, mode, flags, ctx):
        attr = self._add(parent_inode, name, mode, ctx)
        self.opens[attr.st_ino] = 1
        return pyfuse3.FileInfo(fh=attr.st_ino), attr

    async def mkdir(self, parent_inode, name, mode, ctx):
        attr = self._add(parent_inode, name, stat.S_IFDIR | mode, ctx)
        attr.st_nlink = 2
        self.attrs[parent_inode].st_nlink += 1
        self.entries[attr.st_ino] = {}
        self.parent[attr.st_ino] = parent_inode
        return attr

    async def unlink(self, parent_inode, name, ctx):
        ino = self._dir(parent_inode).get(name)
        if ino is None:
            raise _fail(errno.ENOENT)
        if ino in self.entries:
            raise _fail(errno.EISDIR)
        self._remove(parent_inode, name, ino)

    async def rmdir(self, parent_inode, name, ctx):
        ino = self._dir(parent_inode).get(name)
        if ino is None:
            raise _fail(errno.ENOENT)
        if ino not in self.entries:
            raise _fail(errno.ENOTDIR)
        self._remove(parent_inode, name, ino)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old, new = self._dir(parent_inode_old), self._dir(parent_inode_new)
        ino = old.get(name_old)
        if ino is None:
            raise _fail(errno.ENOENT)
        target = new.get(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if target is None:
                raise _fail(errno.ENOENT)
            old[name_old], new[name_new] = target, ino
            for moved, parent in ((ino, parent_inode_new), (target, parent_inode_old)):
                if moved in self.parent:
                    self.parent[moved] = parent
        else:
            if target == ino:
                return
            if target is not None:
                if flags & pyfuse3.RENAME_NOREPLACE:
                    raise _fail(errno.EEXIST)
                if (target in self.entries) != (ino in self.entries):
                    raise _fail(errno.EISDIR if target in self.entries else errno.ENOTDIR)
                self._remove(parent_inode_new, name_new, target)
            del old[name_old]
            new[name_new] = ino
            if ino in self.entries and parent_inode_old != parent_inode_new:
                self.parent[ino] = parent_inode_new
                self.attrs[parent_inode_old].st_nlink -= 1
                self.attrs[parent_inode_new].st_nlink += 1
        self.attrs[ino].st_ctime_ns = time.time_ns()
        self._touch(parent_inode_old)
        self._touch(parent_inode_new)

    # ------------------------------------------------------------------ handles (no data)

    async def open(self, inode, flags, ctx):
        a = self._get(inode)
        if flags & os.O_TRUNC:
            a.st_size = 0
        self.opens[inode] = self.opens.get(inode, 0) + 1
        return pyfuse3.FileInfo(fh=inode)

    async def flush(self, fh):
        return None

    async def release(self, fh):
        self.opens[fh] -= 1
        if not self.opens[fh]:
            del self.opens[fh]
            if self.attrs[fh].st_nlink == 0:
                del self.attrs[fh]


class OneFile(pyfuse3.Operations):
    """A bare filesystem of one file, `f`, of `size` bytes, for the data-path ceilings
    (pyfuse3_ceiling.py, iscsi.py, ceph_rbd.py): subclasses answer read (and write)."""

    def __init__(self, size: int, attr_timeout: float = 60.0) -> None:
        super().__init__()
        self.size = size
        self.attr_timeout = attr_timeout

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = (stat.S_IFDIR | 0o755) if ino == ROOT else (stat.S_IFREG | 0o644)
        e.st_size = 0 if ino == ROOT else self.size
        e.st_nlink = 1
        e.attr_timeout = e.entry_timeout = self.attr_timeout
        return e

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None,
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if name != b"f":
            raise _fail(errno.ENOENT)
        return self._attr(ROOT + 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode)


def serve(ops: pyfuse3.Operations, mnt: str, options: set[str]) -> None:
    """Mount `ops` on `mnt` and serve on one trio loop until SIGTERM, then unmount."""

    async def main() -> None:
        pyfuse3.init(ops, mnt, options)
        async with trio.open_nursery() as nursery:
            async def stop() -> None:
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()

            nursery.start_soon(stop)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
        pyfuse3.close(unmount=True)

    trio.run(main)


@contextmanager
def mounted(mnt: Path, argv: Sequence[str] | None = None,
            timeout: float = 20.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python argv...` (by default this module on `mnt`) until `mnt` is mounted; SIGTERM
    and unmount when done."""
    proc = subprocess.Popen([sys.executable, *(argv or (__file__, str(mnt)))])
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv or __file__} did not mount {mnt} "
                                   f"(exit status {proc.poll()})")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", "--", str(mnt)], check=False)


def options() -> set[str]:
    """tm2fs's mount options, under the name `bare` (fsname and subtype change nothing else)."""
    return {o for o in mount_options("bare") if not o.startswith("subtype=")} | {"subtype=bare"}


if __name__ == "__main__":
    serve(BareFS(), sys.argv[1], options())
