"""`dir`: images as sparse files in a local (or shared) directory, named by their opaque key.

Without HOST the directory is shared storage every host reaches at PATH (NFS, CephFS, or one
machine); with HOST=name it is that host's alone, and the others show the backend REMOTE.

Clone is a reflink (FICLONE) where the filesystem shares blocks (XFS, btrfs), else a sparse-aware
copy (SEEK_DATA/SEEK_HOLE) so a thin 100 GiB image with 1 MiB of data copies 1 MiB. Data-path calls
(pread/pwrite) run inline on the trio thread when the directory is on a local filesystem: there
they are page-cache memcpy and a thread hop would cost more than the call. On a filesystem that
can hang (NFS, CIFS, CephFS, FUSE, 9p...: read from /proc/self/mounts at start) every data call
goes through a worker thread that the backend's timeout can abandon, so a dead server turns the
backend to ERROR instead of stalling the daemon. Control calls (monitor, clone, delete...) always
run in worker threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..errors import InvalidArgument
from ..mounts import filesystem_type
from .base import (
    Capacity,
    Driver,
    Handle,
    InlineHandle,
    Progress,
    ThreadedHandle,
    check_key,
    directory_capacity,
    fsync_dir,
)

FICLONE = 0x40049409  # _IOW(0x94, 9, int), from linux/fs.h
COPY_CHUNK = 8 * 2**20
WRITE_BEHIND = 8 * 2**20  # a sequential run this long goes to the disk now (FileHandle.pwrite)
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h; Python's os has no sync_file_range
_sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
# filesystems whose calls can block for as long as a server is away
REMOTE = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "lustre", "afs",
          "fuse", "fuseblk", "sshfs")


def is_remote(fs_type: str) -> bool:
    return fs_type.split(".")[0] in REMOTE


class FileHandle(InlineHandle):
    """An image file. Its directory entry is made durable by the first fsync (allocate does not
    sync: a create must not cost two disk flushes; durability is what fsync promises).

    Write-behind: each WRITE_BEHIND bytes of a sequential run are handed to the disk at once
    (sync_file_range WRITE: it starts the writeback and does not wait for it), so a copy into the
    mount keeps the disk busy while the next requests arrive, and its final fsync finds little
    left. Measured (benchmarks/acceptance.py, 1 MiB writes ended by fsync): 0.65 of a native
    file's speed without, 0.90-0.98 with in some runs and 0.68 in others (then the loop's two
    copies of each request are the limit: README, The data path). The kernel would otherwise
    start, by default, only after 30 s or with 10% of memory dirty. Random writes are left to it."""

    __slots__ = ("_behind", "_next", "dir", "fd")

    def __init__(self, fd: int, directory: Path | None = None) -> None:
        self.fd = fd
        self.dir = directory
        self._next = self._behind = 0  # the sequential run being written, and its unkicked start

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, offset: int, data: bytes) -> int:
        n = os.pwrite(self.fd, data, offset)
        if offset != self._next:
            self._behind = offset
        self._next = offset + n
        if self._next - self._behind >= WRITE_BEHIND:  # a hint: an I/O error shows at fsync
            _sync_file_range(self.fd, self._behind, self._next - self._behind,
                             SYNC_FILE_RANGE_WRITE)
            self._behind = self._next
        return n

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def flush(self) -> None:
        os.fsync(self.fd)
        if self.dir is not None:
            fsync_dir(self.dir)
            self.dir = None

    async def aflush(self) -> None:
        """fsync waits for the disk (seconds after a large copy): in a worker thread, not on the
        loop that serves every other request. Not abandoned on a timeout: the fd must stay open
        until it returns."""
        await trio.to_thread.run_sync(self.flush)

    def close(self) -> None:
        os.close(self.fd)


class DirDriver(Driver):
    name = "dir"
    cheap_clone = False  # a reflink is attempted first; cheap only where the filesystem allows

    def __init__(self, tm_raw: dict[str, Any], state_dir: Path) -> None:
        super().__init__(tm_raw, state_dir)
        self.root = Path(tm_raw["PATH"])
        self.remote = False
        # every worker thread of this backend counts here, so a hung server ties up only these
        self.limiter = trio.CapacityLimiter(16)

    @classmethod
    def validate(cls, tm_raw: dict[str, Any], state_dir: Path, backend_name: str) -> dict[str, Any]:
        raw = {k.upper(): v for k, v in tm_raw.items()}
        unknown = set(raw) - {"PATH", "HOST"}
        if unknown:
            raise InvalidArgument(
                f"dir driver: unknown TM_RAW attribute(s) {', '.join(sorted(unknown))}",
                "the dir driver takes PATH=/absolute/directory and, for a directory only one "
                "host has, HOST=name")
        if "HOST" in raw and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}", str(raw["HOST"])):
            raise InvalidArgument(f"dir driver: HOST {raw['HOST']!r} is not a plain host name")
        if "PATH" not in raw:
            raw["PATH"] = str(state_dir / "backends" / backend_name)
        path = str(raw["PATH"])
        if not os.path.isabs(path) or "\0" in path:
            raise InvalidArgument(f"dir driver: PATH {path!r} is not an absolute path")
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise InvalidArgument(f"dir driver: cannot use PATH {path!r}: {e.strerror}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise InvalidArgument(f"dir driver: PATH {path!r} is not writable")
        raw["PATH"] = path
        return raw

    marked = True

    @classmethod
    def storage_dir(cls, tm_raw: dict[str, Any], host: str) -> str | None:
        if "PATH" not in tm_raw or tm_raw.get("HOST") not in (None, host):
            return None  # another host's own directory
        return str(tm_raw["PATH"])

    def _path(self, key: str) -> Path:
        return self.root / check_key(key, "dir")

    async def start(self) -> None:
        await trio.to_thread.run_sync(self._check_root, abandon_on_cancel=True, limiter=self.limiter)
        self.remote = is_remote(filesystem_type(self.root))

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(errno.ENOENT, "backend directory is gone", str(self.root))

    async def monitor(self) -> Capacity:
        return await trio.to_thread.run_sync(self._monitor, abandon_on_cancel=True, limiter=self.limiter)

    def _monitor(self) -> Capacity:
        self._check_root()
        if os.statvfs(self.root).f_flag & os.ST_RDONLY:  # remounted read-only under us
            raise OSError(errno.EROFS, "the backend's filesystem is mounted read-only", str(self.root))
        return directory_capacity(self.root)

    async def allocate(self, key: str, size: int) -> None:
        def _allocate() -> None:
            fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)

        await self._run(_allocate)

    async def delete(self, key: str) -> None:
        def _delete() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))  # not synced: a key that comes back is swept

        await self._run(_delete)

    async def _run(self, call: Callable[[], None]) -> None:
        """Short calls on a local filesystem run inline (a thread hop costs more than creating
        or removing an empty file); on a remote one, in an abandonable worker thread, as the
        data path does."""
        if self.remote:
            await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self.limiter)
        else:
            call()

    async def size(self, key: str) -> int:
        st = await trio.to_thread.run_sync(os.stat, self._path(key), abandon_on_cancel=True,
                                           limiter=self.limiter)
        return st.st_size

    async def allocated(self, key: str) -> int:
        st = await trio.to_thread.run_sync(os.stat, self._path(key), abandon_on_cancel=True,
                                           limiter=self.limiter)
        return st.st_blocks * 512

    async def resize(self, key: str, size: int) -> None:
        def _resize() -> None:
            fd = os.open(self._path(key), os.O_RDWR)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(_resize, abandon_on_cancel=True, limiter=self.limiter)

    async def clone(self, src_key: str, dst_key: str, progress: Progress | None = None) -> None:
        await trio.to_thread.run_sync(
            _clone_file, self._path(src_key), self._path(dst_key), progress,
            abandon_on_cancel=True, limiter=self.limiter)

    async def open(self, key: str, writable: bool) -> Handle:
        path = self._path(key)

        def _open() -> int:
            try:
                return os.open(path, os.O_RDWR if writable else os.O_RDONLY)
            except OSError as e:  # a read-only filesystem still serves reads (writes: EROFS)
                if not (writable and e.errno == errno.EROFS):
                    raise
                return os.open(path, os.O_RDONLY)

        if self.remote:
            fd = await trio.to_thread.run_sync(_open, abandon_on_cancel=True, limiter=self.limiter)
            return ThreadedHandle(FileHandle(fd, self.root), self.limiter)
        return FileHandle(_open(), self.root)

    async def keys(self) -> list[str]:
        return await trio.to_thread.run_sync(
            lambda: [e.name for e in os.scandir(self.root) if e.is_file(follow_symlinks=False)],
            abandon_on_cancel=True, limiter=self.limiter)

    def local_path(self, key: str) -> str:
        return str(self._path(key))

    def source(self, key: str) -> dict[str, Any]:
        return {"type": "file", "path": str(self._path(key))}


def _clone_file(src: Path, dst: Path, progress: Progress | None) -> None:
    """Reflink if the filesystem can, else copy only the data extents; the result is fsynced."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    raise
                _sparse_copy(sfd, dfd, progress)
            os.fsync(dfd)
        except BaseException:
            os.close(dfd)
            os.unlink(dst)
            raise
        os.close(dfd)
        fsync_dir(dst.parent)
    finally:
        os.close(sfd)


def _sparse_copy(sfd: int, dfd: int, progress: Progress | None) -> None:
    size = os.fstat(sfd).st_size
    os.ftruncate(dfd, size)
    done = 0
    offset = 0
    while offset < size:
        try:
            start = os.lseek(sfd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(sfd, start, os.SEEK_HOLE)
        pos = start
        while pos < end:
            # copy_file_range stays in the kernel; it may itself reflink or server-side copy.
            n = os.copy_file_range(sfd, dfd, min(COPY_CHUNK, end - pos), pos, pos)
            if n == 0:
                break
            pos += n
            done += n
            if progress:
                progress(done)
        offset = end
