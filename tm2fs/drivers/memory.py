"""`memory`: images in this process's memory, for tests and demos. Every byte is lost at exit.

Why: the core's rules for slow, failing and full backends (TIMEOUT turns a backend ERROR, EIO too,
ENOSPC answers "full") must be testable in milliseconds without stopping real servers, and a demo
wants a backend with nothing to set up.

TM_RAW: CAPACITY (bytes, or 512M, 10G...; default 1G) is the most the images may hold: a write
that needs more fails with ENOSPC, as a full thin pool does. NAME (default: the backend's name
and a random suffix) names the pool the images live in; drivers made with one NAME share it, as
two hosts share a storage server, so images outlive a driver (a TM_RAW update makes a new one).

How: an image is a size and a dict of 64 KiB blocks (immutable bytes; a missing block is a hole),
so images are thin and a clone copies only the dict: clone and source share blocks until either
writes (cheap_clone). USED counts distinct blocks. Calls run inline on the trio thread and are
durable at once; there is no local_path.

Faults, settable at run time from a test: `inject(NAME, kind, calls=...)` makes the named calls
of that pool (driver methods `start`, `monitor`, `allocate`, `delete`, `keys`, `open`, `size`,
`resize`, `clone`, `stop`; handle calls `read`, `write`, `truncate`, `flush`, `close`; all when
None) misbehave until `heal(NAME)`, or for the next `times` calls: "hang" awaits forever (so the
core's TIMEOUT applies), "eio" and "enospc" raise that OSError, "slow" sleeps `seconds` first.
"""

from __future__ import annotations

import errno
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trio

from ..errors import InvalidArgument
from ..sizes import parse_size
from .base import Capacity, Driver, Handle, Progress, check_key

BLOCK = 64 * 2**10
DEFAULT_CAPACITY = 2**30
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
FaultKind = Literal["hang", "eio", "enospc", "slow"]
ERRNO = {"eio": errno.EIO, "enospc": errno.ENOSPC}
CALLS = frozenset({"start", "stop", "monitor", "allocate", "delete", "keys", "open", "size", "resize",
                   "clone", "read", "write", "truncate", "flush", "close"})


@dataclass
class Fault:
    kind: FaultKind
    calls: frozenset[str] | None = None  # None: every call
    seconds: float = 0.0  # for "slow"
    times: int | None = None  # None: until healed


class Image:
    __slots__ = ("blocks", "deleted", "size")

    def __init__(self, size: int, blocks: dict[int, bytes] | None = None) -> None:
        self.size = size
        self.blocks = blocks or {}
        self.deleted = False


