"""A throwaway userspace iSCSI target (Debian's `tgt`) on loopback, started by the tests themselves.

`tgtd -f -C N --iscsi portal=127.0.0.1:PORT` runs in the foreground as our child, with its own
control number N (its socket is always /var/run/tgtd/socket.N, so every instance needs its own N)
and a free port. `stop()` kills it (tgtd ignores SIGTERM; SIGKILL is also what a crash looks like)
and waits for it; `start()` again brings it back on the same port and N with no targets, as after
a real restart: the driver must re-create them. Every command is an argument list.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SOCKET_DIR = Path("/var/run/tgtd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _control_free(n: int) -> bool:
    """No tgtd answers on control number n (and no other test holds it)."""
    return not (SOCKET_DIR / f"socket.{n}").exists() or subprocess.run(
        ["tgtadm", "-C", str(n), "--mode", "sys", "--op", "show"], capture_output=True,
        timeout=10).returncode != 0


class TgtServer:
    """`with TgtServer() as t:` gives `t.portal` (127.0.0.1:PORT), `t.port` and `t.control` (N)."""

    def __init__(self) -> None:
        if shutil.which("tgtd") is None or shutil.which("tgtadm") is None:
            raise RuntimeError("tgtd is missing: apt-get install tgt")
        self.port = _free_port()
        self.control = next(n for n in random.sample(range(100, 1000), 900) if _control_free(n))
        self.portal = f"127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="tm2fs-tgt-", dir="/tmp"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    def start(self, timeout: float = 20.0) -> None:
        """Start tgtd and wait until tgtadm and the portal answer."""
        if self.process is not None:
            raise RuntimeError("tgtd is already running")
        SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        self._remove_sockets()
        self._log = open(self.dir / "tgtd.log", "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal={self.portal}"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            status = self.process.poll()
            if status is not None:
                log = (self.dir / "tgtd.log").read_text(errors="replace")
                self.process = None
                raise RuntimeError(f"tgtd exited with status {status}: {log[-2000:]}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tgtd did not answer within {timeout:g}s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        show = subprocess.run(["tgtadm", "-C", str(self.control), "--mode", "sys", "--op", "show"],
                              capture_output=True, timeout=10)
        if show.returncode != 0 or b"State: ready" not in show.stdout:
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Kill tgtd and wait for it: nothing is left running; its targets are gone."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        for name in (f"socket.{self.control}", f"socket.{self.control}.lock"):
            (SOCKET_DIR / name).unlink(missing_ok=True)

    def tgtadm(self, *args: str) -> str:
        """Run `tgtadm -C N ARGS...`; its stdout (raises on failure)."""
        return subprocess.run(["tgtadm", "-C", str(self.control), *args], capture_output=True,
                              check=True, timeout=30, text=True).stdout

    def __enter__(self) -> TgtServer:
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
