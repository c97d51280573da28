"""Sparse images on a dir backend through the mount (issue 15): st_blocks is what the backing
file holds, measured off the data path; rbd and iscsi run `check_sparse` in their mount tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.sparse import MiB, check_sparse, held, write_sparse
from tm2fs.core import Service
from tm2fs.model import ROOT, ROOT_INO


async def test_getattr_reads_memory_and_changes_queue_a_measurement(service: Service) -> None:
    svc = service
    await svc.allocate("local:thin.img", 64 * MiB, ROOT)
    ino = svc.lookup(svc.lookup(ROOT_INO, "local").ino, "thin.img").ino
    image_id = svc.pool.nodes[ino].image_id
    assert svc.getattr(ino).allocated is None  # not measured yet: st_blocks says the size
    assert image_id in svc.pool.unmeasured  # the first lookup queued it
    await svc.measure_allocation()  # the monitor's tick
    assert svc.getattr(ino).allocated == 0
    of = await svc.open(ino, ROOT, writable=True)
    await svc.write(of, 0, b"x" * MiB)
    assert svc.getattr(ino).allocated == 0  # getattr never asks the driver
    await svc.flush(of)  # close(2) measures
    assert MiB <= (svc.getattr(ino).allocated or 0) <= 2 * MiB
    await svc.release(of)
    svc.pool.unmeasured.clear()
    await svc.resize("local:thin.img", 128 * MiB, ROOT)  # a change the kernel did not make
    assert image_id in svc.pool.unmeasured
    svc.pool.allocated[image_id] = 0  # as if something else had changed it meanwhile
    await svc.measure_allocation()
    assert MiB <= (svc.getattr(ino).allocated or 0) <= 2 * MiB
    await svc.delete("local:thin.img", ROOT)
    assert image_id not in svc.pool.allocated


@pytest.mark.mount
def test_cp_and_qemu_img_keep_holes(daemon: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    check_sparse(daemon.mnt / "local", out, slack=MiB)


@pytest.mark.mount
def test_held_open_and_after_a_restart(daemon: Daemon) -> None:
    """Writes to an image held open show within a tick or two; after a restart an image not
    measured yet is measured after its first stat."""
    image = daemon.mnt / "local" / "grow.img"
    write_sparse(image, 64 * MiB)
    with open(image, "r+b") as f:
        f.seek(32 * MiB)
        f.write(b"x" * 8 * MiB)
        f.flush()
        wait_for(lambda: 8 * MiB <= held(image) <= 10 * MiB, "the write held open")
    daemon.restart()
    image.stat()  # not measured yet: queued
    wait_for(lambda: 8 * MiB <= held(image) <= 10 * MiB, "after the restart")


def wait_for(check, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"st_blocks never right: {what}"
        time.sleep(0.2)
