"""Data integrity through the kernel: random I/O against a model, and fsync'd data across kill -9.

Both run on the real daemon (tests/daemon.py). The random I/O is a seeded loop: the same seeds
give the same 300 steps on every run, and a failure names the seed and step to replay.
(tests/test_mount.py adds a hypothesis state machine and fio's own verification.)
"""

from __future__ import annotations

import ast
import contextlib
import errno
import os
import random
import re
from pathlib import Path

import pytest
import trio

from tests.daemon import Daemon, is_mounted, service_on
from tm2fs.core import ROOT

pytestmark = pytest.mark.mount
MiB = 2**20
LIMIT = 4 * MiB
STEPS = 300


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    with Daemon(tmp_path_factory.mktemp("integrity")) as t:
        yield t


async def stored_info(tree: Daemon, address: str) -> dict:
    """What the pool store says, read by a separate service on the same database."""
    async with service_on(tree.db_url, tree.state_dir) as service:
        return await service.image_info(address, ROOT)


def image_info(tree: Daemon, address: str) -> dict:
    return trio.run(stored_info, tree, address)


def backing_file(tree: Daemon, info: dict) -> Path:
    return tree.state_dir / "backends" / "local" / info["KEY"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_io_matches_a_model(tree: Daemon, seed: int) -> None:
    rng = random.Random(seed)
    path = tree.mnt / "local" / f"model-{seed}.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    model = bytearray()
    counts = dict.fromkeys(("write", "read", "truncate", "fsync", "reopen"), 0)
    try:
        for step in range(STEPS):
            op = rng.choices(list(counts), weights=[40, 35, 10, 8, 7])[0]
            counts[op] += 1
            where = f"seed {seed}, step {step}: {op}"
            if op == "write":
                offset = rng.randrange(0, LIMIT)
                data = rng.randbytes(rng.choice([1, 7, 4096, rng.randrange(1, 300_000)]))
                assert os.pwrite(fd, data, offset) == len(data), where
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset:offset + len(data)] = data
            elif op == "read":
                offset = rng.randrange(0, LIMIT + 4096)
                size = rng.choice([1, 4096, rng.randrange(1, 500_000)])
                got = os.pread(fd, size, offset)
                assert got == bytes(model[offset:offset + size]), where
            elif op == "truncate":
                size = rng.randrange(0, LIMIT)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
            elif op == "fsync":
                os.fsync(fd)
                info = image_info(tree, f"local:{path.name}")
                assert info["SIZE"] == len(model), where  # fsync committed the size
            else:
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
            assert os.fstat(fd).st_size == len(model), where
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
        whole = b""
        while chunk := os.read(fd, 1 << 20):
            whole += chunk
        assert whole == bytes(model)
    finally:
        os.close(fd)
    assert min(counts.values()) > 0, counts  # every kind of step ran
    info = image_info(tree, f"local:{path.name}")
    assert info["SIZE"] == len(model)
    assert backing_file(tree, info).read_bytes() == bytes(model)  # the bytes the backend holds
    os.unlink(path)
    assert not backing_file(tree, info).exists()


def test_reads_and_writes_across_block_edges(tree: Daemon) -> None:
    """Small, odd-sized I/O around page and 128 KiB boundaries, and reads that end past EOF."""
    path = tree.mnt / "local" / "edges.img"
    model = bytearray()
    with open(path, "w+b", buffering=0) as f:
        for offset in (0, 4095, 4096, 131071, 131072, 262143, 1):
            data = bytes([offset % 251 + 1]) * 3
            os.pwrite(f.fileno(), data, offset)
            model.extend(bytes(max(0, offset + 3 - len(model))))
            model[offset:offset + 3] = data
        for offset in (0, 4094, 131070, 262142, 262145, 10**7):
            assert os.pread(f.fileno(), 8192, offset) == bytes(model[offset:offset + 8192])
    assert path.stat().st_size == 262146
    path.unlink()


@pytest.mark.slow
async def test_fsynced_data_survives_kill9(tmp_path: Path) -> None:
    tree = Daemon(tmp_path).start()
    try:
        synced = random.Random(7).randbytes(3 * MiB + 123)
        tail = b"written, never fsynced"
        fd = os.open(tree.mnt / "local" / "img", os.O_RDWR | os.O_CREAT, 0o600)
        assert os.pwrite(fd, synced, 0) == len(synced)
        os.fsync(fd)
        assert (await stored_info(tree, "local:img"))["SIZE"] == len(synced)
        os.pwrite(fd, tail, len(synced))  # acknowledged (in the backing file), size not committed
        (tree.mnt / "local" / "vm").mkdir()  # namespace changes commit at once
        (tree.mnt / "local" / "vm" / "disk.0").symlink_to("../img")
        tree.kill9()
        # the crashed server's mount stays, answering ENOTCONN: it does not look empty
        assert is_mounted(tree.mnt)
        with pytest.raises(OSError) as e:
            os.listdir(tree.mnt)
        assert e.value.errno == errno.ENOTCONN
        with contextlib.suppress(OSError):
            os.close(fd)
        tree.restart()
        # the startup reconcile fixed exactly one thing: the size the tail extended
        m = re.findall(r"reconcile at start: (\{.*\})", tree.logs())
        assert ast.literal_eval(m[-1]) == {"orphans": 0, "leftovers": 0, "sizes": 1, "links": 0,
                                                  "reservations": 0, "leases": 0}
        data = (tree.mnt / "local" / "img").read_bytes()
        assert data[:len(synced)] == synced
        assert data[len(synced):] == tail  # the dir backend kept the acknowledged write
        info = await stored_info(tree, "local:img")
        assert info["SIZE"] == backing_file(tree, info).stat().st_size == len(data)
        assert [a["PATH"] for a in info["ATTACHMENTS"]] == [f"{tree.mnt}/local/vm/disk.0"]
        assert os.readlink(tree.mnt / "local" / "vm" / "disk.0") == "../img"
    finally:
        tree.stop()
    assert not is_mounted(tree.mnt)
    # the pool store is consistent: a fresh service on the same database finds nothing to fix
    async with service_on(tree.db_url, tree.state_dir, mountpoint=str(tree.mnt)) as service:
        assert await service.reconcile() == {"orphans": 0, "leftovers": 0, "sizes": 0, "links": 0,
                                             "reservations": 0, "leases": 0}
        counts = {b["NAME"]: (b["NBIMAGE"], b["NBVM"]) for b in await service.list_backends()}
        assert counts == {"local": (1, 1)}
