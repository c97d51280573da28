"""What admins meet first in the CLIs and on the mount (issue 16): dates, units, pipes, completion,
VM folders made by the actions that make images, errors that name the right thing."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.mount

NOBODY = 65534
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[+-]\d\d:\d\d|Z)")
SIZE = re.compile(r"(?:\d+B|\d+\.\d[KMGTP]|-)")


def out(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def attribute(text: str, name: str) -> str:
    return next(line.split()[1] for line in text.splitlines() if line.split()[:1] == [name])


def test_tables_show_dates_and_units_json_keeps_numbers(daemon: Daemon, tmp_path: Path) -> None:
    out(daemon.backend_cli("create", "--name", "b", "--tm", "dir", "--tm-raw",
                           f"PATH={tmp_path}/b"))
    (tmp_path / "b" / "stray").write_bytes(b"x" * 19)  # 19 bytes of USED, as the issue saw
    out(daemon.tm2("allocate", "b:img", "19"))
    shown = out(daemon.backend_cli("show", "b"))
    for name in ("CREATED", "UPDATED"):
        assert ISO.fullmatch(attribute(shown, name)), shown
    assert "e+09" not in shown
    for name in ("CAPACITY", "FREE", "USED", "ALLOCATED", "AVAILABLE"):
        assert SIZE.fullmatch(attribute(shown, name)), (name, shown)
    image_line = next(line for line in shown.splitlines() if "b/img" in line)
    assert "19B" in image_line.split() and ISO.search(image_line)
    data = json.loads(out(daemon.backend_cli("show", "b", "--json")))
    assert isinstance(data["CREATED"], float) and isinstance(data["ALLOCATED"], int)
    table = out(daemon.backend_cli("list", "-l", "NAME,CAPACITY,FREE,USED,ALLOCATED",
                                   "--no-header")).split()
    assert len(table) == 10 and all(SIZE.fullmatch(v) for i, v in enumerate(table) if i % 5)
    info = out(daemon.tm2("info", "b:img"))
    assert ISO.fullmatch(attribute(info, "CREATED")) and attribute(info, "SIZE") == "19B"
    assert isinstance(json.loads(out(daemon.tm2("info", "b:img", "--json")))["CREATED"], float)


def run_into_closed_pipe(daemon: Daemon, module: str, *args: str) -> subprocess.CompletedProcess:
    """As `CMD | head` once head has gone: every write to stdout fails with EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", module, *args], stdout=w,
                              stderr=subprocess.PIPE, env=daemon.env, timeout=60, check=False)
    finally:
        os.close(w)


def test_a_closed_stdout_ends_quietly(daemon: Daemon) -> None:
    out(daemon.tm2("allocate", "local:img", "1M"))
    (daemon.mnt / "local" / "img").write_bytes(b"z" * 2**20)
    for module, args in [("tm2fs.cli_backend", ("show", "local")),
                         ("tm2fs.cli_backend", ("list",)),
                         ("tm2fs.cli_backend", ("list", "--json")),
                         ("tm2fs.cli_backend", ("hosts",)),
                         ("tm2fs.cli_backend", ("--help",)),
                         ("tm2fs.cli_tm2", ("info", "local:img")),
                         ("tm2fs.cli_tm2", ("read", "local:img")),
                         ("tm2fs.cli_tm2", ("get-size", "local:img")),
                         ("tm2fs.cli_tm2", ("place", "1M", "--explain"))]:
        proc = run_into_closed_pipe(daemon, module, *args)
        assert proc.stderr == b"", (args, proc.stderr.decode())
        assert proc.returncode == 1, args


