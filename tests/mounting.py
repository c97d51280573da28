"""Mount the pool for real, in a subprocess, for tests that go through the kernel.

A mount cannot be served from the test process: pyfuse3.main() needs a trio loop, and a test that
calls into the mount from the same process would wait on itself. So `start_mount()` runs a small
mount server (`python -m tests.mounting --state DIR --db URL MNT`, below) in a subprocess: the
store, the service with its default `local` backend, the Operations of tm2fs.fs, and nothing else
(no control socket, no monitor loop), so a failure points at the filesystem layer.

To run the real daemon instead, change `server_command()` (one line).

Teardown always unmounts: SIGTERM (the server unmounts on a clean stop), then `fusermount3 -u`,
then `fusermount3 -uz` as the last resort.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 10.0


def server_command(state_dir: Path, db_url: str, mnt: Path) -> list[str]:
    return [sys.executable, "-m", "tests.mounting", "--state", str(state_dir), "--db", db_url,
            str(mnt)]


def is_mounted(path: Path) -> bool:
    target = os.fsencode(str(path)).replace(b" ", b"\\040")
    with open("/proc/mounts", "rb") as f:
        return any(line.split()[1] == target for line in f)


def unmount(path: Path) -> None:
    """`fusermount3 -u`, then lazily (`-uz`) if the first did not do it."""
    for args in (["-u"], ["-u", "-z"]):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", *args, "--", str(path)], capture_output=True,
                       check=False, timeout=30)


class MountedTree:
    """A mount server subprocess and its directories; see `start_mount`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mnt = base / "mnt"
        self.state_dir = base / "state"
        self.db_url = f"sqlite:///{self.state_dir}/pool.db"
        self.log = base / "mount.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MountedTree:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(server_command(self.state_dir, self.db_url, self.mnt),
                                         stdout=log, stderr=log, env=env, cwd=REPO)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mount server exited with {self.proc.returncode}:\n"
                                   f"{self.logs()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"no mount after {MOUNT_TIMEOUT}s:\n{self.logs()}")
            time.sleep(0.02)
        return self

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int | None:
        """Clean stop (SIGTERM); whatever happens, the mount is gone afterwards."""
        code = None
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(20)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
                code = self.proc.returncode
        finally:
            unmount(self.mnt)
        return code

    def kill9(self) -> None:
        """Crash the server. The mount stays, answering ENOTCONN, as after a real crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> MountedTree:
        """Start again on the same state and database, clearing a crashed server's mount."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        unmount(self.mnt)
        return self.start()


@contextlib.contextmanager
def start_mount(base: Path) -> Iterator[MountedTree]:
    tree = MountedTree(base)
    try:
        yield tree.start()
    finally:
        tree.stop()


# ---------------------------------------------------------------------- the mount server


async def serve(state_dir: Path, db_url: str, mnt: Path) -> None:
    import pyfuse3
    import trio

    from tm2fs.fs import Operations, mount_options
    from tm2fs.service import Service
    from tm2fs.store import PoolStore

    log = logging.getLogger("tests.mounting")
    store = PoolStore(db_url)
    service = Service(store, state_dir, host="testhost", mountpoint=str(mnt))
    await service.monitor_all()
    fixed = await service.reconcile()  # as the daemon does after a crash
    log.info("reconcile at start: %s", fixed)
    await service.ensure_default_backend()
    pyfuse3.init(Operations(service), str(mnt), mount_options())
    clean = False
    try:
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()

            nursery.start_soon(on_signals)
            log.info("mounted at %s", mnt)
            await pyfuse3.main()
            clean = True
            nursery.cancel_scope.cancel()
    finally:
        await service.stop()
        pyfuse3.close(unmount=clean)
        store.close()
    log.info("unmounted cleanly")


def main(argv: list[str] | None = None) -> None:
    import trio

    p = argparse.ArgumentParser(description="tm2fs mount server for tests")
    p.add_argument("--state", required=True, type=Path)
    p.add_argument("--db", required=True)
    p.add_argument("mountpoint", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    trio.run(serve, args.state.absolute(), args.db, args.mountpoint.absolute())


if __name__ == "__main__":
    main()
