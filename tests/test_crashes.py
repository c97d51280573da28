"""The daemon killed (-9) in the middle of a push, a cross-backend clone or a write: after the
restart the image is as it was before (absent, or its old bytes), never half-made under its name,
and the CLI that was talking to the daemon says so in one line."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from tests.daemon import Daemon
from tm2fs.core import ROOT, Service
from tm2fs.store import PoolStore

MiB = 2**20


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def until(check: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def storage(d: Daemon, backend: str) -> Path:
    shown = json.loads(ok(d.backend_cli("show", backend, "--json")))
    return Path(shown["TM_RAW"]["PATH"])


def data_files(root: Path) -> dict[str, int]:
    """Image data files (32 hex digits) in a dir backend's directory -> bytes allocated."""
    return {e.name: e.stat().st_blocks * 512 for e in os.scandir(root)
            if len(e.name) == 32 and e.is_file()}


def biggest(root: Path) -> int:
    return max(data_files(root).values(), default=0)


def tm2(d: Daemon, *args: str, stdin: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tm2fs.cli_tm2", *args], env=d.env,
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def feed(f: IO[bytes], mib: int, byte: bytes) -> bool:
    """Write `mib` MiB; False once the reader has gone."""
    try:
        for _ in range(mib):
            f.write(byte * MiB)
        f.flush()
    except BrokenPipeError:
        return False
    return True


def one_clear_line(proc: subprocess.Popen[bytes]) -> str:
    """The CLI cut off mid-transfer: exit 1, one error line, no traceback."""
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text and "httpx" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0].startswith("tm2: ERROR: the daemon closed the connection during the transfer"), text
    assert len([line for line in lines if not line.startswith("  hint:")]) == 1, text
    return text


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.logs_ok
def test_kill9_during_push_leaves_no_image(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    root = storage(d, "local")
    fifo = tmp_path / "big.img"
    os.mkfifo(fifo)  # the bytes arrive only as fast as the test lets them: the kill lands mid-way
    proc = tm2(d, "push", str(fifo), "local:big.img")
    with open(fifo, "wb") as f:
        assert feed(f, 64, b"\x5a")
        until(lambda: biggest(root) >= 32 * MiB)
        # while it is on its way the image is nowhere to be seen
        assert "big.img" not in os.listdir(d.mnt / "local")
        assert d.tm2("info", "local:big.img").returncode == 1
        shown = json.loads(ok(d.backend_cli("show", "local", "--json")))
        assert shown["IMAGES"] == []
        assert proc.poll() is None
        d.kill9()
        feed(f, 400 - 64, b"\x5a")
    one_clear_line(proc)
    d.restart()
    assert not (d.mnt / "local" / "big.img").exists()
    assert d.tm2("info", "local:big.img").returncode == 1
    assert data_files(root) == {}  # the half-pushed data went at the restart's reconcile
    small = tmp_path / "small.img"
    small.write_bytes(b"ok" * 1000)
    ok(d.tm2("push", str(small), "local:big.img"))
    assert (d.mnt / "local" / "big.img").read_bytes() == b"ok" * 1000


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.logs_ok
def test_kill9_during_a_copy_across_backends_leaves_no_image(daemon: Daemon,
                                                              tmp_path: Path) -> None:
    d = daemon
    ok(d.backend_cli("create", "--name", "other", "--tm", "dir", "--tm-raw",
                     f"PATH={tmp_path}/other"))
    ok(d.tm2("allocate", "local:src.img", "400M"))
    with open(d.mnt / "local" / "src.img", "r+b") as f:
        for _ in range(400 // 4):
            f.write(b"\x33" * 4 * MiB)
    other = storage(d, "other")
    proc = tm2(d, "clone", "local:src.img", "other:dst.img")
    until(lambda: biggest(other) >= 16 * MiB)
    assert "dst.img" not in os.listdir(d.mnt / "other")
    assert proc.poll() is None, "the copy ended before the kill: make the image bigger"
    d.kill9()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err.decode(), err.decode()
    d.restart()
    assert not (d.mnt / "other" / "dst.img").exists()
    assert d.tm2("info", "other:dst.img").returncode == 1
    assert data_files(other) == {}
    assert (d.mnt / "local" / "src.img").stat().st_size == 400 * MiB
    ok(d.tm2("clone", "local:src.img", "other:dst.img"))
    with open(d.mnt / "other" / "dst.img", "rb") as f:
        f.seek(399 * MiB)
        assert f.read(MiB) == b"\x33" * MiB


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.logs_ok
def test_kill9_during_write_keeps_the_old_bytes(daemon: Daemon) -> None:
    d = daemon
    root = storage(d, "local")
    old = b"A" * 8 * MiB
    ok(d.tm2("write", "local:w.img", input=old))
    os.chmod(d.mnt / "local" / "w.img", 0o640)
    proc = tm2(d, "write", "local:w.img", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    assert feed(proc.stdin, 64, b"B")
    until(lambda: biggest(root) >= 32 * MiB)
    assert (d.mnt / "local" / "w.img").read_bytes() == old  # readers see the old bytes meanwhile
    assert proc.poll() is None
    d.kill9()
    feed(proc.stdin, 64, b"B")
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    proc.stdin = None  # closed: communicate() must not flush it
    one_clear_line(proc)
    d.restart()
    assert (d.mnt / "local" / "w.img").read_bytes() == old
    assert len(data_files(root)) == 1


@pytest.mark.mount
def test_write_replaces_the_content_and_keeps_the_image(daemon: Daemon) -> None:
    """A finished write: the new bytes under the same entry (inode, mode, attachments), the old
    data gone."""
    d = daemon
    root = storage(d, "local")
    ok(d.tm2("write", "local:r.img", input=b"old" * 1000))
    path = d.mnt / "local" / "r.img"
    os.chmod(path, 0o640)
    before = path.stat()
    link = d.mnt / "local" / "r.link"
    os.symlink(path, link)  # an attachment
    ok(d.tm2("write", "local:r.img", input=b"new!" * 5000))
    after = path.stat()
    assert path.read_bytes() == b"new!" * 5000
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    info = json.loads(ok(d.tm2("info", "local:r.img", "--json")))
    assert len(info["ATTACHMENTS"]) == 1
    assert len(data_files(root)) == 1  # the old data is gone
    ok(d.tm2("write", "local:r.img", input=b""))
    assert path.read_bytes() == b""
    refused = d.tm2("push", "/dev/null", "local:r.img")
    assert refused.returncode == 1 and "exists" in refused.stderr.decode()


@pytest.mark.mount
def test_write_to_an_image_open_on_the_mount_goes_in_place(daemon: Daemon) -> None:
    """An image held open here is rewritten in place (its readers see the new bytes): the one
    case where a write is not atomic, as the README says."""
    d = daemon
    ok(d.tm2("write", "local:o.img", input=b"x" * 4096))
    with open(d.mnt / "local" / "o.img", "rb") as held:
        ok(d.tm2("write", "local:o.img", input=b"y" * 8192))
        held.seek(0)
        assert held.read() == b"y" * 8192


@pytest.mark.mount
def test_a_write_cut_short_by_the_client_changes_nothing(daemon: Daemon) -> None:
    """The client goes away mid-body: the daemon drops the hidden copy, the old bytes stay."""
    d = daemon
    root = storage(d, "local")
    ok(d.tm2("write", "local:c.img", input=b"C" * MiB))
    proc = tm2(d, "write", "local:c.img", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    assert feed(proc.stdin, 24, b"D")
    until(lambda: biggest(root) >= 8 * MiB)
    proc.kill()
    proc.wait()
    until(lambda: len(data_files(root)) == 1)
    assert (d.mnt / "local" / "c.img").read_bytes() == b"C" * MiB



async def test_reconcile_drops_only_this_host_s_hidden_images(service: Service, store: PoolStore,
                                                              tmp_path: Path) -> None:
    """A host's start removes the half-made images it left; another host's, still on their way,
    are not its to touch."""
    local = service.find_backend("local")
    assert local.root_ino is not None
    mine = await service.images.create(local.root_ino, "mine.img", 0o600, ROOT, size=4096,
                                       hidden=True)
    other = await Service(store, tmp_path / "state", host="otherhost").start()
    try:
        theirs = await other.images.create(local.root_ino, "theirs.img", 0o600, ROOT, size=4096,
                                           hidden=True)
    finally:
        await other.stop(clean=False)
    assert service.namespace.readdir(local.root_ino) == []
    backing = Path((await service.backend_info("local"))["TM_RAW"]["PATH"])
    assert len(data_files(backing)) == 2
    fresh = await Service(store, tmp_path / "state", host="testhost").start()
    try:
        assert (await fresh.reconcile())["orphans"] == 1
        assert mine.ino not in fresh.pool.nodes and theirs.ino in fresh.pool.nodes
        assert len(data_files(backing)) == 1
        assert (await fresh.reconcile())["orphans"] == 0
    finally:
        await fresh.stop(clean=False)
