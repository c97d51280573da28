"""End to end, as a new user would: the real daemon, the real mount, the real CLIs.

Every TM2 action is done through `tm2` and through plain file commands, and the two views are
checked to agree (sizes, contents, FREE/USED/NBIMAGE/NBVM).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon, is_mounted

pytestmark = pytest.mark.mount
MiB = 2**20


def run(*cmd: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], input=input, capture_output=True, check=True,
                          timeout=60)


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_quickstart_tree(daemon: Daemon) -> None:
    assert os.listdir(daemon.mnt) == ["local"]
    local = daemon.backends()["local"]
    assert (local["STATE"], local["TM"], local["NBIMAGE"], local["NBVM"]) == ("READY", "dir", 0, 0)
    assert "local" in ok(daemon.backend_cli("list"))


def test_every_action_both_ways(daemon: Daemon, tmp_path: Path) -> None:
    mnt = daemon.mnt
    tpl = tmp_path / "second.tpl"
    tpl.write_text(f'NAME = second\nTM = dir\nTM_RAW = [ PATH = "{tmp_path}/second" ]\n'
                   'TAGS = "HDD7K"\nCOST = 3\n')
    ok(daemon.backend_cli("create", str(tpl)))
    wait_for(lambda: (mnt / "second").is_dir())
    data = os.urandom(3 * MiB + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    # allocate: tm2 <-> truncate
    ok(daemon.tm2("allocate", "local:a.img", "10M"))
    assert (mnt / "local" / "a.img").stat().st_size == 10 * MiB
    run("truncate", "-s", "5M", mnt / "local" / "b.img")
    assert ok(daemon.tm2("get-size", "local:b.img")).strip() == str(5 * MiB)
    # push / write: tm2 <-> cp / cat
    ok(daemon.tm2("push", str(src), "local:pushed"))
    assert (mnt / "local" / "pushed").read_bytes() == data
    assert daemon.tm2("push", str(src), "local:pushed").returncode == 1  # no silent overwrite
    run("cp", src, mnt / "local" / "copied")
    assert daemon.tm2("read", "local:copied").stdout == data
    ok(daemon.tm2("write", "local:written", input=data[:1000]))
    assert (mnt / "local" / "written").read_bytes() == data[:1000]
    # get: tm2 <-> cp
    ok(daemon.tm2("get", "local:copied", str(tmp_path / "got")))
    assert (tmp_path / "got").read_bytes() == data
    # resize: tm2 -> stat sees it at once (the kernel's cache is invalidated)
    ok(daemon.tm2("resize", "local:a.img", "20M"))
    assert (mnt / "local" / "a.img").stat().st_size == 20 * MiB
    run("truncate", "-s", "30M", mnt / "local" / "a.img")
    assert ok(daemon.tm2("get-size", "local:a.img")).strip() == str(30 * MiB)
    # clone inside and across backends
    ok(daemon.tm2("clone", "local:copied", "local:clone1"))
    ok(daemon.tm2("clone", "local:copied", "second:clone2"))
    assert (mnt / "local" / "clone1").read_bytes() == data
    assert (mnt / "second" / "clone2").read_bytes() == data
    # attach / detach: ln -s on the mount, and tm2 to a path outside it
    (mnt / "local" / "vm-42").mkdir()
    os.symlink("../a.img", mnt / "local" / "vm-42" / "disk.0")
    assert daemon.backends()["local"]["NBVM"] == 1
    outside = tmp_path / "vm-7" / "disk.0"
    outside.parent.mkdir()
    ok(daemon.tm2("attach", "local:b.img", str(outside)))
    assert outside.is_symlink() and outside.read_bytes() == bytes(5 * MiB)
    assert daemon.backends()["local"]["NBVM"] == 2
    assert daemon.tm2("delete", "local:b.img").returncode == 1  # attached: refused
    ok(daemon.tm2("detach", "local:b.img", str(outside)))
    assert not outside.exists()
    (mnt / "local" / "vm-42" / "disk.0").unlink()
    assert daemon.backends()["local"]["NBVM"] == 0
    # delete: tm2 <-> rm
    ok(daemon.tm2("delete", "local:b.img"))
    assert not (mnt / "local" / "b.img").exists()
    os.unlink(mnt / "local" / "written")
    gone = daemon.tm2("get-size", "local:written")
    assert gone.returncode == 1 and b"does not exist" in gone.stderr
    # mv: inside a backend is a rename, across backends a copy
    run("mv", mnt / "local" / "copied", mnt / "local" / "vm-42" / "renamed")
    run("mv", mnt / "local" / "pushed", mnt / "second" / "moved")
    assert (mnt / "second" / "moved").read_bytes() == data
    assert sorted(os.listdir(mnt / "local")) == ["a.img", "clone1", "vm-42"]
    backends = daemon.backends()
    assert (backends["local"]["NBIMAGE"], backends["second"]["NBIMAGE"]) == (3, 2)
    assert sorted(os.listdir(tmp_path / "second")) == sorted([".tm2fs-backend", *(  # the marker
        i["KEY"] for i in json.loads(
            ok(daemon.backend_cli("show", "second", "--json")))["IMAGES"])])


def test_free_and_used_follow_writes(daemon: Daemon) -> None:
    before = daemon.backends()["local"]
    with open(daemon.mnt / "local" / "big", "wb") as f:
        f.write(os.urandom(64 * MiB))
        os.fsync(f.fileno())
    wait_for(lambda: daemon.backends()["local"]["USED"] >= before["USED"] + 64 * MiB)
    after = daemon.backends()["local"]
    st = os.statvfs(daemon.mnt / "local")
    # df on the backend directory shows what onestoragebackend shows
    assert st.f_blocks * st.f_frsize == after["CAPACITY"]
    assert abs(st.f_bavail * st.f_frsize - after["FREE"]) < 256 * MiB


def stable(backends: dict) -> dict:
    """What bad input must not change: everything but clocks and the disk's own free space."""
    return {n: {k: v for k, v in b.items() if k not in ("MONITORED", "FREE", "USED", "AVAILABLE")}
            for n, b in backends.items()}


