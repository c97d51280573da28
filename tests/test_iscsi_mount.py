"""An iSCSI backend end to end: the real daemon, a real userspace target (tgtd) and libiscsi's
userspace initiator, through `tm2` and the mount; qemu as an independent client; tgtd going away
and coming back; nothing leaked."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.randomio import random_io
from tests.servers.tgt import TgtServer
from tests.sparse import check_sparse
from tm2fs.drivers.iscsi import parse_tgt_show

pytestmark = [pytest.mark.mount, pytest.mark.iscsi, pytest.mark.slow]
MiB = 2**20
PREFIX = "iqn.2026-11.org.tm2fs.test"


@pytest.fixture(scope="module")
def tgt() -> Iterator[TgtServer]:
    with TgtServer() as server:
        yield server


@pytest.fixture(scope="module")
def tree(tgt: TgtServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("iscsi")
    with Daemon(tmp) as d:
        tpl = tmp / "san.tpl"
        tpl.write_text(f'NAME = san\nTM = iscsi\nTAGS = "SSD,ISCSI"\nCOST = 10\nTIMEOUT = 5\n'
                       f'TM_RAW = [ PORTAL = "{tgt.portal}", STORE = "{tmp}/luns", '
                       f'TGT_CONTROL = "{tgt.control}", IQN_PREFIX = "{PREFIX}", TIMEOUT = "3" ]\n')
        ok(d.backend_cli("create", str(tpl)))
        d.store = tmp / "luns"  # type: ignore[attr-defined]
        yield d


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def targets(tgt: TgtServer) -> list:
    return [t for t in parse_tgt_show(tgt.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "show"))
            if t.name.startswith(PREFIX)]


def sessions(tgt: TgtServer) -> int:
    return sum(t.nexus for t in targets(tgt))


def url(tree: Daemon, tgt: TgtServer, address: str) -> str:
    key = json.loads(ok(tree.tm2("info", address, "--json")))["KEY"]
    return f"iscsi://{tgt.portal}/{PREFIX}:{key}/1"


def settle(check, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "not settled"
        time.sleep(0.1)


def test_eleven_actions_through_tm2_and_the_mount(tree: Daemon, tgt: TgtServer, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 777)
    (tmp_path / "base.img").write_bytes(data)
    ok(tree.tm2("push", str(tmp_path / "base.img"), "san:base.img"))  # push
    assert ok(tree.tm2("get-size", "san:base.img")).strip() == str(len(data))  # get-size
    ok(tree.tm2("get", "san:base.img", str(tmp_path / "back.img")))  # get
    assert (tmp_path / "back.img").read_bytes() == data
    (tree.mnt / "san" / "vm-1").mkdir()
    ok(tree.tm2("clone", "san:base.img", "san:vm-1/disk.0"))  # clone
    ok(tree.tm2("allocate", "san:vm-1/disk.1", "16M"))  # allocate
    ok(tree.tm2("resize", "san:vm-1/disk.1", "24M"))  # resize
    assert (tree.mnt / "san" / "vm-1" / "disk.1").stat().st_size == 24 * MiB
    ok(tree.tm2("write", "san:vm-1/disk.1", input=b"hello lun"))  # write
    assert ok(tree.tm2("read", "san:vm-1/disk.1")) == "hello lun"  # read
    link = tmp_path / "disk.0"
    ok(tree.tm2("attach", "san:vm-1/disk.0", str(link)))  # attach
    assert link.read_bytes() == data and tree.backends()["san"]["NBVM"] == 1
    ok(tree.tm2("detach", "san:vm-1/disk.0", str(link)))  # detach
    disk = tree.mnt / "san" / "vm-1" / "disk.0"
    with open(disk, "r+b") as f:
        f.seek(MiB + 3)
        f.write(b"I" * 5000)
    assert (tree.mnt / "san" / "base.img").read_bytes() == data  # a clone is a copy
    assert disk.read_bytes()[MiB + 3:MiB + 5003] == b"I" * 5000
    for address in ("san:vm-1/disk.1", "san:vm-1/disk.0", "san:base.img"):
        ok(tree.tm2("delete", address))  # delete
    settle(lambda: sessions(tgt) == 0)
    assert targets(tgt) == [] and list(tree.store.iterdir()) == []  # nothing leaked
    assert tree.backends()["san"]["NBIMAGE"] == 0


def test_random_io_and_qemu_sees_the_same_bytes(tree: Daemon, tgt: TgtServer, tmp_path: Path) -> None:
    path = tree.mnt / "san" / "model.img"
    model = bytearray(random_io(path, 21, steps=150, limit=3 * MiB))
    os.truncate(path, 4 * MiB)  # whole blocks, so qemu compares like with like
    model.extend(bytes(4 * MiB - len(model)))
    local = tmp_path / "model.raw"
    local.write_bytes(bytes(model))
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(local),
                              url(tree, tgt, "san:model.img")], capture_output=True, timeout=60)
    assert compare.returncode == 0, compare.stdout.decode() + compare.stderr.decode()
    os.unlink(path)


def test_truncate_by_path_right_after_close(tree: Daemon) -> None:
    """The kernel sends RELEASE after close(2) returns: a truncate by path that came first used
    the still-open image's session, and the last close closed it under the truncate (EIO, "the
    handle is closed", about one run in ten of the test above)."""
    path = tree.mnt / "san" / "closing.img"
    for i in range(40):
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
        os.truncate(path, 8192 + 512 * i)
        assert path.stat().st_size == 8192 + 512 * i
    path.unlink()


@pytest.mark.logs_ok
def test_a_thin_image_stays_thin(tree: Daemon, tmp_path: Path) -> None:
    """st_blocks from the LUN's backing file; cp and qemu-img keep holes."""
    check_sparse(tree.mnt / "san", tmp_path, slack=MiB)


def test_target_away_error_eio_then_ready_data_intact(tree: Daemon, tgt: TgtServer) -> None:
    (tree.mnt / "san" / "kept.img").write_bytes(b"K" * 65536)
    tgt.stop()
    try:
        start = time.monotonic()
        with pytest.raises(OSError) as e:
            (tree.mnt / "san" / "kept.img").read_bytes()
        assert e.value.errno == errno.EIO
        assert time.monotonic() - start < 15
        settle(lambda: tree.backends()["san"]["STATE"] == "ERROR", limit=20)
        (tree.mnt / "local" / "fine").write_bytes(b"ok")  # the rest of the tree works
    finally:
        tgt.start()
    settle(lambda: tree.backends()["san"]["STATE"] == "READY", limit=30)
    assert (tree.mnt / "san" / "kept.img").read_bytes() == b"K" * 65536
    os.unlink(tree.mnt / "san" / "kept.img")
    settle(lambda: sessions(tgt) == 0)


def test_shell_metacharacters_and_a_wrong_portal(tree: Daemon, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    name = "a;touch pwned;$(touch pwned) `touch pwned`.img"
    ok(tree.tm2("allocate", f"san:{name}", "1M"))
    (tree.mnt / "san" / name).write_bytes(b"safe")
    ok(tree.tm2("delete", f"san:{name}"))
    assert not canary.exists() and not list(Path.cwd().glob("pwned"))
    start = time.monotonic()
    bad = tree.backend_cli("create", "--name", "nowhere", "--tm", "iscsi", "--tm-raw",
                           f"PORTAL=127.0.0.1:1 STORE={tmp_path}/luns2 TIMEOUT=3")
    assert bad.returncode == 1 and "not reachable" in bad.stderr.decode()
    assert time.monotonic() - start < 15
    assert "nowhere" not in tree.backends()