def complete(daemon: Daemon, module: str, var: str, words: str) -> list[str]:
    env = {**daemon.env, var: "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    proc = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return [line.split(",", 1)[1] for line in proc.stdout.decode().splitlines()]


def test_shell_completion(daemon: Daemon) -> None:
    assert complete(daemon, "tm2fs.cli_tm2", "_TM2_COMPLETE", "tm2 al") == ["allocate"]
    assert {"attach", "detach", "clone"} <= set(
        complete(daemon, "tm2fs.cli_tm2", "_TM2_COMPLETE", "tm2 "))
    assert complete(daemon, "tm2fs.cli_tm2", "_TM2_COMPLETE", "tm2 info lo") == ["local:"]
    var = "_ONESTORAGEBACKEND_COMPLETE"
    assert complete(daemon, "tm2fs.cli_backend", var, "onestoragebackend sh") == ["show"]
    assert complete(daemon, "tm2fs.cli_backend", var, "onestoragebackend show l") == ["local"]
    script = subprocess.run([sys.executable, "-m", "tm2fs.cli_tm2"], capture_output=True,
                            env={**daemon.env, "_TM2_COMPLETE": "bash_source"}, check=True)
    assert b"complete -o nosort -F _tm2_completion tm2" in script.stdout


def test_every_command_teaches_by_example(daemon: Daemon) -> None:
    for action in ("get", "push", "clone", "delete", "get-size", "allocate", "resize", "read",
                   "write", "attach", "detach", "break-lease", "info", "place"):
        text = out(daemon.tm2(action, "--help"))
        assert re.search(r"Examples?:\n +(?:.*\| )?tm2 " + action, text), text
    for command in ("create", "delete", "list", "top", "show", "enable", "disable", "update",
                    "hosts"):
        text = out(daemon.backend_cli(command, "--help"))
        assert "onestoragebackend " + command in text or "NAME   = ssd1" in text, text


def test_attach_into_a_missing_folder_names_the_folder(daemon: Daemon, tmp_path: Path) -> None:
    out(daemon.tm2("allocate", "local:img", "1M"))
    missing = tmp_path / "missing" / "dir"
    proc = daemon.tm2("attach", "local:img", str(missing / "disk.0"))
    err = proc.stderr.decode()
    assert proc.returncode == 1 and f"folder {missing} does not exist" in err, err
    assert "local/img" not in err
    assert json.loads(out(daemon.tm2("info", "local:img", "--json")))["ATTACHMENTS"] == []


def test_actions_that_make_an_image_make_its_folders(daemon: Daemon, tmp_path: Path) -> None:
    """As OpenNebula's transfer managers make the VM folder before its disks (`mkdir -p`)."""
    local = daemon.mnt / "local"
    out(daemon.tm2("allocate", "local:vm-42/disk.0", "10M"))
    src = tmp_path / "base.img"
    src.write_bytes(b"b" * 4096)
    out(daemon.tm2("push", str(src), "local:repo/os/base.img"))
    out(daemon.tm2("clone", "local:repo/os/base.img", "local:vm-43/disk.1"))
    out(daemon.tm2("write", "local:vm-44/ctx/context.iso", input=b"ctx"))
    assert (local / "vm-42" / "disk.0").stat().st_size == 10 * 2**20
    assert (local / "repo" / "os" / "base.img").read_bytes() == b"b" * 4096
    assert (local / "vm-43" / "disk.1").read_bytes() == b"b" * 4096
    assert (local / "vm-44" / "ctx" / "context.iso").read_bytes() == b"ctx"
    assert (local / "vm-42").stat().st_mode & 0o7777 == 0o755

    # an existing file on the way is no folder
    file_on_way = daemon.tm2("allocate", "local:vm-42/disk.0/x", "1M")
    assert file_on_way.returncode == 1 and b"not a directory" in file_on_way.stderr


@pytest.fixture
def d(public_daemon: Daemon) -> Daemon:
    """A daemon whose socket and mount every user can reach."""
    return public_daemon


def test_folders_are_the_callers_where_the_caller_may_write(d: Daemon) -> None:
    local = d.mnt / "local"
    (local / "shared").mkdir()
    os.chmod(local / "shared", 0o777)
    (local / "closed").mkdir(mode=0o755)
    out(d.tm2("allocate", "local:shared/vm-45/a/disk.0", "1M", user=NOBODY))
    for folder in (local / "shared" / "vm-45", local / "shared" / "vm-45" / "a"):
        st = folder.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (NOBODY, NOBODY, 0o755)
    refused = d.tm2("allocate", "local:closed/vm-46/disk.0", "1M", user=NOBODY)
    assert refused.returncode == 1 and b"ermission denied" in refused.stderr, refused.stderr
    assert not (local / "closed" / "vm-46").exists()


def test_a_failed_image_leaves_no_folder(daemon: Daemon, tmp_path: Path) -> None:
    """The folders are made in the image's own transaction: a driver that fails leaves none."""
    out(daemon.backend_cli("create", "--name", "frozen", "--tm", "dir", "--tm-raw",
                           f"PATH={tmp_path}/frozen"))
    if subprocess.run(["chattr", "+i", str(tmp_path / "frozen")], check=False).returncode:
        pytest.skip("needs a filesystem with the immutable attribute (chattr +i)")
    try:  # not even root makes a file in it: the driver's allocate fails
        for address in ("frozen:vm-9/disk.0", "auto:vm-9/disk.0"):
            failed = daemon.tm2("allocate", address, "1M", "-r", 'NAME = "frozen"')
            assert failed.returncode == 1, failed.stdout
            assert not (daemon.mnt / "frozen" / "vm-9").exists(), address
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "frozen")], check=True)


