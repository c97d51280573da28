"""The `legacy` driver's own parts, with the real shipped script sets (shared and ssh, on localhost):
TM_RAW and action maps, the staging copy and its push, the scripts run directly, and hostile
cases: failing, hanging and partial scripts, shell metacharacters, a remote HOST. The contract
(allocate, data path, clone, capacity, keys) is test_driver_conformance.py, on both script sets."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import trio

from tm2fs.core import ROOT, Service
from tm2fs.drivers.base import Capacity
from tm2fs.drivers.legacy import DEFAULT_SCRIPTS, LegacyDriver, StagingHandle
from tm2fs.errors import BackendUnavailable, Exists, InvalidArgument, Tm2Error, Unsupported

MIB = 2**20
CONFS = ["tm_shared.conf", "tm_ssh.conf"]


def make_driver(state: Path, **raw: str) -> LegacyDriver:
    return LegacyDriver(LegacyDriver.validate(raw, state, "b"), state)


@pytest.fixture(params=CONFS)
async def driver(request: pytest.FixtureRequest, tmp_path: Path) -> LegacyDriver:
    d = make_driver(tmp_path / "state", TM_CONF=request.param, PATH=str(tmp_path / "images"))
    await d.start()
    return d


def script_set(tmp_path: Path, **scripts: str) -> Path:
    """A copy of the shipped script set with some shared/ scripts replaced by the given bodies."""
    root = tmp_path / "scripts"
    shutil.copytree(DEFAULT_SCRIPTS, root, symlinks=True)
    for name, body in scripts.items():
        path = root / "shared" / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    return root


def image(d: LegacyDriver, key: str) -> Path:
    return Path(d.root) / key


def staging_files(d: LegacyDriver) -> list[Path]:
    return sorted(p for p in d.staging.rglob("*") if p.is_file()) if d.staging.exists() else []


# -- validate


def test_validate_completes_the_defaults(tmp_path: Path) -> None:
    raw = LegacyDriver.validate({"path": str(tmp_path / "img")}, tmp_path, "b")
    assert raw == {"SCRIPTS": str(DEFAULT_SCRIPTS), "TM_CONF": "tm_shared.conf", "HOST": "localhost",
                   "PATH": str(tmp_path / "img"), "SCRIPT_TIMEOUT": "300"}
    assert (tmp_path / "img").is_dir()
    raw = LegacyDriver.validate({"PATH": str(tmp_path / "i2"), "TM_CONF": "tm_ssh.conf",
                                 "HOST": "127.0.0.1", "SCRIPT_TIMEOUT": "2.5"}, tmp_path, "b")
    assert raw["TM_CONF"] == "tm_ssh.conf" and raw["SCRIPT_TIMEOUT"] == "2.5"
    assert LegacyDriver(raw, tmp_path).actions["MKSWAP"] == DEFAULT_SCRIPTS / "ssh" / "tm_mkswap.sh"


def test_shipped_scripts_are_executable_and_mapped() -> None:
    for conf in CONFS:
        kind = conf[3:-5]
        text = (DEFAULT_SCRIPTS / conf).read_text()
        for action in ("CLONE", "LN", "MV", "DELETE", "MKIMAGE", "MKSWAP", "CONTEXT"):
            assert f"{action.ljust(7)} = {kind}/tm_{action.lower()}.sh" in text
            script = DEFAULT_SCRIPTS / kind / f"tm_{action.lower()}.sh"
            assert script.stat().st_mode & stat.S_IXUSR
            assert "set -eu" in script.read_text()


@pytest.mark.parametrize(("conf_text", "match"), [
    ("CLONE = shared/tm_clone.sh\nMV = shared/tm_mv.sh\nDELETE = shared/tm_delete.sh\n"
     "MKIMAGE = shared/nope.sh\n", "missing or not executable"),
    ("CLONE = ../outside.sh\nMV = shared/tm_mv.sh\nDELETE = shared/tm_delete.sh\n"
     "MKIMAGE = shared/tm_mkimage.sh\n", "outside SCRIPTS"),
    ("CLONE = shared/../../outside.sh\nMV = shared/tm_mv.sh\nDELETE = shared/tm_delete.sh\n"
     "MKIMAGE = shared/tm_mkimage.sh\n", "outside SCRIPTS"),
    ("CLONE = /bin/true\nMV = shared/tm_mv.sh\nDELETE = shared/tm_delete.sh\n"
     "MKIMAGE = shared/tm_mkimage.sh\n", "outside SCRIPTS"),
    ("CLONE = shared/tm_clone.sh\nMV = shared/tm_mv.sh\n", "no script for DELETE, MKIMAGE"),
    ("CLONE shared/tm_clone.sh\n", "not `ACTION = script`"),
])
def test_validate_refuses_bad_action_maps(tmp_path: Path, conf_text: str, match: str) -> None:
    root = script_set(tmp_path)
    outside = tmp_path / "outside.sh"
    outside.write_text("#!/bin/sh\n")
    outside.chmod(0o755)
    (root / "bad.conf").write_text("# a comment\n\n" + conf_text)
    with pytest.raises(InvalidArgument, match=match) as e:
        LegacyDriver.validate({"SCRIPTS": str(root), "TM_CONF": "bad.conf", "PATH": str(tmp_path / "i")},
                              tmp_path, "b")
    assert e.value.hint


def test_validate_refuses_a_script_that_is_not_executable(tmp_path: Path) -> None:
    root = script_set(tmp_path)
    (root / "shared" / "tm_mv.sh").chmod(0o644)
    with pytest.raises(InvalidArgument, match=r"tm_mv\.sh.*not executable"):
        LegacyDriver.validate({"SCRIPTS": str(root), "PATH": str(tmp_path / "i")}, tmp_path, "b")


@pytest.mark.parametrize("raw", [
    {"HOST": "h;touch x"}, {"HOST": "-oProxyCommand=x"}, {"HOST": "root@h"}, {"HOST": "h:22"},
    {"HOST": ""}, {"HOST": "h o"}, {"PATH": "relative/dir"}, {"PATH": "/"}, {"PATH": None},
    {"TM_CONF": "../tm_shared.conf"}, {"TM_CONF": "missing.conf"}, {"SCRIPTS": "relative"},
    {"SCRIPT_TIMEOUT": "soon"}, {"SCRIPT_TIMEOUT": "0"}, {"OTHER": "1"},
])
def test_validate_refuses(tmp_path: Path, raw: dict[str, str | None]) -> None:
    full = {"PATH": str(tmp_path / "i"), **raw}
    with pytest.raises(InvalidArgument):
        LegacyDriver.validate({k: v for k, v in full.items() if v is not None}, tmp_path, "b")


async def test_start_turns_missing_scripts_into_an_os_error(tmp_path: Path) -> None:
    root = script_set(tmp_path)
    d = make_driver(tmp_path, SCRIPTS=str(root), PATH=str(tmp_path / "i"))
    (root / "shared" / "tm_clone.sh").unlink()
    with pytest.raises(OSError, match=r"tm_clone\.sh"):
        await d.start()


# -- the actions, on both script sets


async def test_open_write_flush_close_round_trip(driver: LegacyDriver) -> None:
    await driver.allocate("k", 2 * MIB)
    h = await driver.open("k", writable=True)
    assert isinstance(h, StagingHandle)
    assert h.pread(0, 16) == b"\0" * 16
    data = os.urandom(100_000)
    assert h.pwrite(MIB - 10, data) == len(data)
    assert h.pwrite(0, b"head") == 4
    h.flush()  # the blocking variant
    expected = bytearray(2 * MIB)
    expected[MIB - 10:MIB - 10 + len(data)] = data
    expected[0:4] = b"head"
    assert image(driver, "k").read_bytes() == expected
    inode = os.stat(image(driver, "k")).st_ino
    assert await h.apwrite(5, b"tail") == 4
    await h.atruncate(3 * MIB)
    expected[5:9] = b"tail"
    expected.extend(bytes(MIB))
    assert image(driver, "k").read_bytes() != expected  # not pushed yet
    await h.aflush()
    assert image(driver, "k").read_bytes() == expected
    assert os.stat(image(driver, "k")).st_ino != inode  # replaced by a rename, not rewritten
    await h.apwrite(3 * MIB - 1, b"!")
    expected[-1:] = b"!"
    await h.aclose()
    assert image(driver, "k").read_bytes() == expected
    assert await driver.size("k") == 3 * MIB
    assert staging_files(driver) == []
    assert await driver.keys() == ["k"]  # no key.tmp-XXXX left behind
    r = await driver.open("k", writable=False)
    assert await r.apread(0, 9) == b"head\0tail"
    with pytest.raises(OSError):
        r.pwrite(0, b"x")
    inode = os.stat(image(driver, "k")).st_ino
    r.close()  # nothing changed: nothing pushed
    assert os.stat(image(driver, "k")).st_ino == inode
    assert staging_files(driver) == []


async def test_exit_status_17_is_exists_and_removes_nothing(driver: LegacyDriver) -> None:
    await driver.allocate("k", MIB)
    await driver.allocate("other", MIB)
    with pytest.raises(Exists, match="already exists"):
        await driver.allocate("k", MIB)
    with pytest.raises(Exists, match="already exists"):
        await driver.clone("k", "other")
    assert sorted(await driver.keys()) == ["k", "other"]


async def test_clone_reports_the_whole_size_as_progress(driver: LegacyDriver) -> None:
    await driver.allocate("src", 64 * MIB)
    done: list[int] = []
    await driver.clone("src", "dst", done.append)
    assert done == [64 * MIB]


async def test_clone_of_a_missing_image_fails_cleanly(driver: LegacyDriver) -> None:
    with pytest.raises(Tm2Error, match=r"CLONE script tm_clone.sh failed \(exit status 1\): source .*"
                                       r"nope does not exist") as e:
        await driver.clone("nope", "dst")
    assert "ERROR MESSAGE" not in e.value.message
    assert not image(driver, "dst").exists()
    with pytest.raises(Tm2Error, match="does not exist"):
        await driver.open("nope", writable=False)
    assert staging_files(driver) == [] and list(driver.staging.iterdir()) == []


async def test_monitor_reports_the_filesystem(driver: LegacyDriver) -> None:
    cap = await driver.monitor()
    st = os.statvfs(driver.root)
    assert cap.total == st.f_blocks * st.f_frsize


# -- failing and hanging scripts


async def test_a_failing_script_s_error_message_reaches_the_exception(tmp_path: Path) -> None:
    root = script_set(tmp_path, **{"tm_clone.sh": (
        'echo "some log line"\n'
        'echo "noise before" >&2\n'
        'printf "ERROR MESSAGE --8<------\\nthe array is on fire\\nsecond line\\n'
        'ERROR MESSAGE ------>8--\\n" >&2\n'
        "echo 'noise after' >&2\nexit 3\n")})
    d = make_driver(tmp_path / "state", SCRIPTS=str(root), PATH=str(tmp_path / "i"))
    await d.start()
    await d.allocate("src", MIB)
    with pytest.raises(Tm2Error) as e:
        await d.clone("src", "dst")
    assert e.value.message == ("legacy driver: CLONE script tm_clone.sh failed (exit status 3): "
                               "the array is on fire\nsecond line")
    assert "tm_clone.sh" in (e.value.hint or "")


async def test_without_markers_the_last_stderr_lines_are_the_message(tmp_path: Path) -> None:
    body = "".join(f"echo 'line {i}' >&2\n" for i in range(10)) + "exit 2\n"
    root = script_set(tmp_path, **{"tm_mkimage.sh": body})
    d = make_driver(tmp_path / "state", SCRIPTS=str(root), PATH=str(tmp_path / "i"))
    with pytest.raises(Tm2Error, match=r"MKIMAGE script tm_mkimage.sh failed \(exit status 2\): "
                                       r"line 5\nline 6\nline 7\nline 8\nline 9$"):
        await d.allocate("k", MIB)


async def test_a_failed_clone_leaves_no_partial_file(tmp_path: Path) -> None:
    # writes half a copy, then fails: the driver's DELETE (the real script) removes it
    root = script_set(tmp_path, **{"tm_clone.sh": (
        'head -c 1000 "${1#*:}" > "${2#*:}"\n'
        'printf "ERROR MESSAGE --8<------\\ndisk full\\nERROR MESSAGE ------>8--\\n" >&2\nexit 1\n')})
    d = make_driver(tmp_path / "state", SCRIPTS=str(root), PATH=str(tmp_path / "i"))
    await d.start()
    await d.allocate("src", MIB)
    with pytest.raises(Tm2Error, match="disk full"):
        await d.clone("src", "dst")
    assert not image(d, "dst").exists()
    assert await d.keys() == ["src"]


async def test_a_failed_push_keeps_the_changes_and_the_image(tmp_path: Path) -> None:
    # CLONE works from the image (open) but not towards it (push): the image stays whole
    root = script_set(tmp_path, **{"tm_clone.sh": (
        'case "$2" in *.tmp-*) head -c 10 "${1#*:}" > "${2#*:}"; echo "ERROR MESSAGE --8<------" >&2;'
        ' echo "read-only target" >&2; echo "ERROR MESSAGE ------>8--" >&2; exit 1;; esac\n'
        'cp -- "${1#*:}" "${2#*:}"\n')})
    d = make_driver(tmp_path / "state", SCRIPTS=str(root), PATH=str(tmp_path / "i"))
    await d.start()
    await d.allocate("k", MIB)
    h = await d.open("k", writable=True)
    h.pwrite(0, b"precious")
    with pytest.raises(Tm2Error, match="read-only target"):
        await h.aflush()
    with pytest.raises(Tm2Error, match=r"read-only target \(the unsaved image is kept in (.*)\)") as e:
        await h.aclose()
    kept = Path(e.value.message.rsplit("kept in ", 1)[1].rstrip(")"))
    assert kept.read_bytes()[:8] == b"precious"
    assert image(d, "k").read_bytes() == bytes(MIB)
    assert await d.keys() == ["k"]  # the partial key.tmp-XXXX was deleted


def sleepers(tag: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if tag.encode() in cmdline:
                found.append(int(entry.name))
    return found


async def test_a_hanging_script_is_killed_by_script_timeout(tmp_path: Path) -> None:
    tag = f"30.{uuid.uuid4().int % 10**9:09d}"
    # a child in the background and one in the foreground: the whole process group must die
    root = script_set(tmp_path, **{"tm_clone.sh": f"sleep {tag} &\nsleep {tag}\nwait\n"})
    d = make_driver(tmp_path / "state", SCRIPTS=str(root), PATH=str(tmp_path / "i"), SCRIPT_TIMEOUT="1")
    await d.start()
    await d.allocate("src", MIB)
    started = time.monotonic()
    with pytest.raises(OSError, match=r"CLONE script tm_clone.sh timed out after 1s") as e:
        await d.clone("src", "dst")
    assert e.value.errno == errno.ETIMEDOUT  # a backend fault: the service turns the backend ERROR
    assert time.monotonic() - started < 5
    for _ in range(50):
        if not sleepers(tag):
            break
        await trio.sleep(0.05)
    assert sleepers(tag) == []
    assert await d.keys() == ["src"]


def test_a_hanging_push_from_the_blocking_flush_is_killed_too(tmp_path: Path) -> None:
    tag = f"32.{uuid.uuid4().int % 10**9:09d}"
    root = script_set(tmp_path, **{"tm_mv.sh": f"sleep {tag} &\nsleep {tag}\n"})
    d = make_driver(tmp_path / "state", SCRIPTS=str(root), PATH=str(tmp_path / "i"), SCRIPT_TIMEOUT="1")
    trio.run(d.allocate, "k", MIB)
    h = trio.run(d.open, "k", True)
    h.pwrite(0, b"x")
    started = time.monotonic()
    with pytest.raises(OSError, match=r"MV script tm_mv.sh timed out after 1s") as e:
        h.flush()
    assert e.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - started < 5
    assert sleepers(tag) == []
    h.truncate(0)
    with pytest.raises(OSError, match=r"timed out after 1s.* unsaved image is kept in") as e:
        h.close()
    assert e.value.errno == errno.ETIMEDOUT
    assert image(d, "k").read_bytes() == bytes(MIB)
    assert sorted(os.listdir(d.root)) == ["k"]


@pytest.mark.logs_ok  # the backend's turn to ERROR is logged
async def test_a_script_timeout_turns_the_backend_to_error(service: Service, tmp_path: Path) -> None:
    tag = f"33.{uuid.uuid4().int % 10**9:09d}"
    root = script_set(tmp_path, **{"tm_clone.sh": f"sleep {tag}\n"})  # open stages with CLONE
    await service.create_backend(ROOT, {"NAME": "slow", "TM": "legacy", "TIMEOUT": 30, "TM_RAW": {
        "SCRIPTS": str(root), "PATH": str(tmp_path / "slow"), "SCRIPT_TIMEOUT": "1"}})
    await service.allocate("slow:a.img", "1M", ROOT)
    with pytest.raises(BackendUnavailable, match=r"CLONE script tm_clone.sh timed out after 1s") as e:
        await service.open_address("slow:a.img", ROOT, writable=False)
    assert e.value.errno == errno.EIO
    b = await service.backend_info("slow")
    assert b["STATE"] == "ERROR" and "timed out after 1s" in b["ERROR"]
    with pytest.raises(BackendUnavailable, match="is in ERROR") as e:  # its files answer EIO now
        await service.open_address("slow:a.img", ROOT, writable=False)
    assert e.value.errno == errno.EIO
    assert sleepers(tag) == []


async def test_a_cancelled_script_is_killed_too(tmp_path: Path) -> None:
    tag = f"31.{uuid.uuid4().int % 10**9:09d}"
    root = script_set(tmp_path, **{"tm_mkimage.sh": f"sleep {tag} &\nsleep {tag}\n"})
    d = make_driver(tmp_path / "state", SCRIPTS=str(root), PATH=str(tmp_path / "i"))
    with trio.move_on_after(0.5) as scope:
        await d.allocate("k", MIB)
    assert scope.cancelled_caught
    for _ in range(50):
        if not sleepers(tag):
            break
        await trio.sleep(0.05)
    assert sleepers(tag) == []


# -- shell metacharacters


@pytest.mark.parametrize("conf", CONFS)
async def test_shell_metacharacters_in_keys_and_paths_are_harmless(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conf: str) -> None:
    monkeypatch.chdir(tmp_path)  # where relative `touch pwned-...` payloads would land
    mark = f"pwned-{uuid.uuid4().hex[:8]}"
    payloads = [f"$(touch {mark}-1)", f"`touch {mark}-2`", f";touch {mark}-3;", f"|touch {mark}-4",
                f"&& touch {mark}-5 &&", f"'\"$(touch {mark}-6)\"'", "*", "-rf", " space ", "a\\b"]
    base = tmp_path / f"images {payloads[0]} {payloads[1]}"
    d = make_driver(tmp_path / "state", TM_CONF=conf, PATH=str(base))
    await d.start()
    for i, key in enumerate(payloads):
        await d.allocate(key, MIB + i)
        h = await d.open(key, writable=True)
        h.pwrite(0, key.encode())
        await h.aclose()
        assert await d.size(key) == MIB + i
        await d.clone(key, key + ".c")
        assert image(d, key + ".c").read_bytes()[:len(key.encode())] == key.encode()
    assert sorted(await d.keys()) == sorted(payloads + [k + ".c" for k in payloads])
    for key in payloads:
        await d.delete(key)
        await d.delete(key + ".c")
    assert await d.keys() == []
    assert base.is_dir()  # `*` and `-rf` removed nothing else
    leaked = [p for p in tmp_path.rglob(f"*{mark}*") if not str(p).startswith(str(base))]
    assert leaked == [] and not list(Path("/tmp").glob(f"{mark}*"))


# -- a remote HOST (ssh replaced by a fake that runs the command line through a POSIX shell)


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`ssh [-o OPT]... HOST -- WORDS...`: joins WORDS with spaces and runs them with dash, as sshd's
    login shell would; each HOST is logged."""
    log = tmp_path / "ssh.log"
    fake = tmp_path / "fake-ssh"
    fake.write_text('#!/bin/sh\nwhile [ "$1" = -o ]; do shift 2; done\n'
                    f'echo "$1" >> "{log}"\nshift\n[ "$1" = -- ] && shift\nexec sh -c "$*"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("SSH", str(fake))
    return log


async def test_a_remote_host_through_ssh(tmp_path: Path, fake_ssh: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "remote $(touch pwned-r1) `touch pwned-r2`"
    d = make_driver(tmp_path / "state", TM_CONF="tm_ssh.conf", HOST="storage-1.example", PATH=str(base))
    assert not base.exists()  # validate does not create a remote PATH
    await d.start()
    await d.allocate("k", MIB + 1)
    assert os.stat(base / "k").st_size == 2 * MIB  # rounded up to whole MiB on a remote host
    h = await d.open("k", writable=True)
    h.pwrite(7, b"remote")
    await h.aclose()
    await d.clone("k", "c")
    assert (base / "c").read_bytes()[:13] == b"\0" * 7 + b"remote"
    await d.delete("k")
    assert not (base / "k").exists()
    assert set(fake_ssh.read_text().split()) == {"storage-1.example"}
    with pytest.raises(Unsupported, match="size needs a local HOST"):
        await d.size("c")
    with pytest.raises(Unsupported):
        await d.resize("c", MIB)
    assert await d.monitor() == Capacity(None, None, None)
    assert await d.keys() is None and d.local_path("c") is None
    assert not list(tmp_path.rglob("pwned-*"))


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DEFAULT_SCRIPTS / script), *args], capture_output=True, text=True,
                          env=env, check=False)


