"""The `iscsi` driver's own parts, against a real userspace target (tgtd) and libiscsi's userspace
initiator: TM_RAW, keys, targets and LUN sizes, exact image sizes, sessions, an independent client,
ssh, a target that stops and restarts. The contract (allocate, data path, clone, capacity, keys)
is test_driver_conformance.py.

One tgtd serves the module (each test has its own IQN_PREFIX and STORE); the fault test starts its
own, to stop and restart it. Independent clients check what the driver's sessions wrote: qemu-io /
qemu-img over `iscsi://` (qemu's iscsi block driver, Debian's qemu-block-extra) and libiscsi-bin's
iscsi-readcapacity16. The LIO path cannot run here (no configfs): only its refusal is tested.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.servers.tgt import TgtServer
from tm2fs.drivers.iscsi import (
    IscsiDriver,
    LioTargets,
    Runner,
    Settings,
    check_key,
    parse_tgt_show,
)
from tm2fs.errors import InvalidArgument

pytestmark = [pytest.mark.iscsi, pytest.mark.slow]

MIB = 2**20
TIMEOUT = 3.0
_prefixes = itertools.count(1)


def key() -> str:
    return os.urandom(16).hex()


@pytest.fixture(scope="module")
def tgt() -> Iterator[TgtServer]:
    with TgtServer() as server:
        yield server


def raw_for(server: TgtServer, store: Path, **extra: str) -> dict[str, str]:
    raw = {"PORTAL": server.portal, "STORE": str(store), "TGT_CONTROL": str(server.control),
           "IQN_PREFIX": f"iqn.2026-11.org.tm2fs:t{os.getpid()}-{next(_prefixes)}", "TIMEOUT": f"{TIMEOUT:g}"}
    raw.update(extra)
    return raw


async def make_driver(raw: dict[str, str], tmp_path: Path) -> IscsiDriver:
    driver = IscsiDriver(IscsiDriver.validate(raw, tmp_path, "b"), tmp_path)
    await driver.start()
    return driver


@pytest.fixture
async def driver(tgt: TgtServer, tmp_path: Path) -> AsyncIterator[IscsiDriver]:
    d = await make_driver(raw_for(tgt, tmp_path / "store"), tmp_path)
    yield d
    await d.stop()
    assert d.sessions() == 0, "a test leaked initiator sessions"
    for k in await d.keys():
        await d.delete(k)


def targets_of(server: TgtServer, driver: IscsiDriver) -> dict[str, dict[int, str]]:
    """What tgtd says it has under the driver's IQN_PREFIX: name -> {lun: backing path}."""
    shown = parse_tgt_show(server.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "show"))
    return {t.name: t.luns for t in shown if t.name.startswith(driver.s.prefix + ":")}


def url(driver: IscsiDriver, k: str) -> str:
    return f"iscsi://{driver.s.portal}/{driver.s.iqn(k)}/1"


