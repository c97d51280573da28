"""The driver contract: what one kind of backend must do, split by capability as Cinder and libvirt
split theirs. The methods of the protocols below are the checklist.

- Core, every driver: `Storage` (validate, start/stop, monitor, allocate, delete, keys, open) and
  the `Handle` that open returns.
- Optional: `Sized` (size), `Resizable` (resize), `Cloning` (clone; `cheap_clone` says whether it
  shares blocks), `NativeSource` (local_path: where the bytes are on this host), `HypervisorSource`
  (source: how a hypervisor here reaches the image without tm2fs, for `tm2 source` / attach --native).
- `allocated`: the bytes an image really holds (st_blocks, so `du` and `cp --sparse` see holes);
  None, the default, when the driver cannot say.

A driver subclasses `Driver`. A core method it leaves out makes the class abstract, so it fails
when first instantiated, naming what is missing. An optional capability it leaves out answers
`Unsupported` (local_path: None, "no path here"), so the core can call any driver alike and map
the answer; `supports()` says which capabilities a driver class implements. A driver may still
refuse one per instance (legacy on a remote HOST cannot size images).

The core calls every method under the backend's TIMEOUT; a timeout or an OSError turns the
backend ERROR, except ENOSPC/EDQUOT ("full") and EFBIG ("too big"). Drivers raise OSError for what
the storage says and Tm2Error for the rest (InvalidArgument for a malformed TM_RAW or key). They
see only opaque keys (the core makes 32 hex digits), never names or paths from the namespace, so
a rename never touches data. `tests/test_driver_conformance.py` holds every driver to this.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import trio

from ..errors import InvalidArgument, Unsupported
from .threads import in_thread

Progress = Callable[[int], None]  # called with bytes done so far


@dataclass(frozen=True)
class Capacity:
    """Backend statistics; None means unknown (as Cinder says 'unknown', not a guess)."""

    total: int | None
    free: int | None
    used: int | None
    #: which storage the space is of (a filesystem, a Ceph pool): backends that report the same
    #: count it once in the pool's total (`df` on the mount); None: the backend's own
    storage: str | None = None


# ------------------------------------------------------------------------------ the data path


@runtime_checkable
class Handle(Protocol):
    """An open image: random access for the FUSE data path, every call awaited on the trio thread.

    Reads return the bytes at offset, short at the image's end (empty at or past it); holes and
    bytes cut by a truncate and regrown read as zeros. A write past the end grows the image. After
    aflush every earlier write is durable and `size(key)` tells the new size; after aclose a new
    open sees every write. Calls on one handle may overlap (the kernel sends them so). A handle
    opened read-only refuses writes and truncates with OSError.
    """

    async def apread(self, offset: int, size: int) -> bytes: ...

    async def apwrite(self, offset: int, data: bytes) -> int:
        """Writes all of `data`; returns len(data)."""
        ...

    async def atruncate(self, size: int) -> None: ...

    async def aflush(self) -> None: ...

    async def aclose(self) -> None: ...

    def close(self) -> None:
        """aclose without waiting: for a handle never used (a racing open of the same image won)."""
        ...


class BlockingHandle(Protocol):
    """The blocking calls a handle is built from when its storage has no asynchronous API."""

    def pread(self, offset: int, size: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes) -> int: ...

    def truncate(self, size: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class InlineHandle:
    """A `Handle` from blocking calls short enough to make on the trio thread (page-cache memcpy,
    memory): a thread hop would cost more than the call. Subclasses define the blocking calls;
    the core's data path calls `pread` and `pwrite` directly (no coroutine, no timeout: nothing
    could interrupt them), so they must be all a read or a write does."""

    __slots__ = ()

    pread: Callable[[int, int], bytes]
    pwrite: Callable[[int, bytes], int]
    truncate: Callable[[int], None]
    flush: Callable[[], None]
    close: Callable[[], None]

    async def apread(self, offset: int, size: int) -> bytes:
        return self.pread(offset, size)

    async def apwrite(self, offset: int, data: bytes) -> int:
        return self.pwrite(offset, data)

    async def atruncate(self, size: int) -> None:
        self.truncate(size)

    async def aflush(self) -> None:
        self.flush()

    async def aclose(self) -> None:
        self.close()


class ThreadedHandle:
    """A `Handle` running every blocking call of `inner` in a worker thread a timeout can abandon.

    For storage that can hang (a network or FUSE filesystem under a `dir` backend): a thread hop
    per request costs throughput, but a hung call then times out instead of stalling the loop.
    """

    __slots__ = ("inner", "limiter")

    def __init__(self, inner: BlockingHandle, limiter: trio.CapacityLimiter) -> None:
        self.inner = inner
        self.limiter = limiter  # the backend's own: its hung threads cannot starve the others

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await in_thread(self.limiter, fn, *args)

    async def apread(self, offset: int, size: int) -> bytes:
        return await self._thread(self.inner.pread, offset, size)

    async def apwrite(self, offset: int, data: bytes) -> int:
        return await self._thread(self.inner.pwrite, offset, data)

    async def atruncate(self, size: int) -> None:
        await self._thread(self.inner.truncate, size)

    async def aflush(self) -> None:
        await self._thread(self.inner.flush)

    async def aclose(self) -> None:
        await self._thread(self.inner.close)

    def close(self) -> None:
        self.inner.close()


# ------------------------------------------------------------------------------ the driver


class Storage(Protocol):
    """Core storage: every driver does all of this."""

    name: ClassVar[str]  # the TM name it is registered under
    tm_raw: dict[str, Any]  # as validate returned it; the core makes a new driver when it changes

    @classmethod
    @abstractmethod
    def validate(cls, tm_raw: dict[str, Any], state_dir: Path, backend_name: str) -> dict[str, Any]:
        """Check and complete TM_RAW before the backend is created or updated (static checks:
        start connects); raise InvalidArgument with a hint."""

    #: the sweep after a crash deletes in `storage_dir` only what a marker file there proves
    #: is this backend's (core/ownership.py)
    marked: ClassVar[bool] = False

    @classmethod
    def storage_dir(cls, tm_raw: dict[str, Any], host: str) -> str | None:
        """The directory on this host (named `host`) that holds the backend's data, if there is
        one, from TM_RAW as validate returns it (upper-case keys): the core keeps backends'
        directories apart. No syscalls. Default: none."""
        return None

    async def start(self) -> None:
        """Connect / prepare; called before first use and after the backend was in ERROR.
        Called again on a started driver, it changes nothing. Default: nothing to do."""

    async def stop(self) -> None:
        """Release connections; called at shutdown and when the backend is deleted."""

    @abstractmethod
    async def monitor(self) -> Capacity:
        """Total, free and used bytes; raises when the storage does not answer (backend ERROR)."""

    @abstractmethod
    async def allocate(self, key: str, size: int) -> None:
        """A new image of `size` bytes reading as zeros, thin where the storage can; EEXIST
        (leaving the old image as it was) when `key` exists."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the image; deleting a key that is gone is not an error."""

    @abstractmethod
    async def keys(self) -> list[str] | None:
        """Every key the backend holds, to sweep leftovers after a crash; None if it cannot say."""

    @abstractmethod
    async def open(self, key: str, writable: bool) -> Handle:
        """The image for random access; raises when `key` does not exist."""