def test_ssh_scripts_copy_and_move_between_two_remote_hosts(tmp_path: Path, fake_ssh: Path) -> None:
    d = tmp_path / "a b $(touch x) ; 'q'"
    d.mkdir()
    (d / "src").write_bytes(b"data" + bytes(3 * MIB) + b"end")
    assert run("ssh/tm_clone.sh", f"h1:{d}/src", f"h2:{d}/dst").returncode == 0
    assert (d / "dst").read_bytes() == (d / "src").read_bytes()
    assert run("ssh/tm_mv.sh", f"h2:{d}/dst", f"h3:{d}/moved").returncode == 0
    assert not (d / "dst").exists() and (d / "moved").read_bytes() == (d / "src").read_bytes()
    assert run("ssh/tm_ln.sh", f"h3:{d}/moved", f"h3:{d}/link").returncode == 0
    assert os.readlink(d / "link") == f"{d}/moved"
    assert set(fake_ssh.read_text().split()) == {"h1", "h2", "h3"}
    bad = run("ssh/tm_delete.sh", f"-oProxyCommand=touch {tmp_path}/owned:{d}/moved")
    assert bad.returncode == 1 and "invalid host name" in bad.stderr
    assert (d / "moved").exists() and not (tmp_path / "owned").exists()
    assert not (tmp_path / "x").exists()


