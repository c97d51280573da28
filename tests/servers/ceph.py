"""A throwaway one-node Ceph cluster on loopback, started and stopped by the tests themselves.

One monitor, one manager and one OSD, each a foreground (`-f`) subprocess this object owns, all
configured by one ceph.conf in a temp dir (logs, run dir and data there too). Auth is off, the
monitor speaks msgr2 only on 127.0.0.1 at a free port, pools have one replica, and the settings
that make a one-node cluster reach HEALTH_OK quickly are on (`paxos propose interval = 0.1`, no
warnings for insecure global_id reclaim, unreplicated pools or a fullish test disk). A dead
client's watch on an image expires after 10 s instead of 30 s.

The OSD uses bluestore on a sparse file (about 7 s to start, against 2.5 s for memstore) because
the fault tests kill it with SIGKILL and start it again on the same data: memstore keeps its data
in the OSD's memory, so a restarted memstore OSD would come back empty. Bluestore also enforces
the advertised size, so "full" behaves as on real disks. Every command is an argument list.
Set TM2FS_KEEP_CEPH=1 to keep the temp dir (config, logs, data) after the cluster stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

GIB = 2**30
START_TIMEOUT = 90.0
# a killed client's watch on an image keeps the image "busy" (no remove) until this runs out; the
# default 30 s would slow the fault tests, and clients ping every 5 s, so 10 s is still safe
WATCH_TIMEOUT = 10
DAEMONS = ("ceph-mon", "ceph-mgr", "ceph-osd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephCluster:
    """`with CephCluster() as c:` gives a healthy cluster with pool `c.pool` rbd-initialised."""

    def __init__(self, pool: str = "tm2fs", osd_bytes: int = 8 * GIB, pg_num: int = 8) -> None:
        missing = [d for d in (*DAEMONS, "ceph", "monmaptool", "rbd") if not shutil.which(d)]
        if missing:
            raise RuntimeError(f"Ceph binaries are missing ({', '.join(missing)}): run scripts/setup.sh")
        self.pool = pool
        self.osd_bytes = osd_bytes
        self.pg_num = pg_num
        self.port = _free_port()
        self.fsid = str(uuid.uuid4())
        self.dir = Path(tempfile.mkdtemp(prefix="tm2fs-ceph-", dir="/tmp"))
        self.conf_path = str(self.dir / "ceph.conf")
        self.mon_addr = f"v2:127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ set-up

    def _write_conf(self) -> None:
        d = self.dir
        text = f"""\
[global]
fsid = {self.fsid}
mon host = {self.mon_addr}
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind msgr2 = true
auth cluster required = none
auth service required = none
auth client required = none
run dir = {d}/run
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.1
mgr stats period = 1
osd mon report interval = 1

[mon]
mon data = {d}/$name
log file = {d}/$name.log

[mgr]
mgr data = {d}/$name
log file = {d}/$name.log

[osd]
osd data = {d}/$name
log file = {d}/$name.log
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {self.osd_bytes}
bluestore fsck on mkfs = false
bluestore fsck on mount = false
osd memory target = {GIB}
osd client watch timeout = {WATCH_TIMEOUT}
"""
        Path(self.conf_path).write_text(text)

    def _run(self, *args: str, timeout: float = 60.0) -> str:
        """A Ceph command line tool against this cluster; raises with its stderr on failure."""
        try:
            done = subprocess.run([args[0], "--conf", self.conf_path, *args[1:]], capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(args)} timed out after {timeout:g}s; logs in {self.dir}") from None
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): "
                               f"{done.stderr.decode(errors='replace').strip()}; logs in {self.dir}")
        return done.stdout.decode(errors="replace")

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        """`ceph ARGS` against this cluster, e.g. `cluster.ceph("osd", "pool", "ls")`."""
        return self._run("ceph", "--connect-timeout", str(int(timeout)), *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = 60.0) -> str:
        """`rbd ARGS` against this cluster, e.g. `cluster.rbd("ls", cluster.pool)`."""
        return self._run("rbd", *args, timeout=timeout)

    def _spawn(self, daemon: str, ident: str) -> None:
        name = f"{daemon.removeprefix('ceph-')}.{ident}"
        with open(self.dir / f"{name}.out", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [daemon, "-f", "--conf", self.conf_path, "-i", ident],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def __enter__(self) -> CephCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        d = self.dir
        (d / "run").mkdir()
        for name in ("mon.a", "mgr.x", "osd.0"):
            (d / name).mkdir()
        self._write_conf()
        self._run("monmaptool", "--create", "--addv", "a", f"[{self.mon_addr}]", "--fsid", self.fsid,
                  str(d / "monmap"))
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
        self._spawn("ceph-mon", "a")
        self._spawn("ceph-mgr", "x")
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RuntimeError(f"the new OSD got id {osd_id!r}, expected 0")
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=120)
        self._spawn("ceph-osd", "0")
        self.ceph("osd", "pool", "create", self.pool, str(self.pg_num), str(self.pg_num))
        self._run("rbd", "pool", "init", self.pool, timeout=START_TIMEOUT)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Until HEALTH_OK (every PG active+clean)."""
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            self._check_alive()
            status = self.ceph("health", "--format", "json")
            if json.loads(status).get("status") == "HEALTH_OK":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the cluster is not healthy after {timeout:g}s: {status}; logs in {self.dir}")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}; see {self.dir}/{name}.log")

    # ------------------------------------------------------------------ faults

    @property
    def osd_running(self) -> bool:
        proc = self.procs.get("osd.0")
        return proc is not None and proc.poll() is None

    def stop_osd(self) -> None:
        """Kill the OSD (SIGKILL, as a crash or a pulled cable): clients' I/O now times out.

        With only one OSD nobody reports it down, so the monitors keep it `up` and clients keep
        sending to the dead address until their op timeout; data stays on the bluestore file."""
        proc = self.procs.pop("osd.0", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    def start_osd(self, timeout: float = 60.0) -> None:
        """Start the OSD again on the same data and wait until its placement groups serve I/O."""
        if self.osd_running:
            return
        self._spawn("ceph-osd", "0")
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:  # a fresh client with the latest map: succeeds once every PG of the pool is active
                self._run("rados", "--rados-osd-op-timeout", "2", "-p", self.pool, "ls", timeout=10)
                return
            except RuntimeError as e:
                last = str(e)
            time.sleep(0.2)
        raise RuntimeError(f"the restarted OSD serves no I/O after {timeout:g}s: {last}")

    # ------------------------------------------------------------------ tear-down

    def stop(self) -> None:
        """Stop the OSD first (else it waits for the monitor on its way out), then the manager and
        the monitor; no process is left running and the temp dir goes."""
        for name in ("osd.0", "mgr.x", "mon.a"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        for proc in self.procs.values():  # anything else started later
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=30)
        self.procs.clear()
        if os.environ.get("TM2FS_KEEP_CEPH"):
            return
        shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()