class Sized(Protocol):
    async def size(self, key: str) -> int:
        """The image's size in bytes, as last made durable; ENOENT when `key` does not exist."""
        ...


class Resizable(Protocol):
    async def resize(self, key: str, size: int) -> None:
        """Grow or shrink a closed image; what a shrink cut reads as zeros when grown again."""
        ...


class Cloning(Protocol):
    #: True when clone shares blocks (reflink, COW) instead of copying them.
    cheap_clone: ClassVar[bool]

    async def clone(self, src_key: str, dst_key: str, progress: Progress | None = None) -> None:
        """A new image `dst_key` with `src_key`'s bytes, independent of it from then on (writes
        to either, or deleting the source, leave the other as it was); EEXIST when `dst_key`
        exists. `progress`, if called, gets bytes done so far (never more than the size)."""
        ...


class NativeSource(Protocol):
    def local_path(self, key: str) -> str | None:
        """A path on this host where the image's bytes are, if there is one (for attach links)."""
        ...


class HypervisorSource(Protocol):
    def source(self, key: str) -> dict[str, Any] | None:
        """How a hypervisor on this host reaches the image natively, with no tm2fs in the data
        path; None: through the mount only. One of {"type": "file", "path"}, {"type": "rbd",
        "pool", "namespace", "image", "monitors": [{"host", "port"}], "client_id", "keyring",
        "conf"} or {"type": "iscsi", "portal", "host", "port", "iqn", "lun", "initiator", "chap"}
        (core/native.py renders them for qemu and libvirt). No I/O: it runs on the trio thread."""
        ...