# -- the scripts run directly: mkimage, mkswap, context


@pytest.mark.parametrize("kind", ["shared", "ssh"])
def test_mkimage_and_mkswap_scripts(tmp_path: Path, kind: str) -> None:
    raw = tmp_path / "dir with space" / "raw.img"
    r = run(f"{kind}/tm_mkimage.sh", "5", "raw", f"localhost:{raw}")
    assert r.returncode == 0, r.stderr
    assert os.stat(raw).st_size == 5 * MIB and os.stat(raw).st_blocks == 0
    r = run(f"{kind}/tm_mkimage.sh", "5", "raw", f"localhost:{raw}")
    assert r.returncode == 17 and "already exists" in r.stderr
    for bad in (["5M", "raw"], ["5", "zfs"], ["-1", "raw"]):
        r = run(f"{kind}/tm_mkimage.sh", *bad, f"localhost:{tmp_path}/bad.img")
        assert r.returncode == 1 and r.stderr.startswith("ERROR MESSAGE --8<------\n")
        assert r.stderr.endswith("ERROR MESSAGE ------>8--\n") and not (tmp_path / "bad.img").exists()
    swap = tmp_path / "swap $(x).img"
    r = run(f"{kind}/tm_mkswap.sh", "4", f"localhost:{swap}")
    assert r.returncode == 0, r.stderr
    assert os.stat(swap).st_size == 4 * MIB
    if shutil.which("blkid"):
        kind_of = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(swap)],
                                 capture_output=True, text=True, check=False).stdout.strip()
        assert kind_of == "swap"
    else:
        out = subprocess.run(["file", str(swap)], capture_output=True, text=True, check=True).stdout
        assert "swap file" in out