def test_bad_input_through_every_door(daemon: Daemon) -> None:
    before = stable(daemon.backends())
    for args in (["allocate", "local:a/", "1M"], ["allocate", "local:..", "1M"],
                 ["allocate", "local:" + "x" * 256, "1M"], ["allocate", "local:x", "-1"],
                 ["allocate", "local:x", "10Q"], ["allocate", "nosuch:x", "1M"],
                 ["get-size", "local:none"]):
        proc = daemon.tm2(*args)
        assert proc.returncode == 1, args
        err = proc.stderr.decode()
        assert err.startswith("tm2: ERROR: ") and "Traceback" not in err, err
    with pytest.raises(OSError) as e:
        (daemon.mnt / "local" / ("x" * 256)).write_bytes(b"")
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        (daemon.mnt / "toplevel").mkdir()
    assert e.value.errno == errno.EPERM
    dup = daemon.backend_cli("create", "--name", "local", "--tm", "dir")
    assert dup.returncode == 1 and b"exists" in dup.stderr
    assert stable(daemon.backends()) == before
    assert os.listdir(daemon.mnt / "local") == []


def test_clean_stop_unmounts_and_crash_keeps_mount(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        (d.mnt / "local" / "f").write_bytes(b"synced")
        assert d.stop() == 0
        assert not is_mounted(d.mnt)
        d.start()
        assert (d.mnt / "local" / "f").read_bytes() == b"synced"
        d.kill9()
        assert is_mounted(d.mnt)  # deliberately left: ENOTCONN, not an empty directory
        with pytest.raises(OSError) as e:
            os.listdir(d.mnt)
        assert e.value.errno == errno.ENOTCONN
        d.start()  # restart clears the stale mount and mounts again
        assert (d.mnt / "local" / "f").read_bytes() == b"synced"
    finally:
        d.stop()


def test_systemd_hears_ready_after_the_mount(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(20)
        d = Daemon(tmp_path)
        try:
            d.start(env={**d.env, "NOTIFY_SOCKET": str(path)})
            msg = s.recv(4096).decode()
            assert "READY=1" in msg
            assert is_mounted(d.mnt)
            d.proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in s.recv(4096).decode()
        finally:
            d.stop()


def test_same_bytes_through_the_mount_and_the_backing_file(daemon: Daemon) -> None:
    data = os.urandom(8 * MiB)
    (daemon.mnt / "local" / "img").write_bytes(data)
    path = ok(daemon.tm2("info", "local:img", "--json"))
    key = json.loads(path)["KEY"]
    backing = daemon.state / "backends" / "local" / key
    assert hashlib.sha256(backing.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_api_writes_reach_a_file_open_on_the_mount(daemon: Daemon) -> None:
    """`tm2 write` does not pass through the kernel: the daemon must drop the kernel's caches."""
    img = daemon.mnt / "local" / "img"
    img.write_bytes(b"old" * 1000)
    fd = os.open(img, os.O_RDONLY)
    try:
        assert os.pread(fd, 3, 0) == b"old"
        assert os.fstat(fd).st_size == 3000  # both now cached by the kernel
        ok(daemon.tm2("write", "local:img", input=b"new" * 2000))
        assert os.fstat(fd).st_size == 6000
        assert os.pread(fd, 6, 2997) == b"newnew"
    finally:
        os.close(fd)
