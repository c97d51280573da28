"""Whole-image streams (get, read, push, write, copies across backends) through the data path.

STREAM_DEPTH chunks are in flight at once, so a driver with asynchronous I/O (rbd) overlaps them
instead of making one round trip per chunk; the batch is the bounded queue (at most STREAM_DEPTH x
COPY_CHUNK bytes held). All-zero chunks are not written, so thin images stay thin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import trio

from ..drivers.base import Progress
from ..errors import Tm2Error

if TYPE_CHECKING:
    from .openfiles import OpenFile

COPY_CHUNK = 4 * 2**20
STREAM_DEPTH = 4


class DataPath(Protocol):
    async def read(self, of: OpenFile, offset: int, size: int) -> bytes: ...

    async def write(self, of: OpenFile, offset: int, data: bytes) -> int: ...


async def _together(calls: list[Callable[[], Awaitable[None]]]) -> None:
    """Run calls at once; a failure surfaces as itself (not as a group), so a full backend is
    still a NoSpace (507) and not an internal error."""
    try:
        async with trio.open_nursery() as nursery:
            for call in calls:
                nursery.start_soon(call)
    except BaseExceptionGroup as group:
        leaves = group.subgroup(lambda e: not isinstance(e, BaseExceptionGroup))
        first = _first_leaf(group)
        if isinstance(first, Tm2Error) or (leaves is not None and len(leaves.exceptions) == 1):
            raise first from None
        raise


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        errors: list[BaseException] = [x for x in e.exceptions if isinstance(x, Tm2Error)]
        errors = errors or list(e.exceptions)
        e = errors[0]
    return e


async def read_chunks(data: DataPath, of: OpenFile, offset: int, size: int) -> list[bytes]:
    """Up to STREAM_DEPTH chunks from `offset`, read at once."""
    stop = min(offset + size, of.image.size)
    starts = range(offset, stop, COPY_CHUNK)[:STREAM_DEPTH]
    out = [b""] * len(starts)

    def one(i: int, start: int) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            out[i] = await data.read(of, start, min(COPY_CHUNK, stop - start))
        return call

    await _together([one(i, s) for i, s in enumerate(starts)])
    return out


async def write_chunks(data: DataPath, of: OpenFile, offset: int, chunks: list[bytes]) -> int:
    """Write consecutive chunks at once, skipping all-zero ones; returns the offset after them."""
    calls = []
    for chunk in chunks:
        if chunk and chunk.count(0) != len(chunk):
            calls.append(_writer(data, of, offset, chunk))
        offset += len(chunk)
    await _together(calls)
    return offset


def _writer(data: DataPath, of: OpenFile, offset: int, chunk: bytes) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        await data.write(of, offset, chunk)
    return call


async def copy_data(data: DataPath, src: OpenFile, dst: OpenFile, size: int,
                    progress: Progress | None = None) -> None:
    """Copy through the data path, STREAM_DEPTH chunks in flight, leaving holes for zeros."""
    done = 0
    while done < size:
        chunks = await read_chunks(data, src, done, size - done)
        if not chunks or not chunks[0]:
            break
        done = await write_chunks(data, dst, done, chunks)
        if progress:
            progress(done)
