"""LEGACYTM end to end: a `legacy` backend in the real daemon (tm2 and the mount), and the shipped
path-based scripts running unchanged on the mount for a whole VM-folder life cycle."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tm2fs.drivers.legacy import DEFAULT_SCRIPTS

pytestmark = pytest.mark.mount
MiB = 2**20


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def legacy_backend(daemon: Daemon, tmp_path: Path, name: str, conf: str = "tm_shared.conf",
                   scripts: Path = DEFAULT_SCRIPTS, **extra: str) -> Path:
    images = tmp_path / f"{name}-images"
    raw = ", ".join(f'{k} = "{v}"' for k, v in {"PATH": images, "TM_CONF": conf,
                                                 "SCRIPTS": scripts, **extra}.items())
    tpl = tmp_path / f"{name}.tpl"
    tpl.write_text(f"NAME = {name}\nTM = legacy\nTIMEOUT = 60\nTM_RAW = [ {raw} ]\n")
    ok(daemon.backend_cli("create", str(tpl)))
    return images


@pytest.mark.parametrize("conf", ["tm_shared.conf", "tm_ssh.conf"])
def test_eleven_actions_on_a_legacy_backend(daemon: Daemon, tmp_path: Path, conf: str) -> None:
    images = legacy_backend(daemon, tmp_path, "old", conf)
    data = os.urandom(3 * MiB + 17)
    src = tmp_path / "base.img"
    src.write_bytes(data)
    ok(daemon.tm2("push", str(src), "old:base.img"))  # push
    assert ok(daemon.tm2("get-size", "old:base.img")).strip() == str(len(data))
    ok(daemon.tm2("get", "old:base.img", str(tmp_path / "back.img")))  # get
    assert (tmp_path / "back.img").read_bytes() == data
    (daemon.mnt / "old" / "vm-1").mkdir()
    ok(daemon.tm2("clone", "old:base.img", "old:vm-1/disk.0"))  # clone (the CLONE script)
    ok(daemon.tm2("allocate", "old:vm-1/disk.1", "5M"))  # allocate (MKIMAGE)
    ok(daemon.tm2("resize", "old:vm-1/disk.1", "9M"))  # resize
    assert ok(daemon.tm2("get-size", "old:vm-1/disk.1")).strip() == str(9 * MiB)
    ok(daemon.tm2("write", "old:vm-1/disk.1", input=b"new bytes"))  # write
    assert ok(daemon.tm2("read", "old:vm-1/disk.1")).encode() == b"new bytes"  # read
    link = tmp_path / "disk.0"
    ok(daemon.tm2("attach", "old:vm-1/disk.0", str(link)))  # attach
    assert link.read_bytes() == data and daemon.backends()["old"]["NBVM"] == 1
    ok(daemon.tm2("detach", "old:vm-1/disk.0", str(link)))  # detach
    # the mount: the staging copy serves reads and writes, close pushes them back
    disk = daemon.mnt / "old" / "vm-1" / "disk.0"
    with open(disk, "r+b") as f:
        f.seek(MiB)
        f.write(b"X" * 4096)
    expected = data[:MiB] + b"X" * 4096 + data[MiB + 4096:]
    assert disk.read_bytes() == expected
    ok(daemon.tm2("delete", "old:base.img"))  # delete (DELETE)
    files = sorted(p.name for p in images.iterdir() if p.name != ".tm2fs-backend")  # not the marker
    assert len(files) == 2 and not any(".tmp-" in f for f in files)
    b = daemon.backends()["old"]
    assert (b["NBIMAGE"], b["NBVM"], b["STATE"]) == (2, 0, "READY")
    raw = hashlib.sha256(expected).hexdigest()
    assert any(hashlib.sha256((images / f).read_bytes()).hexdigest() == raw for f in files)


@pytest.mark.logs_ok
def test_a_failing_script_is_heard_and_a_hanging_one_stopped(daemon: Daemon, tmp_path: Path) -> None:
    grumpy = tmp_path / "grumpy-scripts"
    shutil.copytree(DEFAULT_SCRIPTS, grumpy)
    (grumpy / "shared" / "tm_clone.sh").write_text(
        "#!/bin/bash\necho 'ERROR MESSAGE --8<------' >&2\n"
        "echo 'the SAN said no: LUN 7 is fenced' >&2\necho 'ERROR MESSAGE ------>8--' >&2\nexit 1\n")
    images = legacy_backend(daemon, tmp_path, "grumpy", scripts=grumpy)
    ok(daemon.tm2("allocate", "grumpy:a.img", "1M"))
    refused = daemon.tm2("clone", "grumpy:a.img", "grumpy:b.img")
    assert refused.returncode == 1
    assert "the SAN said no: LUN 7 is fenced" in refused.stderr.decode()
    assert len(list(images.iterdir())) == 2 and daemon.backends()["grumpy"]["NBIMAGE"] == 1

    sleepy = tmp_path / "sleepy-scripts"
    shutil.copytree(DEFAULT_SCRIPTS, sleepy)
    (sleepy / "shared" / "tm_mkimage.sh").write_text("#!/bin/bash\nexec sleep 61\n")
    images = legacy_backend(daemon, tmp_path, "sleepy", scripts=sleepy, SCRIPT_TIMEOUT="2")
    start = time.monotonic()
    hung = daemon.tm2("allocate", "sleepy:y.img", "1M")
    assert hung.returncode == 1 and time.monotonic() - start < 20
    assert "timed out" in hung.stderr.decode()
    assert subprocess.run(["pgrep", "-f", "sleep 61"], capture_output=True).returncode == 1
    assert daemon.backends()["sleepy"]["NBIMAGE"] == 0
    assert os.listdir(images) == [".tm2fs-backend"]  # nothing half-made
    assert (daemon.mnt / "local").is_dir()  # the rest of the tree works


def test_shell_metacharacters_are_harmless(daemon: Daemon, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    evil = tmp_path / f"imgs $(touch {canary}); `touch {canary}`"
    legacy_backend(daemon, tmp_path, "evil", PATH=str(evil))
    name = "a;touch pwned-canary;$(touch pwned-canary) `touch pwned-canary`.img"  # no '/' in names
    ok(daemon.tm2("allocate", f"evil:{name}", "1M"))
    ok(daemon.tm2("clone", f"evil:{name}", "evil:copy 'quoted' \"too\".img"))
    (daemon.mnt / "evil" / name).write_bytes(b"data")
    assert (daemon.mnt / "evil" / name).read_bytes() == b"data"
    ok(daemon.tm2("delete", f"evil:{name}"))
    assert not canary.exists()
    for where in (tmp_path, Path.cwd(), daemon.state):  # a relative touch lands in some cwd
        assert not list(where.rglob("pwned-canary"))
    assert len(list(evil.iterdir())) == 2  # the image and the backend's marker


# ---------------------------------------------------------------------- old scripts on the mount


def script(name: str) -> str:
    return str(DEFAULT_SCRIPTS / "shared" / name)


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr.decode()}"
    return proc.stdout.decode()


def test_vm_folder_life_cycle_with_path_scripts_on_the_mount(daemon: Daemon, tmp_path: Path) -> None:
    """The classic shared TM's prolog and epilog, run unchanged with every path on the mount."""
    ok(daemon.backend_cli("create", "--name", "repo", "--tm", "dir", "--role", "REPOSITORY",
                          "--tm-raw", f"PATH={tmp_path}/repo"))
    mnt, host = daemon.mnt, "localhost"
    base = os.urandom(4 * MiB)
    (mnt / "repo" / "ubuntu.img").write_bytes(base)
    vm = mnt / "local" / "one-42"
    ctx = tmp_path / "context"
    ctx.mkdir()
    (ctx / "context.sh").write_text("HOSTNAME=vm42\n")
    (ctx / "id_rsa.pub").write_text("ssh-ed25519 AAAA test\n")
    # prolog
    run("mkdir", "-p", str(vm))
    run("chmod", "a+w", str(vm))
    run(script("tm_clone.sh"), f"{host}:{mnt}/repo/ubuntu.img", f"{host}:{vm}/disk.0")
    run(script("tm_ln.sh"), f"{host}:{mnt}/repo/ubuntu.img", f"{host}:{vm}/disk.1")
    run(script("tm_mkimage.sh"), "64", "ext4", f"{host}:{vm}/disk.2")
    run(script("tm_mkswap.sh"), "32", f"{host}:{vm}/disk.3")
    run(script("tm_context.sh"), str(ctx / "context.sh"), str(ctx / "id_rsa.pub"),
        f"{host}:{vm}/disk.4")
    run("dd", "if=/dev/zero", f"of={vm}/disk.5", "bs=1", "count=1", "seek=16M")
    run("cp", "-r", str(ctx), str(vm / "ctx-copy"))
    # checked file by file
    assert (vm / "disk.0").read_bytes() == base
    assert os.readlink(vm / "disk.1") == f"{mnt}/repo/ubuntu.img"
    assert (vm / "disk.1").read_bytes() == base
    assert run("blkid", "-o", "value", "-s", "TYPE", str(vm / "disk.2")).strip() == "ext4"
    assert (vm / "disk.2").stat().st_size == 64 * MiB
    run("e2fsck", "-n", "-f", str(vm / "disk.2"))
    assert run("blkid", "-o", "value", "-s", "TYPE", str(vm / "disk.3")).strip() == "swap"
    iso = run("isoinfo", "-f", "-J", "-i", str(vm / "disk.4"))
    assert "/context.sh" in iso and "/id_rsa.pub" in iso
    assert (vm / "disk.5").stat().st_size == 16 * MiB + 1
    assert (vm / "ctx-copy" / "context.sh").read_text() == "HOSTNAME=vm42\n"
    assert int(run("du", "-sm", str(vm)).split()[0]) >= 4
    b = daemon.backends()
    assert (b["local"]["NBIMAGE"], b["local"]["NBVM"]) == (7, 0)  # 5 disks + 2 context files
    assert (b["repo"]["NBIMAGE"], b["repo"]["NBVM"]) == (1, 1)  # the ln is an attachment
    # epilog: save disk.0 back to the repository (across backends), then delete the folder
    run(script("tm_mv.sh"), f"{host}:{vm}/disk.0", f"{host}:{mnt}/repo/saved-42.img")
    assert (mnt / "repo" / "saved-42.img").read_bytes() == base
    run(script("tm_delete.sh"), f"{host}:{vm}")
    assert not vm.exists()
    b = daemon.backends()
    assert (b["local"]["NBIMAGE"], b["local"]["NBVM"]) == (0, 0)
    assert (b["repo"]["NBIMAGE"], b["repo"]["NBVM"]) == (2, 0)
    assert os.listdir(daemon.state / "backends" / "local") == [".tm2fs-backend"]
