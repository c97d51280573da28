"""The permission model played by hostile local users, for real: a tenant account made by the test
and `nobody` work on the mount and through the CLIs against root's images (README: "Who may do
what")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.daemon import Daemon, public_dir
from tm2fs.store import PoolStore
from tm2fs.store import schema as st

NOBODY = 65534


def run_as(uid: int, *cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd],
                          capture_output=True, timeout=30, check=False)


def api_as(d: Daemon, uid: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """A raw control-API request from another user (the socket tells the daemon who asks)."""
    code = ("import httpx, json, sys\n"
            "m, p, b = json.loads(sys.argv[1])\n"
            "with httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[2]),"
            " base_url='http://tm2fs') as c:\n"
            "    r = c.request(m, p, json=b)\n"
            "print(json.dumps([r.status_code, r.json() if r.content else None]))\n")
    out = run_as(uid, sys.executable, "-c", code, json.dumps([method, path, body]), str(d.sock))
    assert out.returncode == 0, out.stderr.decode()
    status, data = json.loads(out.stdout)
    return status, data


@pytest.fixture(scope="module")
def tenant() -> Iterator[int]:
    """An unprivileged account of our own, removed afterwards."""
    name = f"tm2t{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        yield int(subprocess.run(["id", "-u", name], check=True, capture_output=True).stdout)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def pub() -> Iterator[Path]:
    """A directory every user can reach."""
    with public_dir("tm2fs-perms-") as top:
        yield top


@pytest.fixture
def d(pub: Path) -> Iterator[Daemon]:
    with Daemon(pub) as daemon:
        yield daemon


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def nbvm(d: Daemon) -> int:
    return int(d.backends()["local"]["NBVM"])


# ---------------------------------------------------------------------- the default backend


@pytest.mark.mount
def test_default_backend_is_sticky_like_tmp(d: Daemon, tenant: int) -> None:
    """Everyone may create in `local`; only an entry's owner (or root) removes or renames it."""
    local = d.mnt / "local"
    assert d.backends()["local"]["PERMISSIONS"] == "1777"
    assert local.stat().st_mode & 0o7777 == 0o1777
    ok(d.backend_cli("update", "local", "--permissions", "1777"))  # what the README tells
    (local / "victim.img").write_bytes(b"root's data")
    os.chmod(local / "victim.img", 0o600)

    refused = d.tm2("delete", "local:victim.img", user=tenant)
    assert refused.returncode != 0 and b"sticky" in refused.stderr, refused.stderr
    refused = run_as(tenant, "rm", "-f", str(local / "victim.img"))
    assert refused.returncode != 0 and b"not permitted" in refused.stderr.lower()
    refused = run_as(tenant, "mv", str(local / "victim.img"), str(local / "mine.img"))
    assert refused.returncode != 0 and b"not permitted" in refused.stderr.lower()
    assert (local / "victim.img").read_bytes() == b"root's data"
    assert not (local / "mine.img").exists()
    status, body = api_as(d, NOBODY, "POST", "/v1/images/delete", {"address": "local:victim.img"})
    assert (status, body["error"]) == (403, "not_permitted")

    # what the tenant makes there is theirs to rename and remove, and not nobody's
    ok(run_as(tenant, "dd", "if=/dev/zero", f"of={local}/own.img", "bs=4096", "count=1"))
    ok(run_as(tenant, "mv", str(local / "own.img"), str(local / "own2.img")))
    assert run_as(NOBODY, "rm", "-f", str(local / "own2.img")).returncode != 0
    assert d.tm2("delete", "local:own2.img", user=NOBODY).returncode != 0
    ok(d.tm2("delete", "local:own2.img", user=tenant))
    assert sorted(os.listdir(local)) == ["victim.img"]
    assert d.backends()["local"]["NBIMAGE"] == 1


# ---------------------------------------------------------------------- attach and detach


