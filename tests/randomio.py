"""Seeded random I/O on one image against a bytearray model: through the mount (`random_io`, a file
path) or straight through a driver's handle (`random_io_handle`). Both run the same steps.

The same seed gives the same steps on every run; a failure names the seed and step to replay.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MiB = 2**20


def plan(seed: int, count: int, limit: int) -> Iterator[tuple[str, str, tuple[Any, ...]]]:
    """(where, op, args): write (offset, data), read (offset, size), truncate (size), fsync, reopen."""
    rng = random.Random(seed)
    for step in range(count):
        op = rng.choices(["write", "read", "truncate", "fsync", "reopen"], [40, 35, 10, 8, 7])[0]
        if op == "write":
            args: tuple[Any, ...] = (rng.randrange(0, limit), rng.randbytes(rng.randrange(1, 300_000)))
        elif op == "read":
            args = (rng.randrange(0, limit), rng.randrange(1, 400_000))
        elif op == "truncate":
            args = (rng.randrange(0, limit),)
        else:
            args = ()
        yield f"seed {seed}, step {step}: {op}", op, args


class Model(bytearray):
    """What the image must hold: POSIX semantics (writes past the end fill the gap with zeros)."""

    def write(self, offset: int, data: bytes) -> None:
        if offset > len(self):
            self.extend(bytes(offset - len(self)))
        self[offset:offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self[offset:offset + size])

    def truncate(self, size: int) -> None:
        del self[size:]
        self.extend(bytes(size - len(self)))


def random_io(path: Path, seed: int, steps: int = 200, limit: int = 4 * MiB) -> bytes:
    """Writes, reads, truncates, fsyncs and reopens a new file at `path`, checking every read and
    the size after every step; returns the final bytes (fsync'd), the file left in place."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    model = Model()
    try:
        for where, op, args in plan(seed, steps, limit):
            if op == "write":
                assert os.pwrite(fd, args[1], args[0]) == len(args[1]), where
                model.write(*args)
            elif op == "read":
                assert os.pread(fd, args[1], args[0]) == model.read(*args), where
            elif op == "truncate":
                os.ftruncate(fd, args[0])
                model.truncate(args[0])
            elif op == "fsync":
                os.fsync(fd)
            else:
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
            assert os.fstat(fd).st_size == len(model), where
        os.fsync(fd)
        assert os.pread(fd, len(model) + 1, 0) == bytes(model), f"seed {seed}: final contents"
    finally:
        os.close(fd)
    return bytes(model)


async def random_io_handle(driver: Any, key: str, seed: int, steps: int = 200,
                           limit: int = 4 * MiB) -> bytes:
    """The same steps on a new, empty image `key` through the driver's handles (fsync is aflush,
    reopen is aclose + open), checking every read and, after each aflush and reopen, the size
    if the driver can tell it; returns the final bytes, flushed and closed, the image kept."""
    from tm2fs.drivers.base import Sized, supports

    sized = supports(driver, Sized)
    await driver.allocate(key, 0)
    handle = await driver.open(key, writable=True)
    model = Model()
    try:
        for where, op, args in plan(seed, steps, limit):
            if op == "write":
                assert await handle.apwrite(args[0], args[1]) == len(args[1]), where
                model.write(*args)
            elif op == "read":
                assert await handle.apread(*args) == model.read(*args), where
            elif op == "truncate":
                await handle.atruncate(args[0])
                model.truncate(args[0])
            elif op == "fsync":
                await handle.aflush()
            else:
                await handle.aclose()
                handle = await driver.open(key, writable=True)
            if sized and op in ("fsync", "reopen"):
                assert await driver.size(key) == len(model), where
        await handle.aflush()
        assert await handle.apread(0, len(model) + 1) == bytes(model), f"seed {seed}: final contents"
    finally:
        await handle.aclose()
    return bytes(model)