class Pool:
    """One NAME's images, capacity and faults. Blocks are shared by clones: `refs` counts, by
    object id, the images holding each block (an id stays valid while some image holds it)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.images: dict[str, Image] = {}
        self.refs: dict[int, int] = {}
        self.used = 0
        self.faults: list[Fault] = []

    def hold(self, block: bytes) -> None:
        n = self.refs.get(id(block), 0)
        self.refs[id(block)] = n + 1
        if n == 0:
            self.used += BLOCK

    def release(self, block: bytes) -> None:
        n = self.refs[id(block)] - 1
        if n:
            self.refs[id(block)] = n
        else:
            del self.refs[id(block)]
            self.used -= BLOCK

    def make_room(self, image: Image, indices: Iterable[int]) -> None:
        """ENOSPC unless rewriting these blocks of `image` fits (new blocks, or own copies of
        shared ones, need space; blocks only this image holds are rewritten in place)."""
        need = 0
        for i in indices:
            block = image.blocks.get(i)
            if block is None or self.refs[id(block)] > 1:
                need += BLOCK
        if need and self.used + need > self.capacity:
            raise OSError(errno.ENOSPC, f"memory driver: the pool is full ({self.capacity} bytes)")

    def put(self, image: Image, i: int, block: bytes) -> None:
        old = image.blocks.get(i)
        image.blocks[i] = block
        self.hold(block)
        if old is not None:
            self.release(old)

    def drop(self, image: Image, keep: int = 0) -> None:
        """Release the image's blocks from index `keep` on."""
        for i in [i for i in image.blocks if i >= keep]:
            self.release(image.blocks.pop(i))

    def read(self, image: Image, offset: int, size: int) -> bytes:
        end = min(offset + size, image.size)
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "memory driver: negative offset or size")
        out = bytearray()
        pos = offset
        while pos < end:
            i, within = divmod(pos, BLOCK)
            n = min(BLOCK - within, end - pos)
            block = image.blocks.get(i)
            out += block[within:within + n] if block is not None else bytes(n)
            pos += n
        return bytes(out)

    def write(self, image: Image, offset: int, data: bytes) -> int:
        if offset < 0:
            raise OSError(errno.EINVAL, "memory driver: negative offset")
        if not data:
            return 0
        end = offset + len(data)
        first, last = offset // BLOCK, (end - 1) // BLOCK
        self.make_room(image, range(first, last + 1))
        for i in range(first, last + 1):
            start = i * BLOCK
            lo, hi = max(offset, start), min(end, start + BLOCK)
            old = image.blocks.get(i)
            if lo == start and hi == start + BLOCK:
                block = bytes(data[lo - offset:hi - offset])
            else:
                buf = bytearray(old) if old is not None else bytearray(BLOCK)
                buf[lo - start:hi - start] = data[lo - offset:hi - offset]
                block = bytes(buf)
            self.put(image, i, block)
        image.size = max(image.size, end)
        return len(data)

    def truncate(self, image: Image, size: int) -> None:
        """New size; the bytes cut read as zeros if the image grows again."""
        if size < 0:
            raise OSError(errno.EINVAL, "memory driver: negative size")
        if size < image.size:
            i, within = divmod(size, BLOCK)
            if within and i in image.blocks:
                self.make_room(image, [i])
                self.put(image, i, image.blocks[i][:within] + bytes(BLOCK - within))
            self.drop(image, -(-size // BLOCK))
        image.size = size


_pools: dict[str, Pool] = {}


def pool(name: str) -> Pool:
    """The pool named `name`, made empty (with the default capacity) on first use."""
    return _pools.setdefault(name, Pool(DEFAULT_CAPACITY))


def _name_of(target: str | MemoryDriver) -> str:
    return target.pool_name if isinstance(target, MemoryDriver) else target


def inject(target: str | MemoryDriver, kind: FaultKind, *, calls: Iterable[str] | None = None,
           seconds: float = 0.0, times: int | None = None) -> Fault:
    """Make calls of a pool (by NAME, or a driver's) misbehave from now on; returns the fault."""
    if kind not in ("hang", "eio", "enospc", "slow"):
        raise ValueError(f"unknown fault {kind!r}")
    chosen = None if calls is None else frozenset(calls)
    if chosen is not None and chosen - CALLS:
        raise ValueError(f"unknown call(s) {sorted(chosen - CALLS)}; known: {sorted(CALLS)}")
    fault = Fault(kind, chosen, seconds, times)
    pool(_name_of(target)).faults.append(fault)
    return fault


def heal(target: str | MemoryDriver, fault: Fault | None = None) -> None:
    """Remove one fault, or every fault, of a pool."""
    faults = pool(_name_of(target)).faults
    if fault is None:
        faults.clear()
    elif fault in faults:
        faults.remove(fault)


async def _misbehave(p: Pool, call: str) -> None:
    for fault in list(p.faults):
        if fault.calls is not None and call not in fault.calls:
            continue
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                p.faults.remove(fault)
        if fault.kind == "slow":
            await trio.sleep(fault.seconds)
        elif fault.kind == "hang":
            await trio.sleep_forever()
        else:
            raise OSError(ERRNO[fault.kind], f"memory driver: {call}: injected {fault.kind.upper()}")


class MemoryHandle:
    """An open image of a memory pool: every call inline, durable at once."""

    __slots__ = ("closed", "image", "key", "pool", "writable")

    def __init__(self, p: Pool, key: str, image: Image, writable: bool) -> None:
        self.pool = p
        self.key = key
        self.image = image
        self.writable = writable
        self.closed = False

    def _check(self, write: bool = False) -> Image:
        if self.closed:
            raise OSError(errno.EBADF, f"memory driver: {self.key} is closed")
        if self.image.deleted:
            raise OSError(errno.ESTALE, f"memory driver: {self.key} was deleted")
        if write and not self.writable:
            raise OSError(errno.EBADF, f"memory driver: {self.key} is open read-only")
        return self.image

    async def apread(self, offset: int, size: int) -> bytes:
        await _misbehave(self.pool, "read")
        return self.pool.read(self._check(), offset, size)

    async def apwrite(self, offset: int, data: bytes) -> int:
        await _misbehave(self.pool, "write")
        return self.pool.write(self._check(write=True), offset, data)

    async def atruncate(self, size: int) -> None:
        await _misbehave(self.pool, "truncate")
        self.pool.truncate(self._check(write=True), size)

    async def aflush(self) -> None:
        await _misbehave(self.pool, "flush")
        self._check()

    async def aclose(self) -> None:
        await _misbehave(self.pool, "close")
        self.close()

    def close(self) -> None:
        self.closed = True


class MemoryDriver(Driver):
    name = "memory"
    cheap_clone = True

    def __init__(self, tm_raw: dict[str, Any], state_dir: Path) -> None:
        super().__init__(tm_raw, state_dir)
        self.pool_name = str(tm_raw["NAME"])
        self.pool = pool(self.pool_name)
        self.pool.capacity = int(tm_raw["CAPACITY"])

    @classmethod
    def validate(cls, tm_raw: dict[str, Any], state_dir: Path, backend_name: str) -> dict[str, Any]:
        raw = {str(k).upper(): v for k, v in tm_raw.items()}
        unknown = set(raw) - {"CAPACITY", "NAME"}
        if unknown:
            raise InvalidArgument(f"memory driver: unknown TM_RAW attribute(s) {', '.join(sorted(unknown))}",
                                  "the memory driver takes CAPACITY=size and NAME=pool")
        capacity = parse_size(raw.get("CAPACITY", DEFAULT_CAPACITY))
        if capacity <= 0:
            raise InvalidArgument("memory driver: CAPACITY must be positive", "e.g. CAPACITY=1G")
        name = str(raw.get("NAME") or f"{backend_name}-{secrets.token_hex(4)}")
        if not NAME_RE.fullmatch(name):
            raise InvalidArgument(f"memory driver: NAME {name!r} is not a plain name",
                                  "letters, digits, and . _ - after the first")
        return {"CAPACITY": str(capacity), "NAME": name}

    def _image(self, key: str) -> Image:
        image = self.pool.images.get(check_key(key, "memory"))
        if image is None:
            raise FileNotFoundError(errno.ENOENT, f"memory driver: no image {key}")
        return image

    async def start(self) -> None:
        await _misbehave(self.pool, "start")

    async def stop(self) -> None:
        await _misbehave(self.pool, "stop")

    async def monitor(self) -> Capacity:
        await _misbehave(self.pool, "monitor")
        p = self.pool
        return Capacity(total=p.capacity, free=max(0, p.capacity - p.used), used=p.used)

    async def allocate(self, key: str, size: int) -> None:
        await _misbehave(self.pool, "allocate")
        if check_key(key, "memory") in self.pool.images:
            raise FileExistsError(errno.EEXIST, f"memory driver: {key} exists")
        if size < 0:
            raise OSError(errno.EINVAL, "memory driver: negative size")
        self.pool.images[key] = Image(size)

    async def delete(self, key: str) -> None:
        await _misbehave(self.pool, "delete")
        image = self.pool.images.pop(check_key(key, "memory"), None)
        if image is not None:
            image.deleted = True
            self.pool.drop(image)

    async def keys(self) -> list[str]:
        await _misbehave(self.pool, "keys")
        return sorted(self.pool.images)

    async def open(self, key: str, writable: bool) -> Handle:
        await _misbehave(self.pool, "open")
        return MemoryHandle(self.pool, key, self._image(key), writable)

    async def size(self, key: str) -> int:
        await _misbehave(self.pool, "size")
        return self._image(key).size

    async def allocated(self, key: str) -> int:
        return len(self._image(key).blocks) * BLOCK

    async def resize(self, key: str, size: int) -> None:
        await _misbehave(self.pool, "resize")
        self.pool.truncate(self._image(key), size)

    async def clone(self, src_key: str, dst_key: str, progress: Progress | None = None) -> None:
        """Shares every block with the source: no bytes move, so progress is never called."""
        await _misbehave(self.pool, "clone")
        src = self._image(src_key)
        if check_key(dst_key, "memory") in self.pool.images:
            raise FileExistsError(errno.EEXIST, f"memory driver: {dst_key} exists")
        copy = Image(src.size, dict(src.blocks))
        for block in copy.blocks.values():
            self.pool.hold(block)
        self.pool.images[dst_key] = copy