@pytest.mark.mount
def test_detach_only_by_the_attacher_the_owner_or_root(d: Daemon, pub: Path, tenant: int) -> None:
    local = d.mnt / "local"
    (local / "shared.img").write_bytes(b"x" * 4096)
    os.chmod(local / "shared.img", 0o644)
    vms = pub / "vms"  # where links are made: anyone may remove a link here (not sticky)
    vms.mkdir()
    vms.chmod(0o777)

    ok(d.tm2("attach", "local:shared.img", str(vms / "roots")))
    refused = d.tm2("detach", "local:shared.img", str(vms / "roots"), user=NOBODY)
    assert refused.returncode != 0 and b"only who attached it" in refused.stderr, refused.stderr
    assert (vms / "roots").is_symlink() and nbvm(d) == 1
    refused = d.tm2("delete", "local:shared.img")  # still pinned
    assert refused.returncode != 0 and b"attached" in refused.stderr

    ok(d.tm2("attach", "local:shared.img", str(vms / "tenants"), user=tenant))  # readable: may
    assert nbvm(d) == 2
    assert d.tm2("detach", "local:shared.img", str(vms / "tenants"), user=NOBODY).returncode != 0
    assert nbvm(d) == 2
    ok(d.tm2("detach", "local:shared.img", str(vms / "tenants"), user=tenant))  # the attacher
    ok(d.tm2("detach", "local:shared.img", str(vms / "roots")))  # root
    assert nbvm(d) == 0 and os.listdir(vms) == []

    # the image's owner ends any attachment of it
    ok(run_as(tenant, "dd", "if=/dev/zero", f"of={local}/tenants.img", "bs=4096", "count=1"))
    ok(run_as(tenant, "chmod", "644", str(local / "tenants.img")))
    ok(d.tm2("attach", "local:tenants.img", str(vms / "by-root")))
    ok(d.tm2("detach", "local:tenants.img", str(vms / "by-root"), user=tenant))
    assert nbvm(d) == 0


@pytest.mark.mount
def test_only_root_names_another_host(d: Daemon, tenant: int) -> None:
    (d.mnt / "local" / "img").write_bytes(b"x")
    os.chmod(d.mnt / "local" / "img", 0o666)
    attach = {"address": "local:img", "path": "/var/lib/vm/disk", "host": "made-up-host"}
    status, body = api_as(d, tenant, "POST", "/v1/images/attach", attach)
    assert (status, body["error"]) == (403, "permission_denied"), body
    assert "another host" in body["message"]
    assert nbvm(d) == 0
    # naming this host is naming no other
    status, body = api_as(d, tenant, "POST", "/v1/images/attach", {**attach, "host": d.host})
    assert status == 201, body
    assert body["HOST"] == d.host
    status, body = api_as(d, 0, "POST", "/v1/images/attach", attach)
    assert status == 201, body
    assert nbvm(d) == 2
    status, body = api_as(d, tenant, "POST", "/v1/images/detach", attach)
    assert status == 403, body
    status, _ = api_as(d, 0, "POST", "/v1/images/detach", attach)
    assert status == 204 and nbvm(d) == 1
    here = {k: v for k, v in attach.items() if k != "host"}
    status, _ = api_as(d, tenant, "POST", "/v1/images/detach", here)
    assert status == 204 and nbvm(d) == 0


