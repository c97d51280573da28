"""Run the real `tm2fs` daemon in a subprocess, and the real CLIs against it, for end-to-end tests.

The mount always goes away in teardown: SIGTERM first (a clean stop unmounts), then
`fusermount3 -u`, then `-uz` as the last resort.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from tm2fs.mounts import is_mounted


def unmount(path: Path) -> None:
    for args in (["-u"], ["-u", "-z"]):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", *args, "--", str(path)], capture_output=True, check=False)


@contextmanager
def public_dir(prefix: str = "tm2fs-public-") -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp dirs are root-only), for a daemon whose
    socket and mount unprivileged users use; removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


class Daemon:
    def __init__(self, tmp: Path, db_url: str | None = None, host: str = "testhost",
                 extra: tuple[str, ...] = (), nofile: tuple[int, int] | None = None) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.mnt = tmp / "mnt"
        self.sock = tmp / "tm2fs.sock"
        self.db_url = db_url or f"sqlite:///{self.state}/pool.db"
        self.host = host
        self.extra = extra
        self.nofile = nofile  # (soft, hard) RLIMIT_NOFILE to start the daemon with
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "daemon.log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "TM2FS_SOCKET": str(self.sock)}

    def start(self, timeout: float = 20.0, env: dict[str, str] | None = None) -> Daemon:
        cmd = [sys.executable, "-m", "tm2fs.daemon", "--state-dir", str(self.state),
               "--socket", str(self.sock), "--host", self.host, "--monitor-interval", "2",
               *self.extra]
        cmd += ["--db", self.db_url, str(self.mnt)]
        if self.nofile:
            cmd = ["prlimit", f"--nofile={self.nofile[0]}:{self.nofile[1]}", "--", *cmd]
        log = open(self.log, "ab")  # noqa: SIM115 - the daemon owns it until it exits
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env or self.env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tm2fs exited with {self.proc.returncode}:\n{self.logs()}")
            if is_mounted(self.mnt) and self.sock.exists():
                try:
                    if self.backend_cli("list", "--json").returncode == 0:
                        return self
                except subprocess.TimeoutExpired:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tm2fs did not come up in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int | None:
        code = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc:
            code = self.proc.returncode
        unmount(self.mnt)
        return code

    @property
    def state_dir(self) -> Path:
        return self.state

    def kill9(self) -> None:
        """Crash the daemon. The mount stays, answering ENOTCONN, as after a real crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> Daemon:
        """Start again on the same state and database (the daemon clears a crashed mount)."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start()

    def _run(self, module: str, args: tuple[str, ...], input: bytes | None,
             user: int | None, timeout: float) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-m", module, *args]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        return subprocess.run(cmd, input=input, capture_output=True, env=self.env,
                              timeout=timeout, check=False)

    def tm2(self, *args: str, input: bytes | None = None, user: int | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return self._run("tm2fs.cli_tm2", args, input, user, timeout)

    def backend_cli(self, *args: str, user: int | None = None,
                    timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return self._run("tm2fs.cli_backend", args, None, user, timeout)

    def backends(self) -> dict[str, dict[str, Any]]:
        out = self.backend_cli("list", "--json")
        assert out.returncode == 0, out.stderr.decode()
        data = json.loads(out.stdout)
        rows = data if isinstance(data, list) else data.get("STORAGEBACKEND_POOL", data)
        return {b["NAME"]: b for b in rows}

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@asynccontextmanager
async def service_on(url: str, state_dir: Path, host: str = "testhost",
                     mountpoint: str | None = None) -> AsyncIterator[Any]:
    """A service on an existing pool store (as another host, or a test, would see it), started
    and stopped around the block; it neither registers nor unregisters a host."""
    from tm2fs.core import Service
    from tm2fs.store import PoolStore

    store = PoolStore(url)
    service = Service(store, state_dir, host=host, mountpoint=mountpoint)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(clean=False)
        store.close()
