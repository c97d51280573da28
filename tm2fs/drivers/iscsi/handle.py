"""An open image: bytes over a session's 512-byte blocks, many requests in flight at once.

pread/pwrite are READ16/WRITE16 in 512-byte blocks on the session's `Pipeline` (libiscsi's event
loop on the trio thread), with read-modify-write at unaligned edges; flush is SYNCHRONIZE
CACHE(10), close is a logout. Reads and block-aligned writes run side by side, as the kernel sends
them; a write that must read-modify-write an edge block, a write that grows the LUN and a
truncate run alone (`WriteGate`), so two writes sharing a block cannot undo each other.

Writing past the end of a LUN grows it (geometrically: at least 64 MiB, at most 1 GiB more a
step, so a `cp` into the mount does not resize per 128 KiB write); flush and close cut the
backing file back to the written size. A crash between the two leaves the image longer, zeros.
A broken session (target gone, a command timed out) fails its commands; the next call logs in
again.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from ..base import Handle
from .libiscsi import Session
from .pipeline import Pipeline
from .settings import BLOCK, round_up

if TYPE_CHECKING:
    from .driver import IscsiDriver

MAX_TRANSFER = 2**20  # bytes per READ16/WRITE16
GROW_MIN = 64 * 2**20
GROW_MAX = 2**30


class WriteGate:
    """Writes that fill whole blocks share the gate; one that rewrites part of a block, grows the
    LUN or truncates holds it alone (it waits for the shared ones to end, new ones wait for it)."""

    __slots__ = ("_alone", "_idle", "_shared")

    def __init__(self) -> None:
        self._alone = trio.Lock()
        self._shared = 0
        self._idle = trio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        if self._alone.locked():
            async with self._alone:  # wait for the lone writer, then go in with the others
                self._enter()
        else:
            self._enter()
        try:
            yield
        finally:
            self._shared -= 1
            if not self._shared:
                self._idle.set()

    def _enter(self) -> None:
        if not self._shared:
            self._idle = trio.Event()
        self._shared += 1

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._alone:
            await self._idle.wait()
            yield


class IscsiHandle(Handle):
    """An open image on one session; the a* methods run on the trio thread, side by side."""

    def __init__(self, driver: IscsiDriver, key: str, pipeline: Pipeline, writable: bool,
                 size: int) -> None:
        self.driver = driver
        self.key = key
        self.pipeline = pipeline
        self.writable = writable
        self.capacity = pipeline.capacity  # what the target has (whole blocks)
        self.size = size  # what the image holds (bytes): pread stops there
        self.recorded = size  # the image size the backend holds
        self.closed = False
        self.gate = WriteGate()
        self._login = trio.Lock()

    @staticmethod
    async def start(driver: IscsiDriver, session: Session) -> Pipeline:
        """The logged-in session on the trio loop, its capacity read."""
        pipeline = Pipeline(session)
        try:
            await pipeline.read_capacity()
        except BaseException:
            await pipeline.aclose(driver.limiter)
            raise
        return pipeline

    async def _session(self) -> Pipeline:
        """The pipeline; a broken one is replaced by a fresh login first."""
        if self.closed:
            raise OSError(errno.EBADF, "iscsi driver: the handle is closed")
        if not self.pipeline.broken:
            return self.pipeline
        async with self._login:
            if self.pipeline.broken and not self.closed:
                old = self.pipeline
                await old.aclose(self.driver.limiter)
                self.pipeline = await self.start(self.driver, await self.driver._login(self.key))
                self.capacity = self.pipeline.capacity
        if self.closed:
            raise OSError(errno.EBADF, "iscsi driver: the handle is closed")
        return self.pipeline

    async def apread(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "iscsi driver: negative offset or size")
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        p = await self._session()
        end = min(end, self.capacity)
        if end <= offset:
            return b""
        first = offset // BLOCK * BLOCK
        return (await self._read(p, first, round_up(end) - first))[offset - first:end - first]

    @staticmethod
    async def _read(p: Pipeline, start: int, length: int) -> bytes:
        if length <= MAX_TRANSFER:
            return await p.read(start // BLOCK, length)
        chunks = []
        for pos in range(start, start + length, MAX_TRANSFER):
            chunks.append(await p.read(pos // BLOCK, min(MAX_TRANSFER, start + length - pos)))
        return b"".join(chunks)

    async def apwrite(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise OSError(errno.EBADF, "iscsi driver: the image is open read-only")
        if offset < 0:
            raise OSError(errno.EINVAL, "iscsi driver: negative offset")
        if not data:
            return 0
        end = offset + len(data)
        if offset % BLOCK or end % BLOCK or end > self.capacity:
            async with self.gate.alone():
                if end > self.capacity:
                    await self._grow(end)
                await self._write(offset, data)
        else:
            async with self.gate.shared():
                await self._write(offset, data)
        self.size = max(self.size, end)
        return len(data)

    async def _grow(self, end: int) -> None:
        cap = self.capacity
        grown = max(round_up(end), min(2 * cap, cap + GROW_MAX), cap + GROW_MIN)
        path = self.driver.s.path(self.key)
        await self.driver.files.grow(path, grown, self.recorded)
        await self.driver.targets.resize_lun(self.key, path, grown)
        await self.refresh()

    async def refresh(self) -> int:
        """READ CAPACITY again (after the target resized the LUN)."""
        self.capacity = await (await self._session()).read_capacity()
        return self.capacity

    async def _write(self, offset: int, data: bytes) -> None:
        p = await self._session()
        end = offset + len(data)
        if end > self.capacity:
            raise OSError(errno.EFBIG, f"iscsi driver: write ends at {end}, past the LUN's "
                          f"{self.capacity} bytes")
        first, last = offset // BLOCK * BLOCK, round_up(end)
        if first != offset or last != end:  # read-modify-write of the partial edge blocks
            buf = bytearray(last - first)
            if first != offset:
                buf[:BLOCK] = await p.read(first // BLOCK, BLOCK)
            if last != end and not (first != offset and last - BLOCK == first):
                buf[-BLOCK:] = await p.read((last - BLOCK) // BLOCK, BLOCK)
            buf[offset - first:end - first] = data
            out = bytes(buf)
        else:
            out = data if type(data) is bytes else bytes(data)
        if len(out) <= MAX_TRANSFER:
            await p.write(first // BLOCK, out)
            return
        for pos in range(0, len(out), MAX_TRANSFER):
            await p.write((first + pos) // BLOCK, out[pos:pos + MAX_TRANSFER])

    async def atruncate(self, size: int) -> None:
        if not self.writable:
            raise OSError(errno.EBADF, "iscsi driver: the image is open read-only")
        async with self.gate.alone():
            await self._record(size)
            self.size = size

    async def _record(self, size: int) -> None:
        lun = round_up(size) != self.capacity
        await self.driver._set_size(self.key, size, lun=lun)
        self.recorded = size
        if lun:
            await self.refresh()

    async def _settle(self) -> None:
        """Record the size written; cut a grown backing file back to it."""
        if self.writable and (self.size != self.recorded or self.capacity != round_up(self.size)):
            await self._record(self.size)

    async def aflush(self) -> None:
        if self.writable:
            await (await self._session()).sync()
            async with self.gate.alone():
                await self._settle()

    async def aclose(self) -> None:
        async with self.gate.alone():
            try:
                if not self.closed:
                    await self._settle()
            finally:
                self.closed = True
                await self.pipeline.aclose(self.driver.limiter)

    def close(self) -> None:
        self.closed = True
        self.pipeline.close()
