"""An open RBD image, and how a librbd aio completion wakes the trio task that waits for it.

The data path (`apread`, `apwrite`, `aflush`) uses librbd's asynchronous calls: the completion
callback runs on a librbd thread and hands its outcome to the trio thread through the loop's
TrioToken (`run_sync_soon` + `reschedule`), so a request costs no thread hop. What librbd only
offers blocking (growing the image, closing it) runs in a worker thread on the driver's limiter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import outcome
import trio

from ..base import Handle
from ..threads import in_thread
from .ceph import T, call


async def wait_aio(start: Callable[[Callable[..., None]], object], what: str, keep: object = None) -> Any:
    """Start one librbd aio call and sleep until its completion fires; returns its result.

    `start(callback)` issues the call. The callback runs on a librbd thread; it hands the
    outcome to the trio thread with the loop's TrioToken, which reschedules the waiting task.
    If the task is cancelled meanwhile (a timeout), the late completion is dropped; the callback
    keeps `keep` (a write's buffer) alive until librbd is done with it."""
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    waiting = True

    def wake(result: outcome.Outcome) -> None:  # on the trio thread
        if waiting:
            trio.lowlevel.reschedule(task, result)

    def on_complete(completion: Any, *data: Any, _keep: object = keep) -> None:  # on a librbd thread
        ret = completion.get_return_value()
        if ret < 0:
            result: outcome.Outcome = outcome.Error(OSError(-ret, f"{what}: {os.strerror(-ret)}"))
        else:
            result = outcome.Value(data[0] if data else ret)
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(wake, result)

    call(what, start, on_complete)

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal waiting
        waiting = False
        return trio.lowlevel.Abort.SUCCEEDED

    return await trio.lowlevel.wait_task_rescheduled(abort)


class RbdHandle(Handle):
    """Random access to one open RBD image. The a* methods are librbd aio, woken through trio."""

    __slots__ = ("_grow", "image", "key", "limiter", "size")

    def __init__(self, image: Any, key: str, size: int, limiter: trio.CapacityLimiter) -> None:
        self.image = image
        self.key = key
        self.size = size  # this handle's view; only writes and truncates through it change it
        self.limiter = limiter
        self._grow = trio.Lock()

    # blocking variants: only ever used off the trio thread

    def pread(self, offset: int, size: int) -> bytes:
        length = min(size, self.size - offset)
        if length <= 0:
            return b""
        return call(f"read {self.key}", self.image.read, offset, length)

    def pwrite(self, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if end > self.size:
            self.truncate(end)
        call(f"write {self.key}", self.image.write, bytes(data), offset)
        return len(data)

    def truncate(self, size: int) -> None:
        call(f"resize {self.key}", self.image.resize, size)
        self.size = size

    def flush(self) -> None:
        call(f"flush {self.key}", self.image.flush)

    def close(self) -> None:
        call(f"close {self.key}", self.image.close)

    # the data path on the trio thread

    async def apread(self, offset: int, size: int) -> bytes:
        length = min(size, self.size - offset)
        if length <= 0:
            return b""
        image = self.image
        return await wait_aio(lambda cb: image.aio_read(offset, length, cb), f"read {self.key}")

    async def apwrite(self, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if end > self.size:
            async with self._grow:
                if end > self.size:
                    await self._thread(self.truncate, end)
        buf = data if type(data) is bytes else bytes(data)
        image = self.image
        await wait_aio(lambda cb: image.aio_write(buf, offset, cb), f"write {self.key}", keep=buf)
        return len(buf)

    async def aflush(self) -> None:
        image = self.image
        await wait_aio(image.aio_flush, f"flush {self.key}")

    async def atruncate(self, size: int) -> None:
        async with self._grow:
            await self._thread(self.truncate, size)

    async def aclose(self) -> None:
        await self._thread(self.close)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await in_thread(self.limiter, fn, *args)
