"""A real hypervisor on native attachments (issue 14): libvirt defines and starts a TCG guest whose
disk is the `<disk>` element tm2fs printed, for dir, rbd (qemu's rbd driver against the test
cluster) and iscsi (qemu's libiscsi driver against the test tgtd), and the same through the mount
for comparison. qemu opens the disk (SeaBIOS reads its boot sector), the guest's disk device
writes, tm2fs sees those bytes and the attachment (NBVM), and detach after `virsh destroy`
releases it."""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.servers.libvirt import Libvirt
from tm2fs.core.native import libvirt_disk

pytestmark = [pytest.mark.libvirt, pytest.mark.mount, pytest.mark.slow]

PREFIX = "iqn.2026-11.org.tm2fs.libvirt"
SIZE = 16 * 2**20


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Daemon]:
    with Daemon(tmp_path) as d:
        yield d


@pytest.fixture
def libvirt(tree: Daemon) -> Iterator[Libvirt]:
    """Started after the mount: a libvirtd of ours sees the mounts its namespace was made with."""
    with Libvirt() as lv:
        yield lv


def _backend(d: Daemon, tmp: Path, name: str, request: pytest.FixtureRequest) -> None:
    if name == "ceph":
        cluster = request.getfixturevalue("ceph_cluster")
        raw = f'CEPH_CONF = "{cluster.conf_path}", POOL = "{cluster.pool}", CONNECT_TIMEOUT = "3"'
        tm = "rbd"
    elif name == "san":
        tgt = request.getfixturevalue("tgt_server")
        raw = (f'PORTAL = "{tgt.portal}", STORE = "{tmp}/luns", TGT_CONTROL = "{tgt.control}", '
               f'IQN_PREFIX = "{PREFIX}", TIMEOUT = "3"')
        tm = "iscsi"
    else:
        return
    tpl = tmp / f"{name}.tpl"
    tpl.write_text(f"NAME = {name}\nTM = {tm}\nTIMEOUT = 10\nTM_RAW = [ {raw} ]\n")
    ok(d.backend_cli("create", str(tpl)))


@pytest.fixture(scope="module")
def tgt_server() -> Iterator[object]:
    from tests.servers.tgt import TgtServer

    with TgtServer() as server:
        yield server


@pytest.mark.parametrize("backend,native", [
    pytest.param("local", True, id="dir"),
    pytest.param("local", False, id="dir-through-mount"),
    pytest.param("ceph", True, id="rbd", marks=pytest.mark.ceph),
    pytest.param("san", True, id="iscsi", marks=pytest.mark.iscsi),
])
def test_a_guest_runs_on_what_tm2fs_printed(libvirt: Libvirt, tree: Daemon, tmp_path: Path,
                                            backend: str, native: bool,
                                            request: pytest.FixtureRequest) -> None:
    d = tree
    _backend(d, tmp_path, backend, request)
    image = f"{backend}:vm-1.disk0"
    ok(d.tm2("allocate", image, str(SIZE)))
    vm_dir = tmp_path / "vm-1"
    vm_dir.mkdir()
    path = vm_dir / "disk.0"
    if native:
        ok(d.tm2("attach", "--native", image, str(path)))
        disk = ok(d.tm2("source", "--format", "libvirt", image))
        if path.is_symlink():  # a file: the link points at it, the element names the file
            assert ET.fromstring(disk).find("source").get("file") == str(path.resolve())  # type: ignore[union-attr]
        else:  # a network disk: the file attach wrote is the element
            assert path.read_text().strip() == disk.strip()
    else:
        ok(d.tm2("attach", image, str(path)))  # a link into the mount
        disk = libvirt_disk({"type": "file", "path": str(path)})
    assert d.backends()[backend]["NBVM"] == 1
    name = f"tm2fs-test-{uuid.uuid4().hex[:8]}"
    with libvirt.domain(name, disk):
        deadline = time.monotonic() + 120
        while libvirt.blkstat(name, "vda").get("rd_req", 0) < 1:  # SeaBIOS reads the disk
            assert time.monotonic() < deadline, libvirt.virsh("domblklist", name)
            time.sleep(0.5)
        if native:  # qemu's own path to the storage, not the mount's
            assert str(d.mnt) not in libvirt.virsh("domblklist", name)
        libvirt.guest_write(name, 4096, 4096, 0x5A)
        data = d.tm2("read", image).stdout
        assert data[4096:8192] == b"\x5a" * 4096 and data[:4096] == bytes(4096)
        info = ok(d.tm2("info", image))
        assert str(path) in info
        refused = d.tm2("delete", image)
        assert refused.returncode == 1 and b"attached" in refused.stderr
    ok(d.tm2("detach", image, str(path)))
    assert not path.exists() and not path.is_symlink()
    assert d.backends()[backend]["NBVM"] == 0
    ok(d.tm2("delete", image))