def attachments(daemon: Daemon, address: str) -> list[str]:
    return [a["PATH"] for a in json.loads(out(daemon.tm2("info", address, "--json")))["ATTACHMENTS"]]


def test_renames_carry_attachment_paths_and_unlinks_are_logged(daemon: Daemon) -> None:
    local = daemon.mnt / "local"
    out(daemon.tm2("allocate", "local:images/base", "1M"))
    out(daemon.tm2("allocate", "local:sys/vm-42/disk.1", "1M"))
    os.symlink(local / "images" / "base", local / "sys" / "vm-42" / "disk.0")  # absolute
    os.symlink("disk.1", local / "sys" / "vm-42" / "disk.1.lnk")  # relative, moves with it
    os.rename(local / "sys" / "vm-42", local / "sys" / "vm-43")  # the VM folder
    assert attachments(daemon, "local:images/base") == [f"{local}/sys/vm-43/disk.0"]
    assert attachments(daemon, "local:sys/vm-43/disk.1") == [f"{local}/sys/vm-43/disk.1.lnk"]
    os.rename(local / "sys", local / "system")  # any folder above
    assert attachments(daemon, "local:images/base") == [f"{local}/system/vm-43/disk.0"]
    assert attachments(daemon, "local:system/vm-43/disk.1") == [
        f"{local}/system/vm-43/disk.1.lnk"]
    assert (local / "system" / "vm-43" / "disk.1.lnk").stat().st_size == 2**20
    # a link removed on the mount is a detach, and says so in the log
    out(daemon.tm2("detach", "local:images/base", str(local / "system" / "vm-43" / "disk.0")))
    assert attachments(daemon, "local:images/base") == []
    (local / "system" / "vm-43" / "disk.1.lnk").unlink()
    assert daemon.backends()["local"]["NBVM"] == 0
    deadline = time.monotonic() + 30
    while "disk.1.lnk (its link was removed)" not in daemon.logs():
        assert time.monotonic() < deadline, daemon.logs()
        time.sleep(0.1)
    logs = daemon.logs()
    assert (f"detached local:images/base from {daemon.host}:{local}/system/vm-43/disk.0 "
            "(its link was removed)") in logs
    assert (f"detached local:system/vm-43/disk.1 from {daemon.host}:"
            f"{local}/system/vm-43/disk.1.lnk (its link was removed)") in logs