@pytest.mark.mount
def test_attach_needs_read_permission_on_the_image(d: Daemon, pub: Path, tenant: int) -> None:
    """A link on the mount (or `tm2 attach`) to an image the user may not read is refused: it
    would pin root's image (no delete while attached) and count in NBVM."""
    local = d.mnt / "local"
    (local / "root600.img").write_bytes(b"secret")
    os.chmod(local / "root600.img", 0o600)
    (local / "private").mkdir(mode=0o700)
    (local / "private" / "open.img").write_bytes(b"open")
    os.chmod(local / "private" / "open.img", 0o644)

    refused = run_as(tenant, "ln", "-s", "root600.img", str(local / "mylink"))
    assert refused.returncode != 0 and b"permission denied" in refused.stderr.lower()
    refused = run_as(tenant, "ln", "-s", f"{local}/root600.img", str(local / "mylink"))
    assert refused.returncode != 0 and b"permission denied" in refused.stderr.lower()
    # readable, but in a folder the user may not search
    refused = run_as(tenant, "ln", "-s", "private/open.img", str(local / "mylink"))
    assert refused.returncode != 0 and b"permission denied" in refused.stderr.lower()
    vms = pub / "vms"
    vms.mkdir()
    vms.chmod(0o777)
    refused = d.tm2("attach", "local:root600.img", str(vms / "link"), user=tenant)
    assert refused.returncode != 0 and b"may read the image" in refused.stderr, refused.stderr
    assert not (vms / "link").is_symlink()
    assert not (local / "mylink").is_symlink()
    assert nbvm(d) == 0
    status, body = api_as(d, tenant, "GET", "/v1/images/localpath?address=local:root600.img")
    assert status == 403, body  # the native path would name the KEY
    ok(d.tm2("delete", "local:root600.img"))  # nothing pins it

    # a link to what the user may read is an attachment, recorded as the user's
    (local / "base.img").write_bytes(b"base")
    os.chmod(local / "base.img", 0o644)
    ok(run_as(tenant, "ln", "-s", "base.img", str(local / "mylink")))
    info = json.loads(ok(d.tm2("info", "local:base.img", "--json")))
    assert [a["PATH"] for a in info["ATTACHMENTS"]] == [str(local / "mylink")]
    assert run_as(NOBODY, "rm", str(local / "mylink")).returncode != 0  # sticky
    ok(run_as(tenant, "rm", str(local / "mylink")))
    assert nbvm(d) == 0
    # root links anything
    os.symlink("private/open.img", local / "rootlink")
    assert nbvm(d) == 1


@pytest.mark.mount
def test_group_members_attach_by_group_read(d: Daemon, tenant: int) -> None:
    """The mount's callers' supplementary groups count (read from the calling process)."""
    local = d.mnt / "local"
    (local / "grp.img").write_bytes(b"g")
    os.chown(local / "grp.img", 0, 4242)
    os.chmod(local / "grp.img", 0o640)
    cmd = ["setpriv", f"--reuid={tenant}", f"--regid={tenant}", "--groups=4242", "ln", "-s",
           "grp.img", str(local / "glink")]
    ok(subprocess.run(cmd, capture_output=True, timeout=30, check=False))
    assert nbvm(d) == 1
    assert run_as(tenant, "ln", "-s", "grp.img", str(local / "glink2")).returncode != 0


# ---------------------------------------------------------------------- names


@pytest.mark.mount
def test_show_lists_only_names_the_caller_may_see(d: Daemon, pub: Path, tenant: int) -> None:
    local = d.mnt / "local"
    (local / "private").mkdir(mode=0o700)  # root's folder
    (local / "private" / "secret-name.img").write_bytes(b"s" * 100)
    (local / "unlisted").mkdir(mode=0o711)  # searchable, not readable
    (local / "unlisted" / "guess-me.img").write_bytes(b"g")
    os.chmod(local / "unlisted" / "guess-me.img", 0o644)
    (local / "open.img").write_bytes(b"o")
    os.chmod(local / "open.img", 0o600)  # unreadable content, but a visible name (as `ls`)
    ok(d.tm2("attach", "local:private/secret-name.img", str(pub / "root-vm-disk")))

    mine = json.loads(ok(d.backend_cli("show", "local", "--json", user=tenant)))
    assert [i["PATH"] for i in mine["IMAGES"]] == ["local/open.img"]
    assert [i["KEY"] for i in mine["IMAGES"]] == [None]  # the backend's internal name: root's
    assert mine["ATTACHMENTS"] == []
    assert mine["NBIMAGE"] == 3 and mine["NBVM"] == 1  # counters stay the backend's
    table = ok(d.backend_cli("show", "local", user=tenant))
    assert "secret-name" not in table and "guess-me" not in table and "root-vm-disk" not in table
    # the same as `ls` shows the same user
    assert run_as(tenant, "ls", str(local / "private")).returncode != 0
    assert run_as(tenant, "ls", str(local / "unlisted")).returncode != 0

    roots = json.loads(ok(d.backend_cli("show", "local", "--json")))
    assert sorted(i["PATH"] for i in roots["IMAGES"]) == [
        "local/open.img", "local/private/secret-name.img", "local/unlisted/guess-me.img"]
    assert all(len(i["KEY"]) == 32 for i in roots["IMAGES"])
    assert [a["PATH"] for a in roots["ATTACHMENTS"]] == [str(pub / "root-vm-disk")]
    assert json.loads(ok(d.tm2("info", "local:open.img", "--json", user=tenant)))["KEY"] is None


