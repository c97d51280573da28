"""A fresh Debian root made with mmdebstrap, entered with chroot, for the package tests.

`debian_tarball` makes (or finds in `.cache/debian/`) a root of the `apt` variant plus systemd,
with everything a given .deb needs already downloaded into apt's cache and the package lists
kept: a test then installs the .deb with apt, Depends resolved as on any machine, but without the
network. The cache is keyed by day and by the .deb's Depends/Recommends, so a re-run the same day
is quick and a change of dependencies makes a new one.

`DebianRoot` unpacks one, mounts /proc, /sys and a /dev of its own in it, and always takes every
mount under it down again (the FUSE mount included) before the directory is removed; it refuses
to remove a directory that still has anything mounted under it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tm2fs.mounts import mounts

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "debian"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty", "fuse")
LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
         "stderr": "/proc/self/fd/2"}
RECOMMENDS = "-oAPT::Install-Recommends=true"  # as on an admin's machine (mmdebstrap turns it off)
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
       "DEBIAN_FRONTEND": "noninteractive"}


def retry(argv: list[str], env: dict[str, str], tries: int = 3, timeout: float = 1800) -> None:
    """Run a download-heavy command, again after a pause if it fails (a mirror's bad minute)."""
    for attempt in range(1, tries + 1):
        result = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, env=env)
        if result.returncode == 0:
            return
        if attempt == tries:
            raise AssertionError(f"{argv[0]} failed {tries} times:\n"
                                 f"{result.stdout.decode(errors='replace')[-3000:]}\n"
                                 f"{result.stderr.decode(errors='replace')[-3000:]}")
        time.sleep(15 * attempt)


def debian_tarball(suite: str, deb: Path) -> Path:
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Recommends"], capture_output=True,
                            check=True).stdout
    key = hashlib.sha256(fields + b"apt+systemd+recommends").hexdigest()[:12]
    tarball = CACHE / f"{suite}-{datetime.date.today():%Y%m%d}-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(tarball.name + ".partial")
    partial.unlink(missing_ok=True)  # an interrupted run's
    retry(["mmdebstrap", "--variant=apt", "--format=tar", "--include=systemd", "--skip=cleanup/apt",
           "--customize-hook", f'copy-in "{deb}" /tmp',
           "--customize-hook", f'chroot "$1" apt-get install -y --download-only {RECOMMENDS} /tmp/{deb.name}',
           suite, str(partial),
           f"deb {MIRROR} {suite} main", f"deb {MIRROR} {suite}-updates main",
           f"deb {SECURITY} {suite}-security main"], env={**os.environ, **ENV})
    for old in CACHE.glob(f"{suite}-*.tar"):  # one root per suite is kept
        old.unlink()
    partial.rename(tarball)
    return tarball


def mounted_under(path: Path) -> list[bytes]:
    top = os.fsencode(os.path.realpath(path))
    return [m.point for m in mounts() if m.point == top or m.point.startswith(top + b"/")]


def unpack(tarball: Path, path: Path) -> None:
    path.mkdir()
    subprocess.run(["tar", "-C", str(path), "-xf", str(tarball)], check=True, timeout=600)