class Driver(Storage, Sized, Resizable, Cloning, NativeSource, HypervisorSource):
    """What a driver subclasses: the core as abstract methods, every optional capability refused."""

    cheap_clone: ClassVar[bool] = False

    def __init__(self, tm_raw: dict[str, Any], state_dir: Path) -> None:
        self.tm_raw = tm_raw
        self.state_dir = state_dir

    def _unsupported(self, what: str) -> Unsupported:
        return Unsupported(f"{self.name} driver: {what} is not supported",
                           "the backend's driver does not implement it")

    async def size(self, key: str) -> int:
        raise self._unsupported("size")

    async def resize(self, key: str, size: int) -> None:
        raise self._unsupported("resize")

    async def clone(self, src_key: str, dst_key: str, progress: Progress | None = None) -> None:
        raise self._unsupported("clone")

    def local_path(self, key: str) -> str | None:
        return None

    async def allocated(self, key: str) -> int | None:
        """Bytes the storage holds for the image (holes not counted), None if it cannot say. The
        core keeps the figure in memory and refreshes it off the data path (core/allocation.py);
        it is a hint, so a driver may answer at its own granularity (whole RBD objects)."""
        return None

    def source(self, key: str) -> dict[str, Any] | None:
        return None


OPTIONAL: tuple[type, ...] = (Sized, Resizable, Cloning, NativeSource, HypervisorSource)


def supports(driver: Driver | type[Driver], capability: type) -> bool:
    """Whether a driver class implements an optional capability itself instead of inheriting
    Driver's refusal (the core ones every driver has)."""
    if capability not in OPTIONAL:
        raise ValueError(f"{capability.__name__} is not an optional capability")
    cls = driver if isinstance(driver, type) else type(driver)
    names = [n for n, v in vars(capability).items() if callable(v) and not n.startswith("_")]
    return all(getattr(cls, n) is not getattr(Driver, n) for n in names)


# ------------------------------------------------------------------------------ helpers


def check_key(key: str, driver: str) -> str:
    """The least every driver refuses: a key is one plain name (never empty, `.`, `..`, a path,
    or a name with NUL or newline), so no key reaches outside the backend's own storage."""
    if (not key or key in (".", "..") or len(key) > 255
            or any(c in key for c in "/\0\n")):
        raise InvalidArgument(f"{driver} driver: invalid image key {key!r}")
    return key


def positive_int(value: Any, what: str) -> int:
    """TM_RAW values arrive as strings from templates."""
    try:
        number = int(str(value))
    except ValueError:
        raise InvalidArgument(f"{what} {value!r} is not a whole number") from None
    if number <= 0:
        raise InvalidArgument(f"{what} must be positive, not {number}")
    return number


def directory_capacity(path: str | os.PathLike[str]) -> Capacity:
    """A directory of image files: its filesystem's size and free space, and the blocks its
    files really hold (thin images count what is written). Blocking: call in a worker thread."""
    st = os.statvfs(path)
    device = os.stat(path).st_dev
    used = 0
    with os.scandir(path) as it:
        for entry in it:
            try:
                if entry.is_file(follow_symlinks=False):
                    used += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:
                continue  # deleted while we looked: not a fault of the backend
    return Capacity(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize, used=used,
                    storage=f"dev:{device}")


def fsync_dir(path: str | os.PathLike) -> None:
    """A new or removed directory entry is durable only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
