"""An open image: bytes over a session's 512-byte blocks, in abandonable worker threads.

pread/pwrite are READ16/WRITE16 in 512-byte blocks with read-modify-write at unaligned edges, flush
is SYNCHRONIZE CACHE(10), close is a logout. Writing past the end of a LUN grows it (geometrically:
at least 64 MiB, at most 1 GiB more a step, so a `cp` into the mount does not resize per 128 KiB
write); flush and close cut the backing file back to the written size. A crash between the two
leaves the image longer, zeros.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import trio

from ..base import BlockingHandle, ThreadedHandle
from ..threads import in_thread
from .libiscsi import Session
from .settings import BLOCK, round_up

if TYPE_CHECKING:
    from .driver import IscsiDriver

MAX_TRANSFER = 2**20  # bytes per READ16/WRITE16
GROW_MIN = 64 * 2**20
GROW_MAX = 2**30


class BlockHandle(BlockingHandle):
    """Byte access over a session's 512-byte blocks (blocking: runs in worker threads).

    One session per handle, so calls are serialized by a lock; a call stuck on a dead target
    holds it for at most TIMEOUT (libiscsi's own timeout), and a close that cannot get it leaves
    the logout to the holder. A broken session is replaced by a fresh login on the next call.
    """

    def __init__(self, connect: Callable[[], Session], session: Session, writable: bool,
                 timeout: float) -> None:
        self.connect = connect
        self.session: Session | None = session
        self.writable = writable
        self.timeout = timeout
        self.capacity = session.capacity  # what the target has (whole blocks)
        self.size = session.capacity  # what the image holds (bytes): pread stops there
        self.lock = threading.Lock()
        self.closed = False
        self.close_pending = False

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        if not self.lock.acquire(timeout=self.timeout + 2):
            raise OSError(errno.ETIMEDOUT, "iscsi driver: the session is stuck in an earlier call")
        try:
            if self.closed:
                raise OSError(errno.EBADF, "iscsi driver: the handle is closed")
            if self.session is None or self.session.broken:
                if self.session is not None:
                    old, self.session = self.session, None
                    old.close()
                self.session = self.connect()
                self.capacity = self.session.capacity
            yield self.session
        finally:
            if self.close_pending:
                self._close_locked()
            self.lock.release()

    def pread(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "iscsi driver: negative offset or size")
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        with self._session() as s:
            end = min(end, self.capacity)
            if end <= offset:
                return b""
            first = offset // BLOCK * BLOCK
            return self._read(s, first, round_up(end) - first)[offset - first:end - first]

    @staticmethod
    def _read(s: Session, start: int, length: int) -> bytes:
        chunks = []
        for pos in range(start, start + length, MAX_TRANSFER):
            n = min(MAX_TRANSFER, start + length - pos)
            chunks.append(s.read(pos // BLOCK, n))
        return b"".join(chunks)

    def pwrite(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise OSError(errno.EBADF, "iscsi driver: the image is open read-only")
        if offset < 0:
            raise OSError(errno.EINVAL, "iscsi driver: negative offset")
        if not data:
            return 0
        end = offset + len(data)
        with self._session() as s:
            if end > self.capacity:
                raise OSError(errno.EFBIG, f"iscsi driver: write ends at {end}, past the LUN's "
                              f"{self.capacity} bytes (apwrite grows the LUN first)")
            first, last = offset // BLOCK * BLOCK, round_up(end)
            if first != offset or last != end:  # read-modify-write of the partial edge blocks
                buf = bytearray(last - first)
                if first != offset:
                    buf[:BLOCK] = s.read(first // BLOCK, BLOCK)
                if last != end and not (first != offset and last - BLOCK == first):
                    buf[-BLOCK:] = s.read((last - BLOCK) // BLOCK, BLOCK)
                buf[offset - first:end - first] = data
                data_out = bytes(buf)
            else:
                data_out = bytes(data)
            for pos in range(0, len(data_out), MAX_TRANSFER):
                s.write((first + pos) // BLOCK, data_out[pos:pos + MAX_TRANSFER])
        self.size = max(self.size, end)
        return len(data)

    def truncate(self, size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "iscsi driver: a LUN changes size through atruncate (tgtadm)")

    def flush(self) -> None:
        if self.writable:
            with self._session() as s:
                s.sync()

    def refresh(self) -> int:
        """READ CAPACITY again (after the target resized the LUN)."""
        with self._session() as s:
            self.capacity = s.read_capacity()
        return self.capacity

    def close(self) -> None:
        if not self.lock.acquire(timeout=self.timeout + 2):
            self.close_pending = True  # the thread stuck in a call logs out when it returns
            return
        try:
            self._close_locked()
        finally:
            self.lock.release()

    def _close_locked(self) -> None:
        self.closed = True
        self.close_pending = False
        if self.session is not None:
            session, self.session = self.session, None
            session.close()


class IscsiHandle(ThreadedHandle):
    """An open image: a `BlockHandle` in abandonable worker threads, plus LUN size changes.

    Writing past the LUN's end grows the LUN first (tgtadm on the trio side), while the recorded
    image size stays what was last made durable; flush and close record the size written and cut
    the backing file back to it. One call at a time per handle (one session).
    """

    def __init__(self, inner: BlockHandle, driver: IscsiDriver, key: str, size: int) -> None:
        super().__init__(inner, driver.limiter)
        self.block = inner
        self.driver = driver
        self.key = key
        self.serial = trio.Lock()
        self.recorded = size  # the image size the backend holds
        inner.size = size

    async def apread(self, offset: int, size: int) -> bytes:
        async with self.serial:
            return await in_thread(self.limiter, self.block.pread, offset, size)

    async def apwrite(self, offset: int, data: bytes) -> int:
        async with self.serial:
            end = offset + len(data)
            if self.block.writable and end > self.block.capacity:
                cap = self.block.capacity
                grown = max(round_up(end), min(2 * cap, cap + GROW_MAX), cap + GROW_MIN)
                path = self.driver.s.path(self.key)
                await self.driver.files.grow(path, grown, self.recorded)
                await self.driver.targets.resize_lun(self.key, path, grown)
                await in_thread(self.limiter, self.block.refresh)
            return await in_thread(self.limiter, self.block.pwrite, offset, data)

    async def atruncate(self, size: int) -> None:
        if not self.block.writable:
            raise OSError(errno.EBADF, "iscsi driver: the image is open read-only")
        async with self.serial:
            await self._record(size)
            self.block.size = size

    async def _record(self, size: int) -> None:
        lun = round_up(size) != self.block.capacity
        await self.driver._set_size(self.key, size, lun=lun)
        self.recorded = size
        if lun:
            await in_thread(self.limiter, self.block.refresh)

    async def _settle(self) -> None:
        """Record the size written; cut a grown backing file back to it."""
        if self.block.writable and (self.block.size != self.recorded
                                    or self.block.capacity != round_up(self.block.size)):
            await self._record(self.block.size)

    async def aflush(self) -> None:
        async with self.serial:
            await in_thread(self.limiter, self.block.flush)
            await self._settle()

    async def aclose(self) -> None:
        async with self.serial:
            try:
                if not self.block.closed:
                    await self._settle()
            finally:
                await in_thread(self.limiter, self.block.close)
