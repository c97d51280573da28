"""A Ceph RBD backend end to end: the real daemon on a real one-node cluster, through `tm2` and
the mount: the eleven actions, copy-on-write clones, random I/O against a model, and the OSD
going away and coming back."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.randomio import random_io
from tests.sparse import check_sparse

pytestmark = [pytest.mark.mount, pytest.mark.ceph, pytest.mark.slow]
MiB = 2**20
GiB = 2**30


@pytest.fixture(scope="module")
def tree(ceph_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("rbd")
    ceph_cluster._run("rbd", "namespace", "create", f"{ceph_cluster.pool}/mount")
    with Daemon(tmp) as d:
        tpl = tmp / "ceph.tpl"
        tpl.write_text('NAME = ceph\nTM = rbd\nTAGS = "DISTRIBUTED,CEPH"\nCOST = 5\nTIMEOUT = 5\n'
                       'OVERCOMMIT = 4\n'  # thin images on an 8 GiB test OSD; the clone test wants 10G
                       f'TM_RAW = [ CEPH_CONF = "{ceph_cluster.conf_path}", '
                       f'POOL = "{ceph_cluster.pool}", NAMESPACE = "mount", CONNECT_TIMEOUT = "3" ]\n')
        ok(d.backend_cli("create", str(tpl)))
        yield d


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_eleven_actions_through_tm2_and_the_mount(tree: Daemon, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 123)
    (tmp_path / "base.img").write_bytes(data)
    ok(tree.tm2("push", str(tmp_path / "base.img"), "ceph:base.img"))  # push
    assert ok(tree.tm2("get-size", "ceph:base.img")).strip() == str(len(data))  # get-size
    ok(tree.tm2("get", "ceph:base.img", str(tmp_path / "back.img")))  # get
    assert (tmp_path / "back.img").read_bytes() == data
    (tree.mnt / "ceph" / "vm-1").mkdir()
    ok(tree.tm2("clone", "ceph:base.img", "ceph:vm-1/disk.0"))  # clone (COW)
    ok(tree.tm2("allocate", "ceph:vm-1/disk.1", "64M"))  # allocate
    ok(tree.tm2("resize", "ceph:vm-1/disk.1", "96M"))  # resize
    assert (tree.mnt / "ceph" / "vm-1" / "disk.1").stat().st_size == 96 * MiB
    ok(tree.tm2("write", "ceph:vm-1/disk.1", input=b"hello rbd"))  # write
    assert ok(tree.tm2("read", "ceph:vm-1/disk.1")) == "hello rbd"  # read
    link = tmp_path / "disk.0"
    ok(tree.tm2("attach", "ceph:vm-1/disk.0", str(link)))  # attach
    assert link.read_bytes() == data and tree.backends()["ceph"]["NBVM"] == 1
    ok(tree.tm2("detach", "ceph:vm-1/disk.0", str(link)))  # detach
    # the same through the mount: cp, truncate, cat, ln -s, rm
    disk = tree.mnt / "ceph" / "vm-1" / "disk.0"
    with open(disk, "r+b") as f:
        f.seek(MiB)
        f.write(b"C" * 8192)
        os.fsync(f.fileno())
    assert (tree.mnt / "ceph" / "base.img").read_bytes() == data  # the parent is unchanged
    assert disk.read_bytes()[MiB:MiB + 8192] == b"C" * 8192
    os.truncate(tree.mnt / "ceph" / "vm-1" / "disk.1", 128 * MiB)
    os.symlink(disk, tree.mnt / "ceph" / "vm-1" / "link.0")
    assert tree.backends()["ceph"]["NBVM"] == 1
    os.unlink(tree.mnt / "ceph" / "vm-1" / "link.0")
    ok(tree.tm2("delete", "ceph:vm-1/disk.1"))  # delete
    os.unlink(disk)
    os.unlink(tree.mnt / "ceph" / "base.img")
    assert tree.backends()["ceph"]["NBIMAGE"] == 0


def test_a_clone_of_10_gib_is_copy_on_write(tree: Daemon) -> None:
    ok(tree.tm2("allocate", "ceph:big.img", "10G"))
    with open(tree.mnt / "ceph" / "big.img", "r+b") as f:
        f.seek(5 * GiB)
        f.write(b"parent" * 1000)
    start = time.monotonic()
    ok(tree.tm2("clone", "ceph:big.img", "ceph:big-clone.img"))
    took = time.monotonic() - start  # a tm2 process start included
    assert took < 2.0, f"clone took {took:.2f}s"
    clone = tree.mnt / "ceph" / "big-clone.img"
    assert clone.stat().st_size == 10 * GiB
    with open(clone, "r+b") as f:
        f.seek(5 * GiB)
        assert f.read(6000) == b"parent" * 1000
        f.seek(5 * GiB)
        f.write(b"child!" * 1000)
    with open(tree.mnt / "ceph" / "big.img", "r+b") as f:
        f.seek(5 * GiB)
        assert f.read(6000) == b"parent" * 1000  # the clone's write left the parent alone
        f.seek(7 * GiB)
        f.write(b"late parent write")
    with open(clone, "rb") as f:
        f.seek(7 * GiB)
        assert f.read(17) == bytes(17)  # and the other way round
    os.unlink(clone)
    os.unlink(tree.mnt / "ceph" / "big.img")


@pytest.mark.parametrize("seed", [11, 12])
def test_random_io_matches_a_model(tree: Daemon, seed: int) -> None:
    path = tree.mnt / "ceph" / f"model-{seed}.img"
    random_io(path, seed)
    os.unlink(path)


@pytest.mark.logs_ok
def test_a_thin_image_stays_thin(tree: Daemon, tmp_path: Path) -> None:
    """st_blocks from the object map (whole 4 MiB objects: two here); cp and qemu-img keep holes."""
    check_sparse(tree.mnt / "ceph", tmp_path, slack=8 * MiB)


def test_osd_stopped_error_eio_then_ready_again(tree: Daemon, ceph_cluster) -> None:
    (tree.mnt / "ceph" / "kept.img").write_bytes(b"K" * 65536)
    ceph_cluster.stop_osd()
    try:
        start = time.monotonic()
        with pytest.raises(OSError) as e, open(tree.mnt / "ceph" / "kept.img", "r+b") as f:
            f.write(b"X" * 4096)
            os.fsync(f.fileno())
        assert e.value.errno == errno.EIO
        assert time.monotonic() - start < 30  # TIMEOUT is 5 s: no hung process
        deadline = time.monotonic() + 30
        while tree.backends()["ceph"]["STATE"] != "ERROR":
            assert time.monotonic() < deadline, "the backend did not turn ERROR"
            time.sleep(0.2)
        (tree.mnt / "local" / "fine").write_bytes(b"ok")  # the rest of the tree works
        assert (tree.mnt / "local" / "fine").read_bytes() == b"ok"
    finally:
        ceph_cluster.start_osd()
    deadline = time.monotonic() + 60
    while tree.backends()["ceph"]["STATE"] != "READY":
        assert time.monotonic() < deadline, "the backend did not come back"
        time.sleep(0.5)
    assert (tree.mnt / "ceph" / "kept.img").read_bytes()[4096:] == b"K" * (65536 - 4096)
