"""Seeded random I/O on one file against a bytearray model, for any backend behind the mount.

The same seed gives the same steps on every run; a failure names the seed and step to replay.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

MiB = 2**20


def random_io(path: Path, seed: int, steps: int = 200, limit: int = 4 * MiB) -> bytes:
    """Writes, reads, truncates, fsyncs and reopens a new file at `path`, checking every read and
    the size after every step; returns the final bytes (fsync'd), the file left in place."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    model = bytearray()
    try:
        for step in range(steps):
            op = rng.choices(["write", "read", "truncate", "fsync", "reopen"], [40, 35, 10, 8, 7])[0]
            where = f"seed {seed}, step {step}: {op}"
            if op == "write":
                offset, data = rng.randrange(0, limit), rng.randbytes(rng.randrange(1, 300_000))
                assert os.pwrite(fd, data, offset) == len(data), where
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset:offset + len(data)] = data
            elif op == "read":
                offset, size = rng.randrange(0, limit), rng.randrange(1, 400_000)
                assert os.pread(fd, size, offset) == bytes(model[offset:offset + size]), where
            elif op == "truncate":
                size = rng.randrange(0, limit)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
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
