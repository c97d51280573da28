"""The driver contract: what one kind of backend must do. The methods of `Driver` are the checklist.

Every method is called by the service layer inside a timeout (the backend's TIMEOUT); the service
turns a timeout or an OSError into backend ERROR. Drivers never see names or paths from the
namespace: only opaque keys, so a rename never touches data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import trio

Progress = Callable[[int], None]  # called with bytes done so far


@dataclass(frozen=True)
class Capacity:
    """Backend statistics; None means unknown (as Cinder says 'unknown', not a guess)."""

    total: int | None
    free: int | None
    used: int | None


class Handle:
    """Random access to one image, for the FUSE data path.

    pread/pwrite are plain methods, called inline on the trio thread (short, local calls). A driver
    whose I/O can block for long overrides the `a*` variants with truly asynchronous ones.
    """

    def pread(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, offset: int, data: bytes) -> int:
        raise NotImplementedError

    def truncate(self, size: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far durable on the backend."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def apread(self, offset: int, size: int) -> bytes:
        return self.pread(offset, size)

    async def apwrite(self, offset: int, data: bytes) -> int:
        return self.pwrite(offset, data)

    async def aflush(self) -> None:
        self.flush()

    async def atruncate(self, size: int) -> None:
        self.truncate(size)

    async def aclose(self) -> None:
        self.close()


class ThreadedHandle(Handle):
    """Runs every call of another handle in a worker thread that a timeout can abandon.

    For storage that can hang (a network or FUSE filesystem under a `dir` backend): a thread hop
    per request costs throughput, but a hung call then times out instead of stalling the loop.
    """

    __slots__ = ("inner", "limiter")

    def __init__(self, inner: Handle, limiter: trio.CapacityLimiter) -> None:
        self.inner = inner
        self.limiter = limiter  # the backend's own: its hung threads cannot starve the others

    def pread(self, offset: int, size: int) -> bytes:
        return self.inner.pread(offset, size)

    def pwrite(self, offset: int, data: bytes) -> int:
        return self.inner.pwrite(offset, data)

    def truncate(self, size: int) -> None:
        self.inner.truncate(size)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    async def apread(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(self.inner.pread, offset, size,
                                             abandon_on_cancel=True, limiter=self.limiter)

    async def apwrite(self, offset: int, data: bytes) -> int:
        return await trio.to_thread.run_sync(self.inner.pwrite, offset, data,
                                             abandon_on_cancel=True,
                                             limiter=self.limiter)

    async def aflush(self) -> None:
        await trio.to_thread.run_sync(self.inner.flush, abandon_on_cancel=True,
                                             limiter=self.limiter)

    async def atruncate(self, size: int) -> None:
        await trio.to_thread.run_sync(self.inner.truncate, size, abandon_on_cancel=True,
                                             limiter=self.limiter)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.inner.close, abandon_on_cancel=True,
                                             limiter=self.limiter)


class Driver:
    """One backend's storage. Subclasses set `name` and implement every method."""

    name: ClassVar[str]
    #: True when clone shares blocks (reflink, COW) instead of copying them.
    cheap_clone: ClassVar[bool] = False

    def __init__(self, tm_raw: dict[str, Any], state_dir: Path) -> None:
        self.tm_raw = tm_raw
        self.state_dir = state_dir

    @classmethod
    def validate(cls, tm_raw: dict[str, Any], state_dir: Path, backend_name: str) -> dict[str, Any]:
        """Check and complete TM_RAW before the backend is created; raise InvalidArgument."""
        return dict(tm_raw)

    async def start(self) -> None:
        """Connect / prepare; called before first use and after the backend returns from ERROR."""

    async def stop(self) -> None:
        """Release connections; called at shutdown and when the backend is deleted."""

    async def monitor(self) -> Capacity:
        raise NotImplementedError

    async def allocate(self, key: str, size: int) -> None:
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        raise NotImplementedError

    async def size(self, key: str) -> int:
        raise NotImplementedError

    async def resize(self, key: str, size: int) -> None:
        raise NotImplementedError

    async def clone(self, src_key: str, dst_key: str, progress: Progress | None = None) -> None:
        raise NotImplementedError

    async def open(self, key: str, writable: bool) -> Handle:
        raise NotImplementedError

    async def keys(self) -> list[str] | None:
        """Every key the backend holds, to sweep leftovers after a crash; None if it cannot say."""
        return None

    async def attach(self, key: str, host: str, path: str) -> None:
        """Make the image reachable on `host` (e.g. log in to a target). Local storage: nothing."""

    async def detach(self, key: str, host: str, path: str) -> None:
        """Undo attach."""

    def local_path(self, key: str) -> str | None:
        """A path on this host where the image's bytes are, if there is one (for attach links)."""
        return None


def positive_int(value: Any, what: str) -> int:
    """TM_RAW values arrive as strings from templates."""
    from ..errors import InvalidArgument

    try:
        number = int(str(value))
    except ValueError:
        raise InvalidArgument(f"{what} {value!r} is not a whole number") from None
    if number <= 0:
        raise InvalidArgument(f"{what} must be positive, not {number}")
    return number


def directory_capacity(path: str | os.PathLike) -> Capacity:
    """A directory of image files: its filesystem's size and free space, and the blocks its
    files really hold (thin images count what is written). Blocking: call in a worker thread."""
    st = os.statvfs(path)
    used = 0
    with os.scandir(path) as it:
        for entry in it:
            try:
                if entry.is_file(follow_symlinks=False):
                    used += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:
                continue  # deleted while we looked: not a fault of the backend
    return Capacity(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize, used=used)


def fsync_dir(path: str | os.PathLike) -> None:
    """A new or removed directory entry is durable only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
