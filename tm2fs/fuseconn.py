"""The FUSE connection's request queue: how many requests the kernel lets wait on the daemon.

Why: the kernel holds asynchronous requests (O_DIRECT AIO, read-ahead, writeback) to
`max_background` in flight per connection, 12 by default, and libfuse leaves it there (pyfuse3
cannot set it at INIT). A request served from iSCSI or Ceph waits on the network, so 12 in flight
caps a queue depth of 32 at what 12 requests' latency allows (measured: a bare pyfuse3 loop whose
reads wait 1 ms, fio QD32: 4,104 reads/s at 12, 17,979 at 128). Root raises it through the
fusectl filesystem, /sys/fs/fuse/connections/N/, N being the mount's minor device number.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from . import mounts

log = logging.getLogger(__name__)

CONNECTIONS = Path("/sys/fs/fuse/connections")
MAX_BACKGROUND = 128  # requests in flight; congestion (writeback throttling) starts at 3/4


def widen(mountpoint: str | os.PathLike[str], max_background: int = MAX_BACKGROUND) -> bool:
    """Raise the queue of the FUSE mount at `mountpoint` (blocking: call in a worker thread).
    Mounts fusectl first where systemd has not. False, with a warning, where it cannot."""
    dev = mounts.device(mountpoint)
    if dev is None:
        log.warning("FUSE queue left at the kernel's default: %s is not in the mount table", mountpoint)
        return False
    conn = CONNECTIONS / str(dev[1])
    try:
        if not conn.exists() and not mounts.is_mounted(CONNECTIONS):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(CONNECTIONS)], check=True,
                           capture_output=True, timeout=10)
        (conn / "max_background").write_text(str(max_background))
        (conn / "congestion_threshold").write_text(str(max_background * 3 // 4))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("FUSE queue left at the kernel's default (12 requests in flight): cannot "
                    "write %s: %s", conn, e)
        return False
    log.info("FUSE queue: %d requests in flight (%s)", max_background, conn)
    return True
