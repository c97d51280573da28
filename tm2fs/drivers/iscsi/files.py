"""The LUN backing files in STORE on the target host: here (`LocalFiles`) or over ssh (`RemoteFiles`).

A LUN holds whole 512-byte blocks, so STORE/KEY is the image size rounded up to a block (or longer
while a writer grows it); when that is not the image's exact size, an empty sparse file
STORE/KEY.size records it in its length.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

import trio

from ..base import Capacity, fsync_dir
from ..threads import in_thread
from .runner import CommandError, Runner
from .settings import BLOCK, KEY_RE, round_up

SIZE_SUFFIX = ".size"  # STORE/KEY.size: a sparse file whose length is the image's exact byte size


class Files(Protocol):
    """The backing files; `size()` answers an image's exact size."""

    async def prepare(self) -> None: ...
    async def check(self) -> None: ...
    async def create(self, path: str, size: int) -> None: ...
    async def remove(self, path: str) -> None: ...
    async def set_size(self, path: str, size: int) -> None:
        """Backing file cut or grown to whole blocks (the cut-off bytes read as zeros), size recorded."""
    async def grow(self, path: str, length: int, size: int) -> None:
        """Backing file extended to `length` bytes; the image's size is still `size`."""
    async def size(self, path: str) -> int: ...
    async def allocated(self, path: str) -> int:
        """Bytes the backing file holds (its blocks)."""
    async def copy(self, src: str, dst: str) -> None: ...
    async def usage(self) -> tuple[Capacity, dict[str, int]]:
        """STORE's capacity and {key: exact size} of every image."""


def record_for(size: int) -> int | None:
    """The size record an image of `size` bytes needs in a file of whole blocks: None if none."""
    return size if size % BLOCK else None


def tally(entries: Iterable[tuple[str, int, int]]) -> tuple[dict[str, int], int]:
    """{key: exact size} of the images among STORE's files (name, length, 512-byte blocks), and
    the bytes their backing files occupy."""
    files: dict[str, int] = {}
    records: dict[str, int] = {}
    used = 0
    for name, length, blocks in entries:
        stem = name.removesuffix(SIZE_SUFFIX)
        if KEY_RE.fullmatch(name):
            files[name] = length
            used += blocks * 512
        elif stem != name and KEY_RE.fullmatch(stem):
            records[stem] = length
    files.update((k, v) for k, v in records.items() if k in files)
    return files, used


@contextlib.asynccontextmanager
async def removed_on_failure(files: Files, path: str) -> AsyncIterator[None]:
    """If the block fails or is cancelled, the backing file `path` is removed (shielded, best effort)."""
    try:
        yield
    except BaseException:
        with trio.CancelScope(shield=True), contextlib.suppress(OSError):
            await files.remove(path)
        raise