def test_a_rename_never_leaves_a_dangling_link_counted(daemon: Daemon, tmp_path: Path) -> None:
    """`tm2 attach`'s link (outside the mount, by absolute path) keeps its image in place:
    EBUSY, as `rm` refuses it. On the mount POSIX wins: the image moves, and the attachment of a
    link that no longer reaches it ends (NBVM stops counting it), as removing the link would."""
    local = daemon.mnt / "local"
    out(daemon.tm2("allocate", "local:images/a", "1M"))
    out(daemon.tm2("allocate", "local:images/b", "1M"))
    vm = tmp_path / "datastores" / "0" / "42"
    vm.mkdir(parents=True)
    out(daemon.tm2("attach", "local:images/a", str(vm / "disk.0")))  # absolute, off the mount
    (local / "vm-7").mkdir()
    os.symlink(local / "images" / "b", local / "vm-7" / "disk.0")  # absolute, on the mount
    assert daemon.backends()["local"]["NBVM"] == 2
    for src, dst in [(local / "images" / "a", local / "images" / "a2"),
                     (local / "images", local / "imgs")]:
        with pytest.raises(OSError) as e:
            os.rename(src, dst)
        assert e.value.errno == errno.EBUSY, (src, dst)
        assert src.exists() and not dst.exists()
    assert (vm / "disk.0").stat().st_size == 2**20  # the VM's disk still resolves
    refused = daemon.backend_cli("update", "local", "--name", "renamed")
    assert refused.returncode == 1 and b"detach it first" in refused.stderr, refused.stderr

    os.rename(local / "images" / "b", local / "images" / "b2")
    assert not (local / "vm-7" / "disk.0").exists()  # dangling now, and no longer counted
    assert daemon.backends()["local"]["NBVM"] == 1
    assert attachments(daemon, "local:images/b2") == []
    wait_until(lambda: "(the rename left its link dangling)" in daemon.logs(), "logged")
    assert (f"detached local:images/b2 from {daemon.host}:{local}/vm-7/disk.0 "
            "(the rename left its link dangling)") in daemon.logs()
    # detached, the image moves, and so may the backend
    out(daemon.tm2("detach", "local:images/a", str(vm / "disk.0")))
    os.rename(local / "images" / "a", local / "images" / "a2")
    os.rename(local / "images", local / "imgs")
    os.symlink("../imgs/a2", local / "vm-7" / "disk.1")  # relative, on the mount
    out(daemon.backend_cli("update", "local", "--name", "renamed"))
    assert attachments(daemon, "renamed:imgs/a2") == [f"{daemon.mnt}/renamed/vm-7/disk.1"]
    assert (daemon.mnt / "renamed" / "vm-7" / "disk.1").stat().st_size == 2**20

def wait_until(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_df_counts_a_shared_filesystem_once(daemon: Daemon, tmp_path: Path) -> None:
    """Four backends on one disk are one disk's worth of space; CAPACITY caps still apply."""
    disk = os.statvfs(tmp_path)
    size = disk.f_blocks * disk.f_frsize
    for name in ("a", "b", "c"):
        out(daemon.backend_cli("create", "--name", name, "--tm", "dir", "--tm-raw",
                               f"PATH={tmp_path}/{name}"))

    def df() -> int:
        st = os.statvfs(daemon.mnt)
        return st.f_blocks * st.f_frsize

    wait_until(lambda: all(b["CAPACITY"] for b in daemon.backends().values()), "monitored")
    wait_until(lambda: df() == size // 4096 * 4096, f"df shows {df()}, the disk is {size}")
    assert os.statvfs(daemon.mnt).f_bavail * 4096 < 2 * disk.f_bavail * disk.f_frsize  # not 4x
    for name, cap in (("local", "1G"), ("a", "2G"), ("b", "3G"), ("c", "4G")):
        out(daemon.backend_cli("update", name, "--capacity", cap))
    wait_until(lambda: df() == 10 * 2**30, f"df shows {df()}, the caps add up to 10G")
