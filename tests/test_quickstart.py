"""The README's first command, as a new user runs it: set-up, then a mounted `local` backend."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import is_mounted, unmount

pytestmark = pytest.mark.mount
REPO = Path(__file__).resolve().parent.parent


def test_run_sh_mounts_the_embedded_default(tmp_path: Path) -> None:
    state, mnt = tmp_path / "state", tmp_path / "mnt"
    env = {**os.environ, "TM2FS_STATE": str(state), "TM2FS_MNT": str(mnt)}
    proc = subprocess.Popen([str(REPO / "run.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120  # set-up is a no-op when done, but may install
        while not is_mounted(mnt):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "run.sh did not mount in time"
            time.sleep(0.1)
        assert os.listdir(mnt) == ["local"]
        assert (state / "pool.db").exists()
        cli = subprocess.run([str(REPO / ".venv/bin/onestoragebackend"), "list", "-l",
                              "NAME,STATE,TM", "--no-header"],
                             env={**env, "TM2FS_SOCKET": str(state / "tm2fs.sock")},
                             capture_output=True, timeout=30, check=True)
        assert cli.stdout.decode().split() == ["local", "READY", "dir"]
        (mnt / "local" / "hello.img").write_bytes(b"hello")
        assert (state / "backends" / "local").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount(mnt)