ISO_TOOL = shutil.which("genisoimage") or shutil.which("mkisofs")


@pytest.mark.skipif(ISO_TOOL is None, reason="neither genisoimage nor mkisofs is installed")
@pytest.mark.parametrize("kind", ["shared", "ssh"])
def test_context_script_builds_an_iso(tmp_path: Path, kind: str) -> None:
    files = {"context.sh": b"ONE=1\n", "init $(x).sh": b"#!/bin/sh\necho hi\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    iso = tmp_path / "out dir" / "disk.1"
    r = run(f"{kind}/tm_context.sh", *[str(tmp_path / n) for n in files], f"localhost:{iso}")
    assert r.returncode == 0, r.stderr
    head = iso.read_bytes()[32768:32768 + 6]
    assert head == b"\x01CD001"  # an ISO 9660 primary volume descriptor
    assert iso.read_bytes()[32768 + 40:32768 + 47] == b"CONTEXT"
    if shutil.which("isoinfo"):
        for name, data in files.items():
            out = subprocess.run(["isoinfo", "-J", "-i", str(iso), "-x", f"/{name}"],
                                 capture_output=True, check=True).stdout
            assert out == data
    else:
        blob = iso.read_bytes()
        assert all(data in blob for data in files.values())
    r = run(f"{kind}/tm_context.sh", str(tmp_path / "missing"), f"localhost:{tmp_path}/other.iso")
    assert r.returncode == 1 and "missing does not exist" in r.stderr
    assert not (tmp_path / "other.iso").exists()


@pytest.mark.parametrize("kind", ["shared", "ssh"])
def test_context_script_says_clearly_when_no_iso_tool_is_installed(tmp_path: Path, kind: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "basename", "dirname", "mktemp", "mkdir", "rm", "cp", "test", "hostname", "cat"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    (tmp_path / "f").write_text("x")
    r = run(f"{kind}/tm_context.sh", str(tmp_path / "f"), f"localhost:{tmp_path}/ctx.iso",
            env={"PATH": str(bin_dir)})
    assert r.returncode == 1
    assert ("ERROR MESSAGE --8<------\nneither genisoimage nor mkisofs is installed "
            "(Debian: apt-get install genisoimage)\nERROR MESSAGE ------>8--\n") in r.stderr
    assert not (tmp_path / "ctx.iso").exists()