class Commands:
    """Commands run inside a root, through PREFIX (chroot or nsenter)."""

    prefix: list[str]

    def run(self, *argv: str, input: bytes | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """ARGV inside the root; its output kept, its status not checked."""
        return subprocess.run([*self.prefix, *argv], input=input, capture_output=True,
                              timeout=timeout, check=False, env={**ENV, **(env or {})})

    def ok(self, *argv: str, input: bytes | None = None, timeout: float = 120,
           env: dict[str, str] | None = None) -> str:
        """ARGV inside the root, which must succeed; its standard output."""
        result = self.run(*argv, input=input, timeout=timeout, env=env)
        assert result.returncode == 0, (argv, result.stdout.decode(errors="replace")[-3000:],
                                        result.stderr.decode(errors="replace")[-3000:])
        return result.stdout.decode()


class DebianRoot(Commands):
    """An unpacked root entered with chroot."""

    def __init__(self, suite: str, tarball: Path, path: Path) -> None:
        self.suite, self.path = suite, path
        self.prefix = ["chroot", str(path)]
        unpack(tarball, path)
        try:
            self._mount_api_filesystems()
        except BaseException:
            self.close()
            raise

    def _mount_api_filesystems(self) -> None:
        """Fresh proc and sysfs, and a /dev of its own (a tmpfs with the host's device nodes bound
        one by one): nothing of the host's /dev tree is reachable through the root, so even a
        leftover mount under a temporary directory can never let a removal reach the host's."""
        def mount(*argv: str) -> None:
            subprocess.run(["mount", *argv], check=True, capture_output=True)

        mount("-t", "proc", "proc", str(self.path / "proc"))
        mount("-t", "sysfs", "sysfs", str(self.path / "sys"))
        dev = self.path / "dev"
        mount("-t", "tmpfs", "-o", "mode=0755,nosuid", "tmpfs", str(dev))
        for name in DEVICES:
            (dev / name).touch()
            mount("--bind", f"/dev/{name}", str(dev / name))
        for name, target in LINKS.items():
            (dev / name).symlink_to(target)
        (dev / "pts").mkdir()
        (dev / "shm").mkdir()
        (dev / "shm").chmod(0o1777)

    def popen(self, *argv: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """ARGV inside the root in the background, its output to LOG (a pipe could fill up)."""
        with open(log, "wb") as out:
            return subprocess.Popen([*self.prefix, *argv], env={**ENV, **env},
                                    stdout=out, stderr=subprocess.STDOUT)

    def close(self) -> None:
        """Every mount under the root down (deepest first, lazily if busy), then the files."""
        for _ in range(3):
            for point in sorted(mounted_under(self.path), key=len, reverse=True):
                if subprocess.run([b"umount", point], capture_output=True).returncode != 0:
                    subprocess.run([b"umount", b"-l", point], capture_output=True)
            if not mounted_under(self.path):
                break
            time.sleep(1)
        left = mounted_under(self.path)
        assert not left, f"still mounted, {self.path} is left in place: {left}"
        shutil.rmtree(self.path, ignore_errors=True)


class BootedRoot(Commands):
    """An unpacked root booted with systemd-nspawn: its own systemd as PID 1, entered with
    nsenter. Every mount it makes lives in its own namespaces and goes with it."""

    def __init__(self, suite: str, tarball: Path, path: Path, log: Path) -> None:
        self.suite, self.path = suite, path
        unpack(tarball, path)
        with open(log, "wb") as out:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "-D", str(path), "--boot", "--register=no",
                 "--keep-unit", "--bind=/dev/fuse", "--console=read-only",
                 "--timezone=off"],  # a bound /etc/localtime fails tzdata's postinst
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.init = 0
        try:
            self.init = self._init_pid(log)
            self.prefix = ["nsenter", "-t", str(self.init), "-a"]
            self._wait_booted(log)
        except BaseException:
            self.close()
            raise

    def _init_pid(self, log: Path, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            assert self.nspawn.poll() is None, log.read_text(errors="replace")
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text()
            if children.split():
                return int(children.split()[0])
            assert time.monotonic() < deadline, "systemd-nspawn started no init"
            time.sleep(0.5)

    def _wait_booted(self, log: Path, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.nspawn.poll() is None, log.read_text(errors="replace")
            state = self.run("systemctl", "is-system-running").stdout.decode().strip()
            if state in ("running", "degraded"):
                return
            assert time.monotonic() < deadline, f"not booted in time ({state}):\n" + \
                log.read_text(errors="replace")[-3000:]
            time.sleep(1)

    def close(self) -> None:
        """SIGTERM: systemd-nspawn shuts the container down; SIGKILL if it takes too long."""
        if self.nspawn.poll() is None:
            self.nspawn.terminate()
            try:
                self.nspawn.wait(90)
            except subprocess.TimeoutExpired:
                if self.init:  # the container's PID 1: its whole PID namespace goes with it
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.init, signal.SIGKILL)
                self.nspawn.kill()
                self.nspawn.wait(30)
        shutil.rmtree(self.path, ignore_errors=True)
