"""Sparse images on a dir backend through the mount (issue 15): st_blocks is what the backing
file holds, measured off the data path; rbd and iscsi run `check_sparse` in their mount tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.sparse import MiB, check_sparse, held, write_sparse

pytestmark = [pytest.mark.mount]


def test_cp_and_qemu_img_keep_holes(daemon: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    check_sparse(daemon.mnt / "local", out, slack=MiB)


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