def readcapacity(driver: IscsiDriver, k: str) -> int:
    """The LUN's size as libiscsi-bin's iscsi-readcapacity16 (another initiator) sees it."""
    out = subprocess.run(["iscsi-readcapacity16", url(driver, k)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return int(re.search(r"Total size:(\d+)", out).group(1))


def qemu_has_iscsi() -> bool:
    """qemu-img/qemu-io load their iscsi driver from a module (Debian's qemu-block-extra)."""
    return bool(shutil.which("qemu-io") and shutil.which("qemu-img")
                and list(Path("/usr/lib").glob("*/qemu/block-iscsi.so")))


# ------------------------------------------------------------------------------ bad input


def test_validate_refuses_bad_tm_raw(tmp_path: Path) -> None:
    good = {"PORTAL": "127.0.0.1:3260", "STORE": str(tmp_path / "s")}
    assert IscsiDriver.validate(good, tmp_path, "b")["TGT_CONTROL"] == "0"
    assert (tmp_path / "s").is_dir()  # a local STORE is made
    assert IscsiDriver.validate({**good, "PORTAL": "target.example"}, tmp_path, "b")["PORTAL"] == \
        "target.example:3260"
    bad = [
        ({"STORE": "/x"}, "PORTAL is required"),
        ({**good, "PORTAL": "127.0.0.1:0"}, "out of range"),
        ({**good, "PORTAL": "127.0.0.1:99999"}, "out of range"),
        ({**good, "PORTAL": "-oProxyCommand=x:1"}, "not host:port"),
        ({"PORTAL": "h:1"}, "STORE is required"),
        ({**good, "STORE": "relative/dir"}, "not a plain absolute path"),
        ({**good, "STORE": "/"}, "not a plain absolute path"),
        ({**good, "STORE": "/a b"}, "not a plain absolute path"),
        ({**good, "STORE": "/a,path=/etc/passwd"}, "not a plain absolute path"),
        ({**good, "IQN_PREFIX": "not-an-iqn"}, "not an iSCSI qualified name"),
        ({**good, "TARGET_MANAGER": "scst"}, "neither tgt nor lio"),
        ({**good, "TGT_CONTROL": "-1"}, "TGT_CONTROL"),
        ({**good, "SSH": "-oProxyCommand=touch /tmp/x"}, "not user@host"),
        ({**good, "TIMEOUT": "0"}, "TIMEOUT"),
        ({**good, "TIMEOUT": "soon"}, "TIMEOUT"),
        ({**good, "INITIATORS": "iqn.x;reboot"}, "INITIATORS"),
        ({**good, "COLOR": "blue"}, "unknown TM_RAW"),
    ]
    for raw, message in bad:
        with pytest.raises(InvalidArgument, match=message) as e:
            IscsiDriver.validate(raw, tmp_path, "b")
        assert e.value.hint, raw


def test_keys_must_be_32_hex() -> None:
    assert check_key("0" * 32) == "0" * 32
    for bad in ("", "../" + "0" * 29, "0" * 31, "0" * 33, "A" * 32, "-" + "0" * 31, "0" * 31 + ";",
                "$(reboot)", "0" * 16 + "/" + "0" * 15):
        with pytest.raises(InvalidArgument, match="invalid image key"):
            check_key(bad)


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`ssh` that behaves as OpenSSH does with a command (joins the words with spaces and hands them
    to the remote user's shell), but runs it here; every call is logged."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "ssh-calls"
    script = bindir / "ssh"
    script.write_text(f"""#!/bin/sh
printf '%s\\n' "$*" >> {calls}
while [ $# -gt 0 ]; do
  case "$1" in -o) shift 2;; --) shift; break;; -*) shift;; *) shift;; esac
done
exec sh -c "$*"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return calls


async def test_shell_metacharacters_are_harmless(tgt: TgtServer, tmp_path: Path, fake_ssh: Path) -> None:
    canary = tmp_path / "canary"
    evil = f"$(touch {canary});touch {canary}`touch {canary}`"
    base = raw_for(tgt, tmp_path / "store")
    for name in ("PORTAL", "STORE", "IQN_PREFIX", "SSH", "TGT_CONTROL", "TIMEOUT", "INITIATORS"):
        with pytest.raises(InvalidArgument):
            IscsiDriver.validate({**base, name: evil}, tmp_path, "b")
    d = await make_driver(base, tmp_path)
    for k in (evil, f"../{canary.name}", "0" * 31 + "'"):
        for call in (d.allocate(k, MIB), d.delete(k), d.size(k), d.resize(k, MIB), d.open(k, True),
                     d.clone("0" * 32, k), d.attach(k, "h", "/p")):
            with pytest.raises(InvalidArgument):
                await call
    # words that reach a remote shell through ssh are quoted: they arrive as they were sent
    out = await Runner("root@localhost", 10).run(["echo", evil, "a  b"])
    assert out == f"{evil} a  b\n"
    assert not canary.exists()
    assert fake_ssh.read_text().count("\n") == 1
    assert os.listdir(tmp_path / "store") == []


async def test_wrong_portal_gives_a_clear_error_fast(tgt: TgtServer, tmp_path: Path) -> None:
    with socket_port() as port:
        pass  # nothing listens there now
    d = IscsiDriver(IscsiDriver.validate(raw_for(tgt, tmp_path / "s", PORTAL=f"127.0.0.1:{port}"),
                                         tmp_path, "b"), tmp_path)
    t0 = time.monotonic()
    with pytest.raises(OSError, match=f"PORTAL 127.0.0.1:{port}.*refused") as e:
        await d.start()
    assert e.value.errno == errno.ECONNREFUSED
    assert time.monotonic() - t0 < 2
    # the portal answers but no tgtd has that control number
    d = IscsiDriver(IscsiDriver.validate(raw_for(tgt, tmp_path / "s", TGT_CONTROL=str(tgt.control + 1000)),
                                         tmp_path, "b"), tmp_path)
    with pytest.raises(OSError, match="tgtd does not answer") as e:
        await d.start()
    assert e.value.errno == errno.ECONNREFUSED
    # an image that does not exist; one whose target was removed behind the driver's back
    d = await make_driver(raw_for(tgt, tmp_path / "s"), tmp_path)
    with pytest.raises(FileNotFoundError):
        await d.open(key(), False)
    k = key()
    await d.allocate(k, MIB)
    [t] = [t for t in parse_tgt_show(tgt.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "show"))
           if t.name == d.s.iqn(k)]
    tgt.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "delete", "--force", "--tid", str(t.tid))
    with pytest.raises(OSError, match=r"login to .* failed"):
        await d.open(k, False)
    assert d.sessions() == 0
    await d.start()  # puts the target back
    h = await d.open(k, False)
    await h.aclose()
    await d.delete(k)


class socket_port:
    """A port that was free a moment ago."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_lio_without_configfs_is_refused_clearly(tmp_path: Path) -> None:
    raw = {"PORTAL": "127.0.0.1:3260", "STORE": str(tmp_path / "s"), "TARGET_MANAGER": "lio"}
    if os.path.isdir("/sys/kernel/config/target"):
        pytest.skip("this machine has LIO; the refusal is for machines without it")
    with pytest.raises(InvalidArgument, match=r"rtslib-fb|LIO target") as e:
        IscsiDriver.validate(raw, tmp_path, "b")
    assert "tgt" in e.value.hint
    with pytest.raises(InvalidArgument, match="cannot be used over SSH"):
        IscsiDriver.validate({**raw, "SSH": "root@target"}, tmp_path, "b")
    lio = LioTargets(Settings.parse(raw), trio.CapacityLimiter(1))
    with pytest.raises(OSError, match=r"rtslib-fb|configfs") as err:
        lio._lib()
    assert err.value.errno == errno.ENODEV


async def test_lio_driver_start_fails_with_enodev(tmp_path: Path) -> None:
    if os.path.isdir("/sys/kernel/config/target"):
        pytest.skip("this machine has LIO")
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        d = IscsiDriver({"PORTAL": f"127.0.0.1:{port}", "STORE": str(tmp_path), "TARGET_MANAGER": "lio"},
                        tmp_path)
        with pytest.raises(OSError) as e:
            await d.start()
    assert e.value.errno == errno.ENODEV


def test_parse_tgt_show() -> None:
    text = """Target 3: iqn.2026-11.org.tm2fs:0123456789abcdef0123456789abcdef
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 1
            Initiator: iqn.x alias: none
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
        LUN: 1
            Type: disk
            Size: 1 MB, Block size: 512
            Backing store path: /srv/store/0123456789abcdef0123456789abcdef
    Account information:
    ACL information:
        ALL
Target 4: iqn.other:x
    LUN information:
        LUN: 0
"""
    a, b = parse_tgt_show(text)
    assert (a.tid, a.nexus, a.acl) == (3, 1, ["ALL"])
    assert a.luns == {0: "", 1: "/srv/store/0123456789abcdef0123456789abcdef"}
    assert (b.tid, b.name, b.luns) == (4, "iqn.other:x", {0: ""})


# ------------------------------------------------------------------------------ the actions


async def test_monitor_is_the_store_filesystem(driver: IscsiDriver) -> None:
    cap = await driver.monitor()
    st = os.statvfs(driver.s.store)
    assert cap.total == st.f_blocks * st.f_frsize and cap.free and cap.used == 0


async def test_targets_and_luns_follow_allocate_resize_delete(driver: IscsiDriver, tgt: TgtServer) -> None:
    k = key()
    await driver.allocate(k, 8 * MIB)
    path = os.path.join(driver.s.store, k)
    assert os.stat(path).st_blocks == 0
    assert targets_of(tgt, driver) == {driver.s.iqn(k): {0: "", 1: path}}
    assert readcapacity(driver, k) == 8 * MIB
    h = await driver.open(k, False)  # a session stays open across the resizes
    await driver.resize(k, 16 * MIB)
    assert readcapacity(driver, k) == 16 * MIB
    assert await h.refresh() == 16 * MIB
    await driver.resize(k, 4 * MIB + 100)  # the LUN has whole blocks; the image its exact size
    assert await driver.size(k) == 4 * MIB + 100
    assert readcapacity(driver, k) == 4 * MIB + 512
    await h.aclose()
    await driver.delete(k)
    assert targets_of(tgt, driver) == {}
    assert os.listdir(driver.s.store) == []


def round_up512(n: int) -> int:
    return -(-n // 512) * 512


async def test_sizes_are_exact_bytes(driver: IscsiDriver) -> None:
    """LUNs have whole 512-byte blocks, images keep their exact byte size (through a size record)."""
    k, c = key(), key()
    await driver.allocate(k, 1000)
    assert await driver.size(k) == 1000 and readcapacity(driver, k) == 1024
    h = await driver.open(k, True)
    assert await h.apread(0, 4096) == bytes(1000)  # reads stop at the image's end
    await h.apwrite(1400, b"y" * 200)  # past the end: the LUN grows, the image follows at flush
    assert await driver.size(k) == 1000  # not yet made durable
    await h.aflush()
    assert await driver.size(k) == 1600 and readcapacity(driver, k) == 2048
    assert os.path.getsize(os.path.join(driver.s.store, k)) == round_up512(1600)  # the LUN cut back
    await h.apwrite(1590, b"z" * 15)  # inside the last block: only the recorded size changes
    await h.aclose()
    assert await driver.size(k) == 1605
    done: list[int] = []
    await driver.clone(k, c, done.append)
    assert done == [1605]  # the whole size, once
    assert await driver.size(c) == 1605
    h = await driver.open(c, False)
    assert await h.apread(0, 4096) == bytes(1400) + b"y" * 190 + b"z" * 15
    await h.aclose()
    await driver.resize(k, 2048)  # whole blocks: no record needed
    assert await driver.size(k) == 2048
    assert sorted(await driver.keys()) == sorted([k, c])
    await driver.delete(k)
    await driver.delete(c)
    assert os.listdir(driver.s.store) == []


@pytest.mark.skipif(not qemu_has_iscsi(), reason="qemu's iscsi block driver (qemu-block-extra) is missing")
async def test_an_independent_client_sees_the_same_bytes(driver: IscsiDriver, tmp_path: Path) -> None:
    k = key()
    await driver.allocate(k, 4 * MIB)
    h = await driver.open(k, True)
    await h.apwrite(MIB, b"\xab" * 65536)
    data = os.urandom(3 * MIB)
    await h.apwrite(MIB + 65536, data[:MIB])
    await h.aflush()
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", f"read -P 0xab {MIB} 65536", url(driver, k)],
                         capture_output=True, text=True, timeout=60)
    assert "read 65536/65536 bytes" in out.stdout and "fail" not in out.stdout + out.stderr, out
    local = tmp_path / "expected.img"
    with open(local, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(MIB)
        f.write(b"\xab" * 65536 + data[:MIB])
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(local), url(driver, k)],
                             capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0, compare
    # and the other way: what qemu writes, the driver's session reads
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xcd 512 1024", url(driver, k)],
                   capture_output=True, check=True, timeout=60)
    assert await h.apread(0, 2048) == bytes(512) + b"\xcd" * 1024 + bytes(512)
    await h.aclose()


async def test_requests_are_in_flight_together_on_one_session(driver: IscsiDriver, tgt: TgtServer) -> None:
    """32 reads issued at once are all on the wire before the target answers the first (tgtd held
    with SIGSTOP), and each gets its own bytes: queue depth reaches the target."""
    k = key()
    await driver.allocate(k, 4 * MIB)
    h = await driver.open(k, True)
    data = os.urandom(4 * MIB)
    await h.apwrite(0, data)
    got: dict[int, bytes] = {}

    async def read(i: int) -> None:
        got[i] = await h.apread(i * 68 * 1024, 4096)

    os.kill(tgt.process.pid, signal.SIGSTOP)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(read, i)
            await trio.testing.wait_all_tasks_blocked()
            assert len(h.pipeline.commands) == 32
            os.kill(tgt.process.pid, signal.SIGCONT)
    finally:
        os.kill(tgt.process.pid, signal.SIGCONT)
    assert got == {i: data[i * 68 * 1024:i * 68 * 1024 + 4096] for i in range(32)}
    await h.aclose()


async def test_a_command_failing_as_it_is_sent_fails_its_caller(driver: IscsiDriver) -> None:
    """A socket that breaks as a command goes out (here: its sending side shut) fails that
    command inside the very call that sends it; the caller gets EIO at once, not a wait for an
    answer that never comes, and the next call logs in again."""
    k = key()
    await driver.allocate(k, MIB)
    h = await driver.open(k, True)
    await h.apwrite(0, b"kept" * 128)
    with socket.socket(fileno=os.dup(h.pipeline.fd)) as sock:
        sock.shutdown(socket.SHUT_WR)
    with trio.fail_after(5), pytest.raises(OSError) as e:
        await h.apread(0, 4096)
    assert e.value.errno == errno.EIO
    assert await h.apread(0, 512) == b"kept" * 128
    await h.aclose()


async def test_writes_sharing_a_block_all_land(driver: IscsiDriver) -> None:
    """Unaligned writes read-modify-write their edge blocks; issued together (as the kernel sends
    a buffered writer's requests), none undoes another, and aligned writes beside them land too."""
    k = key()
    await driver.allocate(k, MIB)
    h = await driver.open(k, True)
    pieces = {off: os.urandom(7) for off in range(3, 2048, 8)}  # 256 writes in 4 blocks
    aligned = {off: os.urandom(4096) for off in range(8192, 8192 * 8, 8192)}
    async with trio.open_nursery() as nursery:
        for off, b in [*pieces.items(), *aligned.items()]:
            nursery.start_soon(h.apwrite, off, b)
    image = bytearray(await h.apread(0, 8192 * 8))
    for off, b in [*pieces.items(), *aligned.items()]:
        assert image[off:off + len(b)] == b, off
    await h.aclose()


async def test_sessions_are_counted_and_none_leak(driver: IscsiDriver) -> None:
    k1, k2 = key(), key()
    await driver.allocate(k1, MIB)
    await driver.allocate(k2, MIB)
    handles = [await driver.open(k1, True), await driver.open(k1, False), await driver.open(k2, True)]
    assert driver.sessions() == 3
    await driver.attach(k1, "hv1", "/vm/1/disk.0")
    await driver.attach(k1, "hv1", "/vm/1/disk.0")  # the same attachment once
    await driver.attach(k2, "hv1", "/vm/2/disk.0")
    assert driver.sessions() == 5
    for h in handles:
        await h.aclose()
    await handles[0].aclose()  # twice is harmless
    await driver.detach(k1, "hv1", "/vm/1/disk.0")
    await driver.detach(k1, "hv1", "/vm/1/disk.0")
    assert driver.sessions() == 1
    await driver.stop()  # logs out what is still attached
    assert driver.sessions() == 0
    with pytest.raises(OSError):
        await handles[0].apread(0, 1)


async def test_remote_target_host_over_ssh(tgt: TgtServer, tmp_path: Path, fake_ssh: Path) -> None:
    """SSH=user@host runs tgtadm and the file work on the target host (here: a local fake ssh that
    hands the joined words to a shell, as OpenSSH does)."""
    store = tmp_path / "remote@store+1"
    raw = raw_for(tgt, store, SSH="root@target-host")
    IscsiDriver.validate(raw, tmp_path, "b")
    assert not store.exists()  # a remote STORE is the admin's to make
    store.mkdir()
    d = await make_driver(raw, tmp_path)
    k, c = key(), key()
    await d.allocate(k, 2 * MIB)
    h = await d.open(k, True)
    await h.apwrite(100, b"over ssh")
    await h.apwrite(3 * MIB, b"grown")
    await h.aclose()
    assert await d.size(k) == 3 * MIB + 5
    await d.clone(k, c)
    await d.resize(c, 8 * MIB)
    assert readcapacity(d, c) == 8 * MIB
    assert sorted(await d.keys()) == sorted([k, c])
    cap = await d.monitor()
    assert cap.total and cap.used and cap.used > 0
    h = await d.open(c, False)
    assert await h.apread(100, 8) == b"over ssh"
    await h.aclose()
    for x in (k, c):
        await d.delete(x)
    assert os.listdir(store) == []
    calls = fake_ssh.read_text().splitlines()
    assert all(line.startswith("-o BatchMode=yes -o ConnectTimeout=") for line in calls)
    assert {line.split(" -- ")[1].split()[0] for line in calls} >= {"tgtadm", "truncate", "cp", "rm", "find"}
    assert d.sessions() == 0


# ------------------------------------------------------------------------------ faults


async def test_target_stops_then_restarts(tmp_path: Path) -> None:
    with TgtServer() as server:
        d = await make_driver(raw_for(server, tmp_path / "store"), tmp_path)
        k, k2 = key(), key()
        data = os.urandom(MIB + 123)
        await d.allocate(k, 4 * MIB)
        await d.allocate(k2, MIB)
        h = await d.open(k, True)
        await h.apwrite(777, data)
        await h.aflush()

        # hung target (SIGSTOP): calls fail with ETIMEDOUT within TIMEOUT, and the trio loop keeps
        # running meanwhile (libiscsi's blocking calls run in threads, without the GIL)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.1)
                ticks += 1

        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                for call in (lambda: h.apread(0, 4096), d.monitor):
                    t0 = time.monotonic()
                    with trio.fail_after(TIMEOUT + 5), pytest.raises(OSError) as e:
                        await call()
                    assert e.value.errno == errno.ETIMEDOUT, e.value
                    assert time.monotonic() - t0 < TIMEOUT + 3
                nursery.cancel_scope.cancel()
            assert ticks >= 2 * TIMEOUT / 0.1 * 0.5
        finally:
            os.kill(server.process.pid, signal.SIGCONT)

        # dead target: calls fail at once, monitor and start too
        server.stop()
        for call in (lambda: h.apread(0, 4096), lambda: h.apwrite(0, b"x"), d.monitor, d.start,
                     lambda: d.open(k, False)):
            t0 = time.monotonic()
            with trio.fail_after(TIMEOUT + 5), pytest.raises(OSError) as e:
                await call()
            assert e.value.errno in (errno.ECONNREFUSED, errno.EIO, errno.ETIMEDOUT), e.value
            assert time.monotonic() - t0 < TIMEOUT + 3
        assert d.sessions() <= 1  # only the handle's, which is broken and replaced on next use

        # restarted: tgtd has no targets; start() re-creates them from STORE, data intact
        server.start()
        assert targets_of(server, d) == {}
        await d.start()
        assert set(targets_of(server, d)) == {d.s.iqn(k), d.s.iqn(k2)}
        assert await d.keys() == sorted([k, k2])
        assert await h.apread(777, len(data)) == data  # the open handle logs in again
        h2 = await d.open(k, False)
        assert await h2.apread(777, len(data)) == data
        await h2.aclose()
        await h.aclose()
        assert d.sessions() == 0
        for x in (k, k2):
            await d.delete(x)
        assert targets_of(server, d) == {} and os.listdir(tmp_path / "store") == []
