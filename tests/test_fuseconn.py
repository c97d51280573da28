"""The daemon widens its FUSE connection's request queue (tm2fs/fuseconn.py): with the kernel's
12, requests that wait on iSCSI or Ceph could not reach a queue depth of 32."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tm2fs import fuseconn, mounts

pytestmark = pytest.mark.mount


def test_the_mount_lets_128_requests_wait(daemon: Daemon) -> None:
    dev = mounts.device(daemon.mnt)
    assert dev is not None and dev == (os.major(os.stat(daemon.mnt).st_dev),
                                       os.minor(os.stat(daemon.mnt).st_dev))
    conn = fuseconn.CONNECTIONS / str(dev[1])
    assert (conn / "max_background").read_text().strip() == str(fuseconn.MAX_BACKGROUND) == "128"
    assert (conn / "congestion_threshold").read_text().strip() == "96"


@pytest.mark.logs_ok
def test_a_path_that_is_no_mount_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert mounts.device(tmp_path) is None
    assert fuseconn.widen(tmp_path) is False
    assert "not in the mount table" in caplog.text