@pytest.mark.mount
def test_native_sources_are_for_readers_of_the_image(d: Daemon, tenant: int) -> None:
    """`tm2 source` and the mount's `user.tm2fs.source` name the image's backing storage: only
    for users who may read the image (the kernel checks read for user.* attributes)."""
    image = d.mnt / "local" / "private.img"
    image.write_bytes(b"root's")
    os.chmod(image, 0o600)
    refused = d.tm2("source", "local:private.img", user=tenant)
    assert refused.returncode == 1 and b"permission denied" in refused.stderr
    probe = run_as(tenant, sys.executable, "-c",
                   f"import os; os.getxattr({str(image)!r}, 'user.tm2fs.source')")
    assert probe.returncode != 0 and b"Permission denied" in probe.stderr
    os.chmod(image, 0o644)
    assert json.loads(ok(d.tm2("source", "local:private.img", user=tenant)))["type"] == "file"
    assert run_as(tenant, sys.executable, "-c", f"import os; os.getxattr({str(image)!r}, "
                  "'user.tm2fs.source')").returncode == 0


@pytest.mark.mount
def test_only_root_breaks_leases(d: Daemon, tenant: int) -> None:
    (d.mnt / "local" / "img").write_bytes(b"x")
    refused = d.tm2("break-lease", "local:img", "--force", user=tenant)
    assert refused.returncode != 0 and b"only root" in refused.stderr


# ---------------------------------------------------------------------- the store


def test_v2_attachments_gain_their_attacher(store_url: str) -> None:
    """A store from before attachments recorded who made them opens; its old attachments have
    no attacher (so only the image's owner or root ends them)."""
    s = PoolStore(store_url)
    with s.begin() as tx:
        bid = tx.insert_backend(name="old", tm="dir", root_ino=0)
        tx.c.exec_driver_sql(f"INSERT INTO image (backend_id, key, size, created) "
                             f"VALUES ({bid}, 'k', 0, 0)")
        iid = tx.c.exec_driver_sql("SELECT id FROM image").scalar_one()
        tx.c.exec_driver_sql("ALTER TABLE attachment DROP COLUMN uid")
        tx.c.exec_driver_sql(f"INSERT INTO attachment (image_id, host, path, created) "
                             f"VALUES ({iid}, 'h', '/vm/disk', 0)")
        tx.c.exec_driver_sql("UPDATE schema_info SET version = 2")
    s.close()
    s = PoolStore(store_url)
    with s.begin() as tx:
        assert tx.c.execute(sa.select(st.schema_info.c.version)).scalar_one() == st.SCHEMA_VERSION
        [a] = tx.attachments(image_id=iid)
        assert (a.path, a.uid) == ("/vm/disk", None)
        tx.insert_attachment(iid, "h", "/vm/disk2", uid=1000)
        assert [a.uid for a in tx.attachments(image_id=iid)] == [None, 1000]
    s.close()