class LocalFiles:
    """Backing files on this host: Python calls in abandonable worker threads."""

    def __init__(self, store: str, runner: Runner, limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.runner = runner
        self.limiter = limiter

    async def prepare(self) -> None:
        await in_thread(self.limiter, lambda: os.makedirs(self.store, mode=0o700, exist_ok=True))

    async def check(self) -> None:
        if not await in_thread(self.limiter, os.path.isdir, self.store):
            raise FileNotFoundError(errno.ENOENT, "iscsi driver: STORE is gone", self.store)

    @staticmethod
    def _truncate(path: str, *lengths: int, flags: int = 0) -> None:
        """Cut `path` to each of `lengths` in turn, then fsync it (`flags` as os.open takes them)."""
        fd = os.open(path, os.O_RDWR | flags, 0o600)
        try:
            for length in lengths:
                os.ftruncate(fd, length)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _record(self, path: str, size: int | None) -> None:
        """Write (or, for None, drop) the exact-size record of an image."""
        if size is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + SIZE_SUFFIX)
        else:
            self._truncate(path + SIZE_SUFFIX, size, flags=os.O_CREAT)

    async def create(self, path: str, size: int) -> None:
        def _create() -> None:
            self._truncate(path, round_up(size), flags=os.O_CREAT | os.O_EXCL)
            self._record(path, record_for(size))
            fsync_dir(self.store)

        await in_thread(self.limiter, _create)

    async def remove(self, path: str) -> None:
        def _remove() -> None:
            self._record(path, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fsync_dir(self.store)

        await in_thread(self.limiter, _remove)

    async def set_size(self, path: str, size: int) -> None:
        def _set() -> None:
            if not os.path.exists(path):
                raise FileNotFoundError(errno.ENOENT, "iscsi driver: no backing file", path)
            self._truncate(path, size, round_up(size))  # exact first: the block's rest reads zeros
            self._record(path, record_for(size))

        await in_thread(self.limiter, _set)

    async def grow(self, path: str, length: int, size: int) -> None:
        def _grow() -> None:
            self._record(path, size)
            self._truncate(path, length)

        await in_thread(self.limiter, _grow)

    async def size(self, path: str) -> int:
        def _size() -> int:
            try:
                return os.stat(path + SIZE_SUFFIX).st_size
            except FileNotFoundError:
                return os.stat(path).st_size

        return await in_thread(self.limiter, _size)

    async def allocated(self, path: str) -> int:
        st = await in_thread(self.limiter, os.stat, path)
        return st.st_blocks * 512

    async def copy(self, src: str, dst: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        await in_thread(self.limiter, lambda: os.close(os.open(dst, flags, 0o600)))
        async with removed_on_failure(self, dst):
            await self.runner.run(["cp", "--reflink=auto", "--sparse=always", "--", src, dst])

            def _finish() -> None:
                with contextlib.suppress(FileNotFoundError):
                    self._record(dst, os.stat(src + SIZE_SUFFIX).st_size)
                self._truncate(dst)  # no length: just the fsync
                fsync_dir(self.store)

            await in_thread(self.limiter, _finish)

    async def usage(self) -> tuple[Capacity, dict[str, int]]:
        def _usage() -> tuple[Capacity, dict[str, int]]:
            st = os.statvfs(self.store)
            with os.scandir(self.store) as it:
                regular = [e for e in it if e.is_file(follow_symlinks=False)]
                stats = [(e.name, e.stat(follow_symlinks=False)) for e in regular]
            files, used = tally((name, est.st_size, est.st_blocks) for name, est in stats)
            return Capacity(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, used), files

        return await in_thread(self.limiter, _usage)


class RemoteFiles:
    """Backing files on the target host, through coreutils over ssh (argument lists, quoted)."""

    def __init__(self, store: str, runner: Runner) -> None:
        self.store = store
        self.runner = runner

    async def _absent(self, path: str) -> None:
        try:
            await self.runner.run(["test", "!", "-e", path])
        except CommandError:
            raise FileExistsError(errno.EEXIST, "iscsi driver: backing file exists", path) from None

    async def _record(self, path: str, size: int | None) -> None:
        if size is None:
            await self.runner.run(["rm", "-f", "--", path + SIZE_SUFFIX])
        else:
            await self.runner.run(["truncate", "-s", str(size), "--", path + SIZE_SUFFIX])

    async def prepare(self) -> None:
        await self.runner.run(["mkdir", "-p", "-m", "700", "--", self.store])

    async def check(self) -> None:
        try:
            await self.runner.run(["test", "-d", self.store])
        except CommandError:
            raise FileNotFoundError(errno.ENOENT, "iscsi driver: STORE is gone", self.store) from None

    async def create(self, path: str, size: int) -> None:
        await self._absent(path)
        await self.runner.run(["truncate", "-s", str(round_up(size)), "--", path])
        await self._record(path, record_for(size))
        await self.runner.run(["sync", "--", path])

    async def remove(self, path: str) -> None:
        await self.runner.run(["rm", "-f", "--", path + SIZE_SUFFIX, path])

    async def set_size(self, path: str, size: int) -> None:
        await self.runner.run(["truncate", "--no-create", "-s", str(size), "--", path])
        await self.runner.run(["truncate", "--no-create", "-s", str(round_up(size)), "--", path])
        await self._record(path, record_for(size))
        await self.runner.run(["sync", "--", path])

    async def grow(self, path: str, length: int, size: int) -> None:
        await self._record(path, size)
        await self.runner.run(["truncate", "--no-create", "-s", str(length), "--", path])

    async def size(self, path: str) -> int:
        sizes = await self._sizes(path)
        if path + SIZE_SUFFIX in sizes:
            return sizes[path + SIZE_SUFFIX]
        if path not in sizes:
            raise FileNotFoundError(errno.ENOENT, "iscsi driver: no backing file", path)
        return sizes[path]

    async def allocated(self, path: str) -> int:
        out = await self.runner.run(["stat", "-c", "%b %B", "--", path])
        blocks, unit = out.split()
        return int(blocks) * int(unit)

    async def _sizes(self, path: str) -> dict[str, int]:
        """{name: size} of the image and its size record, whichever exist."""
        try:
            out = await self.runner.run(["find", os.path.dirname(path), "-maxdepth", "1", "(", "-name",
                                         os.path.basename(path), "-o", "-name",
                                         os.path.basename(path) + SIZE_SUFFIX, ")", "-printf", "%p/%s\\n"])
        except CommandError as e:
            raise FileNotFoundError(errno.ENOENT, e.strerror, path) from None
        return {name: int(size) for name, _, size in (line.rpartition("/") for line in out.splitlines())}

    async def copy(self, src: str, dst: str) -> None:
        await self._absent(dst)
        async with removed_on_failure(self, dst):
            await self.runner.run(["cp", "--reflink=auto", "--sparse=always", "--", src, dst])
            sizes = await self._sizes(src)
            if src + SIZE_SUFFIX in sizes:
                await self._record(dst, sizes[src + SIZE_SUFFIX])
            await self.runner.run(["sync", "--", dst])

    async def usage(self) -> tuple[Capacity, dict[str, int]]:
        fs = (await self.runner.run(["stat", "-f", "-c", "%S %b %a", "--", self.store])).split()
        listing = await self.runner.run(["find", self.store, "-maxdepth", "1", "-type", "f",
                                         "-printf", "%f %s %b\\n"])
        rows = [line.split() for line in listing.splitlines()]
        files, used = tally((r[0], int(r[1]), int(r[2])) for r in rows if len(r) == 3)
        unit = int(fs[0])
        return Capacity(int(fs[1]) * unit, int(fs[2]) * unit, used), files
