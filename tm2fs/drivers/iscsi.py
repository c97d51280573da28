"""`iscsi`: images as LUNs of an iSCSI target host, read and written by a userspace initiator.

Why: SAN backends (fast SSD and slow HDD target hosts) hand out block devices over iSCSI. Each image
is one target `IQN_PREFIX:KEY` whose LUN 1 is a sparse file `STORE/KEY` on the target host, so
allocate, clone, resize and delete are file work plus a little target management, and the bytes
move over iSCSI, as a hypervisor would move them.

How:

- Target management sits behind one small interface, `Targets`, with two implementations:
  `TgtTargets` drives Linux's userspace target `tgtd` with `tgtadm -C N --lld iscsi ...` (each call
  an argument list run by `trio.run_process`, locally or through `ssh -o BatchMode=yes HOST -- ...`
  with every remote word shell-quoted, since ssh hands the remote shell one joined string);
  `LioTargets` drives the kernel's LIO through rtslib-fb. Backing files live behind `Files`
  (`LocalFiles`: Python calls in worker threads; `RemoteFiles`: coreutils over ssh).
- Resize truncates the backing file, then makes the target see the new size: tgtd reads a LUN's
  size only when the LUN is added and `--op update` does not refresh it, so the logical unit is
  deleted and added again (open sessions keep working and READ CAPACITY answers the new size).
- iSCSI LUNs hold whole 512-byte blocks: a backing file is kept at the image size rounded up to a
  multiple of 512 (the rounding reads as zeros), so `size()` of an image of 1000 bytes is 1024.
- A tgtd restart loses every target (its configuration lives in memory). `start()` therefore
  `ensure`s a target for every backing file in STORE: the backend comes back READY with its data.
- The data path is libiscsi's userspace initiator (no kernel initiator is needed), bound here
  with ctypes: cython-iscsi (the PyPI wrapper) holds the GIL during its blocking calls (a hung
  target would freeze the whole trio loop), never frees its tasks or contexts, has no logout and
  no timeouts. ctypes releases the GIL in every foreign call. A handle is one logged-in session;
  pread/pwrite are READ16/WRITE16 in 512-byte blocks with read-modify-write at unaligned edges,
  flush is SYNCHRONIZE CACHE(10), close is a logout. libiscsi's calls are blocking, so the handle
  is a `ThreadedHandle` (abandonable worker threads under the backend's limiter); libiscsi's own
  timeout (iscsi_set_timeout = TIMEOUT) ends an abandoned call soon after. libiscsi's async API
  (iscsi_service + poll on its fd, woken through trio's wait_readable) would avoid the thread hop
  per request; it was not done.
- Writing past the end of a LUN grows it (geometrically: at least 64 MiB, at most 1 GiB more a
  step, so a `cp` into the mount does not resize per 128 KiB write); flush and close cut the
  backing file back to the written size. A crash between the two leaves the image longer, zeros.
- Failures are OSErrors with errno ECONNREFUSED (nothing listens), ETIMEDOUT (no answer within
  TIMEOUT) or EIO, which the service turns into backend ERROR; no call waits longer than TIMEOUT
  (plus a login if a broken session reconnects).

TM_RAW (strings): PORTAL=host:port (required; port 3260 if left out), STORE=/dir on the target host
(required; made if the target host is this one), IQN_PREFIX (iqn.2026-11.org.tm2fs), TARGET_MANAGER
(tgt or lio), TGT_CONTROL (tgtadm's -C, 0), SSH (user@host of a remote target host), TIMEOUT
(seconds per command or SCSI call, 10), INITIATORS (ALL, or the initiator names allowed in: this
daemon's own is `IQN_PREFIX:initiator:HOSTNAME`).

NOT RUN: `LioTargets` needs configfs and the target_core_mod / iscsi_target_mod kernel modules,
which the development and CI machines lack. It is written against rtslib-fb 2.x, imported only
when TARGET_MANAGER=lio is used, and only its refusal without rtslib or configfs is tested. The
hypervisors' kernel initiator (open-iscsi) is not used either: hosts reach images through this
daemon's userspace sessions.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shlex
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from ..errors import InvalidArgument
from .base import Capacity, Driver, Handle, Progress, ThreadedHandle, fsync_dir

log = logging.getLogger(__name__)

BLOCK = 512
LUN = 1  # every image is LUN 1 of its own target (LUN 0 is tgtd's controller)
MAX_TRANSFER = 2**20  # bytes per READ16/WRITE16
GROW_MIN = 64 * 2**20
GROW_MAX = 2**30
DEFAULT_PREFIX = "iqn.2026-11.org.tm2fs"
DEFAULT_TIMEOUT = 10.0
KNOWN = {"PORTAL", "IQN_PREFIX", "TARGET_MANAGER", "TGT_CONTROL", "STORE", "SSH", "TIMEOUT", "INITIATORS"}
HINT = ("TM_RAW for iscsi: PORTAL=host:port, STORE=/dir/on/target/host, and optionally IQN_PREFIX, "
        "TARGET_MANAGER=tgt|lio, TGT_CONTROL=N, SSH=user@host, TIMEOUT=seconds, INITIATORS=ALL|iqn,...")
KEY_RE = re.compile(r"[0-9a-f]{32}")
IQN_RE = re.compile(r"iqn\.\d{4}-\d{2}\.[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[a-z0-9][a-z0-9.:-]*)?")
NAME_RE = re.compile(r"(?:iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.:-]*|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16,32})")
HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})")
SSH_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,63}@)?[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
STORE_RE = re.compile(r"/[A-Za-z0-9._+@/-]*")  # tgtadm passes it inside `key=value,...`: no , = or space


def check_key(key: str) -> str:
    """Keys are the service's 32-hex image keys; anything else (paths, options, shell) is refused."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise InvalidArgument(f"iscsi driver: invalid image key {key!r}", "keys are 32 lowercase hex digits")
    return key


def round_up(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


# ---------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """TM_RAW, checked: every field is safe to pass as one argument to tgtadm, ssh or coreutils."""

    portal: str  # host:port, as libiscsi takes it
    host: str
    port: int
    prefix: str
    manager: str
    control: int
    store: str
    ssh: str | None
    timeout: float
    initiators: tuple[str, ...]  # empty: ALL

    @classmethod
    def parse(cls, tm_raw: dict[str, Any]) -> Settings:
        raw = {str(k).upper(): v for k, v in tm_raw.items()}
        unknown = set(raw) - KNOWN
        if unknown:
            raise InvalidArgument(f"iscsi driver: unknown TM_RAW attribute(s) {', '.join(sorted(unknown))}",
                                  HINT)
        host, port = _portal(raw.get("PORTAL"))
        prefix = str(raw.get("IQN_PREFIX", DEFAULT_PREFIX))
        if not IQN_RE.fullmatch(prefix) or len(prefix) > 180:
            raise InvalidArgument(f"iscsi driver: IQN_PREFIX {prefix!r} is not an iSCSI qualified name",
                                  f"lowercase, e.g. {DEFAULT_PREFIX} or {DEFAULT_PREFIX}:ssd1")
        manager = str(raw.get("TARGET_MANAGER", "tgt")).lower()
        if manager not in ("tgt", "lio"):
            raise InvalidArgument(f"iscsi driver: TARGET_MANAGER {manager!r} is neither tgt nor lio",
                                  "tgt drives tgtd with tgtadm; lio drives the kernel target via rtslib-fb")
        control_text = str(raw.get("TGT_CONTROL", "0"))
        if not control_text.isdigit() or int(control_text) > 65535:
            raise InvalidArgument(f"iscsi driver: TGT_CONTROL {control_text!r} is not a number 0-65535",
                                  "the N of `tgtd -C N` / `tgtadm -C N` (0 for the system's tgtd)")
        if "STORE" not in raw:
            raise InvalidArgument("iscsi driver: STORE is required",
                                  "STORE = the directory of the LUN backing files on the target host")
        store = os.path.normpath(str(raw["STORE"]))
        if not STORE_RE.fullmatch(store) or store == "/" or len(store) > 1024:
            raise InvalidArgument(f"iscsi driver: STORE {str(raw['STORE'])!r} is not a plain absolute path",
                                  "letters, digits and . _ + @ - / only (tgtadm cannot pass , = or spaces)")
        ssh = raw.get("SSH")
        if ssh is not None:
            ssh = str(ssh)
            if not SSH_RE.fullmatch(ssh):
                raise InvalidArgument(f"iscsi driver: SSH {ssh!r} is not user@host",
                                      "letters, digits, '.', '-' and '_' only (no options, no ports)")
            if manager == "lio":
                raise InvalidArgument("iscsi driver: TARGET_MANAGER=lio cannot be used over SSH",
                                      "rtslib-fb works on the local kernel: run it on the target host")
        try:
            timeout = float(str(raw.get("TIMEOUT", DEFAULT_TIMEOUT)))
        except ValueError:
            raise InvalidArgument(f"iscsi driver: TIMEOUT {raw['TIMEOUT']!r} is not a number of seconds",
                                  HINT) from None
        if not 0.5 <= timeout <= 3600:
            raise InvalidArgument("iscsi driver: TIMEOUT must be between 0.5 and 3600 seconds",
                                  "TIMEOUT bounds every target command and SCSI call (default 10)")
        initiators = _initiators(raw.get("INITIATORS", "ALL"))
        return cls(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}", host, port, prefix,
                   manager, int(control_text), store, ssh, timeout, initiators)

    def to_raw(self) -> dict[str, str]:
        raw = {"PORTAL": self.portal, "IQN_PREFIX": self.prefix, "TARGET_MANAGER": self.manager,
               "TGT_CONTROL": str(self.control), "STORE": self.store, "TIMEOUT": f"{self.timeout:g}",
               "INITIATORS": ",".join(self.initiators) or "ALL"}
        if self.ssh:
            raw["SSH"] = self.ssh
        return raw

    def iqn(self, key: str) -> str:
        return f"{self.prefix}:{check_key(key)}"

    def path(self, key: str) -> str:
        return f"{self.store}/{check_key(key)}"


def _portal(value: Any) -> tuple[str, int]:
    hint = "PORTAL = host:port of the target, e.g. 192.0.2.10:3260 or [2001:db8::1]:3260"
    if value is None:
        raise InvalidArgument("iscsi driver: PORTAL is required", hint)
    text = str(value)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?", text) or re.fullmatch(
        r"([A-Za-z0-9_][A-Za-z0-9._-]{0,252})(?::(\d{1,5}))?", text)
    if not m:
        raise InvalidArgument(f"iscsi driver: PORTAL {text!r} is not host:port", hint)
    port = int(m.group(2) or 3260)
    if not 0 < port < 65536:
        raise InvalidArgument(f"iscsi driver: PORTAL port {port} is out of range", hint)
    return m.group(1), port


def _initiators(value: Any) -> tuple[str, ...]:
    text = str(value).strip()
    if text.upper() == "ALL":
        return ()
    names = tuple(n for n in re.split(r"[\s,]+", text) if n)
    bad = [n for n in names if not NAME_RE.fullmatch(n)]
    if bad or not names:
        raise InvalidArgument(f"iscsi driver: INITIATORS {text!r} holds names that are not initiator names",
                              "ALL, or a comma-separated list of iqn./eui./naa. names (lowercase)")
    return names


def initiator_name(prefix: str) -> str:
    """This host's userspace initiator: `IQN_PREFIX:initiator:HOSTNAME` (list it in INITIATORS)."""
    host = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()).strip("-.") or "host"
    return f"{prefix}:initiator:{host}"


# ---------------------------------------------------------------------------------- commands


class CommandError(OSError):
    """A command that exited non-zero; `stderr` keeps its words for callers that expect some."""

    def __init__(self, err: int, message: str, stderr: str) -> None:
        super().__init__(err, message)
        self.stderr = stderr


class Runner:
    """Runs argument lists on the target host: here, or through ssh (each word shell-quoted)."""

    def __init__(self, ssh: str | None, timeout: float) -> None:
        self.ssh = ssh
        self.timeout = timeout

    def argv(self, args: list[str]) -> list[str]:
        if not self.ssh:
            return args
        return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(self.timeout))}",
                self.ssh, "--", *(shlex.quote(a) for a in args)]

    async def run(self, args: list[str]) -> str:
        """The command's stdout; CommandError (an OSError) if it fails, ETIMEDOUT after TIMEOUT."""
        argv = self.argv(args)
        where = f" on {self.ssh}" if self.ssh else ""
        try:
            with trio.fail_after(self.timeout):
                result = await trio.run_process(argv, stdin=b"", capture_stdout=True, capture_stderr=True,
                                                check=False)
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, f"iscsi driver: `{args[0]}`{where} timed out after "
                          f"{self.timeout:g}s") from None
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"iscsi driver: {argv[0]} is not installed") from None
        if result.returncode != 0:
            text = result.stderr.decode(errors="replace").strip()
            words = " ".join(args[:6])
            if self.ssh and result.returncode == 255:
                raise CommandError(errno.EHOSTUNREACH, f"iscsi driver: ssh {self.ssh} failed: {text}", text)
            if args[0] == "tgtadm" and result.returncode == errno.ENOTCONN:
                raise CommandError(errno.ECONNREFUSED, f"iscsi driver: tgtd does not answer on its "
                                   f"control socket{where} ({words}): {text}", text)
            raise CommandError(errno.EIO, f"iscsi driver: `{words}`{where} failed "
                               f"(exit status {result.returncode}): {text}", text)
        return result.stdout.decode(errors="replace")


# ------------------------------------------------------------------------------- backing files


SIZE_SUFFIX = ".size"  # STORE/KEY.size: a sparse file whose length is the image's exact byte size


class Files(Protocol):
    """The LUN backing files in STORE on the target host.

    A LUN holds whole 512-byte blocks, so STORE/KEY is the image size rounded up to a block (or
    longer while a writer grows it); when that is not the image's exact size, an empty sparse
    file STORE/KEY.size records it in its length. `size()` answers the exact size.
    """

    async def prepare(self) -> None: ...
    async def check(self) -> None: ...
    async def create(self, path: str, size: int) -> None: ...
    async def remove(self, path: str) -> None: ...
    async def set_size(self, path: str, size: int) -> None:
        """Backing file cut or grown to whole blocks (the cut-off bytes read as zeros), size recorded."""
    async def grow(self, path: str, length: int, size: int) -> None:
        """Backing file extended to `length` bytes; the image's size is still `size`."""
    async def size(self, path: str) -> int: ...
    async def copy(self, src: str, dst: str) -> None: ...
    async def usage(self) -> tuple[Capacity, dict[str, int]]:
        """STORE's capacity and {key: exact size} of every image."""


class LocalFiles:
    """Backing files on this host: Python calls in abandonable worker threads."""

    def __init__(self, store: str, runner: Runner, limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.runner = runner
        self.limiter = limiter

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self.limiter)

    async def prepare(self) -> None:
        await self._thread(lambda: os.makedirs(self.store, mode=0o700, exist_ok=True))

    async def check(self) -> None:
        if not await self._thread(os.path.isdir, self.store):
            raise FileNotFoundError(errno.ENOENT, "iscsi driver: STORE is gone", self.store)

    @staticmethod
    def _truncate(path: str, *lengths: int, create: bool = False) -> None:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            for length in lengths:
                os.ftruncate(fd, length)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _record(self, path: str, size: int | None) -> None:
        """Write (or, for None, drop) the exact-size record of an image."""
        if size is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + SIZE_SUFFIX)
        else:
            self._truncate(path + SIZE_SUFFIX, size, create=True)

    async def create(self, path: str, size: int) -> None:
        def _create() -> None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, round_up(size))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._record(path, size if size % BLOCK else None)
            fsync_dir(self.store)

        await self._thread(_create)

    async def remove(self, path: str) -> None:
        def _remove() -> None:
            self._record(path, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fsync_dir(self.store)

        await self._thread(_remove)

    async def set_size(self, path: str, size: int) -> None:
        def _set() -> None:
            if not os.path.exists(path):
                raise FileNotFoundError(errno.ENOENT, "iscsi driver: no backing file", path)
            self._truncate(path, size, round_up(size))  # exact first: the block's rest reads zeros
            self._record(path, size if size % BLOCK else None)

        await self._thread(_set)

    async def grow(self, path: str, length: int, size: int) -> None:
        def _grow() -> None:
            self._record(path, size)
            self._truncate(path, length)

        await self._thread(_grow)

    async def size(self, path: str) -> int:
        def _size() -> int:
            try:
                return os.stat(path + SIZE_SUFFIX).st_size
            except FileNotFoundError:
                return os.stat(path).st_size

        return await self._thread(_size)

    async def copy(self, src: str, dst: str) -> None:
        await self._thread(lambda: os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)))
        try:
            await self.runner.run(["cp", "--reflink=auto", "--sparse=always", "--", src, dst])

            def _finish() -> None:
                with contextlib.suppress(FileNotFoundError):
                    self._record(dst, os.stat(src + SIZE_SUFFIX).st_size)
                self._truncate(dst)  # no length: just the fsync
                fsync_dir(self.store)

            await self._thread(_finish)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove(dst)
            raise

    async def usage(self) -> tuple[Capacity, dict[str, int]]:
        def _usage() -> tuple[Capacity, dict[str, int]]:
            st = os.statvfs(self.store)
            files: dict[str, int] = {}
            records: dict[str, int] = {}
            used = 0
            with os.scandir(self.store) as it:
                for entry in it:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    name = entry.name
                    est = entry.stat(follow_symlinks=False)
                    if KEY_RE.fullmatch(name):
                        files[name] = est.st_size
                        used += est.st_blocks * 512
                    elif name.endswith(SIZE_SUFFIX) and KEY_RE.fullmatch(name[:-len(SIZE_SUFFIX)]):
                        records[name[:-len(SIZE_SUFFIX)]] = est.st_size
            files.update((k, v) for k, v in records.items() if k in files)
            return Capacity(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, used), files

        return await self._thread(_usage)


class RemoteFiles:
    """Backing files on the target host, through coreutils over ssh (argument lists, quoted)."""

    def __init__(self, store: str, runner: Runner) -> None:
        self.store = store
        self.runner = runner

    async def _absent(self, path: str) -> None:
        try:
            await self.runner.run(["test", "!", "-e", path])
        except CommandError:
            raise FileExistsError(errno.EEXIST, "iscsi driver: backing file exists", path) from None

    async def _record(self, path: str, size: int | None) -> None:
        if size is None:
            await self.runner.run(["rm", "-f", "--", path + SIZE_SUFFIX])
        else:
            await self.runner.run(["truncate", "-s", str(size), "--", path + SIZE_SUFFIX])

    async def prepare(self) -> None:
        await self.runner.run(["mkdir", "-p", "-m", "700", "--", self.store])

    async def check(self) -> None:
        try:
            await self.runner.run(["test", "-d", self.store])
        except CommandError:
            raise FileNotFoundError(errno.ENOENT, "iscsi driver: STORE is gone", self.store) from None

    async def create(self, path: str, size: int) -> None:
        await self._absent(path)
        await self.runner.run(["truncate", "-s", str(round_up(size)), "--", path])
        await self._record(path, size if size % BLOCK else None)
        await self.runner.run(["sync", "--", path])

    async def remove(self, path: str) -> None:
        await self.runner.run(["rm", "-f", "--", path + SIZE_SUFFIX, path])

    async def set_size(self, path: str, size: int) -> None:
        await self.runner.run(["truncate", "--no-create", "-s", str(size), "--", path])
        await self.runner.run(["truncate", "--no-create", "-s", str(round_up(size)), "--", path])
        await self._record(path, size if size % BLOCK else None)
        await self.runner.run(["sync", "--", path])

    async def grow(self, path: str, length: int, size: int) -> None:
        await self._record(path, size)
        await self.runner.run(["truncate", "--no-create", "-s", str(length), "--", path])

    async def size(self, path: str) -> int:
        sizes = await self._sizes(path)
        if path + SIZE_SUFFIX in sizes:
            return sizes[path + SIZE_SUFFIX]
        if path not in sizes:
            raise FileNotFoundError(errno.ENOENT, "iscsi driver: no backing file", path)
        return sizes[path]

    async def _sizes(self, path: str) -> dict[str, int]:
        """{name: size} of the image and its size record, whichever exist."""
        try:
            out = await self.runner.run(["find", os.path.dirname(path), "-maxdepth", "1", "(", "-name",
                                         os.path.basename(path), "-o", "-name",
                                         os.path.basename(path) + SIZE_SUFFIX, ")", "-printf", "%p/%s\\n"])
        except CommandError as e:
            raise FileNotFoundError(errno.ENOENT, e.strerror, path) from None
        return {name: int(size) for name, _, size in (line.rpartition("/") for line in out.splitlines())}

    async def copy(self, src: str, dst: str) -> None:
        await self._absent(dst)
        try:
            await self.runner.run(["cp", "--reflink=auto", "--sparse=always", "--", src, dst])
            sizes = await self._sizes(src)
            if src + SIZE_SUFFIX in sizes:
                await self._record(dst, sizes[src + SIZE_SUFFIX])
            await self.runner.run(["sync", "--", dst])
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.remove(dst)
            raise

    async def usage(self) -> tuple[Capacity, dict[str, int]]:
        fs = (await self.runner.run(["stat", "-f", "-c", "%S %b %a", "--", self.store])).split()
        listing = await self.runner.run(["find", self.store, "-maxdepth", "1", "-type", "f",
                                         "-printf", "%f %s %b\\n"])
        files: dict[str, int] = {}
        records: dict[str, int] = {}
        used = 0
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            if KEY_RE.fullmatch(parts[0]):
                files[parts[0]] = int(parts[1])
                used += int(parts[2]) * 512
            elif parts[0].endswith(SIZE_SUFFIX) and KEY_RE.fullmatch(parts[0][:-len(SIZE_SUFFIX)]):
                records[parts[0][:-len(SIZE_SUFFIX)]] = int(parts[1])
        files.update((k, v) for k, v in records.items() if k in files)
        unit = int(fs[0])
        return Capacity(int(fs[1]) * unit, int(fs[2]) * unit, used), files


# ------------------------------------------------------------------------------------ targets


class Targets(Protocol):
    """Target management: one target `IQN_PREFIX:KEY` per image, its LUN 1 backed by STORE/KEY."""

    async def check(self) -> None:
        """The target manager answers; OSError if not."""

    async def luns(self) -> dict[str, str]:
        """key -> backing path of LUN 1 (empty if the target has none), for targets under IQN_PREFIX."""

    async def create_lun(self, key: str, path: str, size: int) -> None:
        """Target + LUN 1 on `path` + ACL; nothing is left behind if it fails."""

    async def delete_lun(self, key: str) -> None:
        """Target and LUN gone (sessions on it are dropped); no error if there is none."""

    async def resize_lun(self, key: str, path: str, size: int) -> None:
        """Make the target see the backing file's new size."""

    async def bind(self, key: str, initiators: tuple[str, ...]) -> None:
        """Allow `initiators` (all of them when empty) to log in to the target."""

    async def ensure(self, key: str, path: str, size: int) -> bool:
        """Create what is missing of the target and its LUN; True if anything was created."""


@dataclass
class TgtTarget:
    tid: int
    name: str
    luns: dict[int, str] = field(default_factory=dict)
    acl: list[str] = field(default_factory=list)
    nexus: int = 0


def parse_tgt_show(text: str) -> list[TgtTarget]:
    """Parse `tgtadm --mode target --op show`."""
    targets: list[TgtTarget] = []
    current: TgtTarget | None = None
    section = ""
    lun: int | None = None
    for line in text.splitlines():
        m = re.match(r"Target (\d+): (\S+)\s*$", line)
        if m:
            current = TgtTarget(int(m.group(1)), m.group(2))
            targets.append(current)
            section, lun = "", None
            continue
        if current is None:
            continue
        s = line.strip()
        if s.endswith("information:"):
            section = s
        elif section == "LUN information:":
            if s.startswith("LUN: "):
                lun = int(s[5:])
                current.luns[lun] = ""
            elif s.startswith("Backing store path: ") and lun is not None:
                path = s[len("Backing store path: "):]
                current.luns[lun] = "" if path == "None" else path
        elif section == "I_T nexus information:" and s.startswith("I_T nexus: "):
            current.nexus += 1
        elif section == "ACL information:" and s:
            current.acl.append(s)
    return targets


class TgtTargets:
    """Linux's userspace target tgtd, through `tgtadm -C N --lld iscsi` (locally or over ssh)."""

    def __init__(self, settings: Settings, runner: Runner) -> None:
        self.s = settings
        self.runner = runner
        self.lock = trio.Lock()  # target ids are picked from a listing: one create at a time

    async def tgtadm(self, *args: str) -> str:
        return await self.runner.run(["tgtadm", "-C", str(self.s.control), *args])

    async def targets(self) -> list[TgtTarget]:
        return parse_tgt_show(await self.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "show"))

    async def _find(self, key: str) -> TgtTarget | None:
        name = self.s.iqn(key)
        return next((t for t in await self.targets() if t.name == name), None)

    async def check(self) -> None:
        text = await self.tgtadm("--mode", "sys", "--op", "show")
        if not re.search(r"^\s*iscsi: ready", text, re.M):
            raise OSError(errno.EIO,
                          f"iscsi driver: tgtd (control {self.s.control}) has no iSCSI driver ready")

    async def luns(self) -> dict[str, str]:
        found = {}
        for t in await self.targets():
            prefix, _, key = t.name.rpartition(":")
            if prefix == self.s.prefix and KEY_RE.fullmatch(key):
                found[key] = t.luns.get(LUN, "")
        return found

    async def _add_lun(self, tid: int, path: str) -> None:
        await self.tgtadm("--lld", "iscsi", "--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                          "--lun", str(LUN), "--backing-store", path, "--bstype", "rdwr")

    async def create_lun(self, key: str, path: str, size: int) -> None:
        name = self.s.iqn(key)
        async with self.lock:
            for _attempt in range(5):
                targets = await self.targets()
                if any(t.name == name for t in targets):
                    raise FileExistsError(errno.EEXIST, f"iscsi driver: target {name} exists")
                tid = max((t.tid for t in targets), default=0) + 1
                try:
                    await self.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "new", "--tid", str(tid),
                                      "--targetname", name)
                    break
                except CommandError as e:
                    if "already exists" not in e.stderr:
                        raise
                    # another manager of this tgtd took the id (or the name) meanwhile: look again
            else:
                raise OSError(errno.EIO, f"iscsi driver: no free target id for {name}")
            try:
                await self._add_lun(tid, path)
                await self._bind(tid, self.s.initiators)
            except BaseException:
                with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await self._delete_tid(tid)
                raise

    async def _delete_tid(self, tid: int) -> None:
        try:
            await self.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "delete", "--force",
                              "--tid", str(tid))
        except CommandError as e:
            if "can't find the target" not in e.stderr:
                raise

    async def delete_lun(self, key: str) -> None:
        async with self.lock:
            target = await self._find(key)
            if target is not None:
                await self._delete_tid(target.tid)

    async def resize_lun(self, key: str, path: str, size: int) -> None:
        """tgtd reads a LUN's size when the LUN is added (`--op update` does not refresh it): the
        logical unit is deleted and added again; sessions on the target stay logged in."""
        async with self.lock:
            target = await self._find(key)
            if target is not None:
                if LUN in target.luns:
                    await self.tgtadm("--lld", "iscsi", "--mode", "logicalunit", "--op", "delete",
                                      "--tid", str(target.tid), "--lun", str(LUN))
                await self._add_lun(target.tid, path)
                return
        await self.create_lun(key, path, size)

    async def _bind(self, tid: int, initiators: tuple[str, ...]) -> None:
        if not initiators:
            await self.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "bind", "--tid", str(tid),
                              "--initiator-address", "ALL")
        for name in initiators:
            await self.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "bind", "--tid", str(tid),
                              "--initiator-name", name)

    async def bind(self, key: str, initiators: tuple[str, ...]) -> None:
        target = await self._find(key)
        if target is None:
            raise FileNotFoundError(errno.ENOENT, f"iscsi driver: no target {self.s.iqn(key)}")
        if not initiators:
            if "ALL" not in target.acl:
                await self._bind(target.tid, ())
            return
        missing = tuple(n for n in initiators if n not in target.acl)
        if missing:
            await self._bind(target.tid, missing)

    async def ensure(self, key: str, path: str, size: int) -> bool:
        target = await self._find(key)
        if target is None:
            try:
                await self.create_lun(key, path, size)
            except FileExistsError:  # made meanwhile (by start() or another host): check it below
                target = await self._find(key)
                if target is None:
                    raise
            else:
                return True
        have = target.luns.get(LUN)
        if have == path:
            return False
        if have:
            raise FileExistsError(errno.EEXIST,
                                  f"iscsi driver: target {target.name} serves {have}, not {path}")
        async with self.lock:
            await self._add_lun(target.tid, path)
        return True


class LioTargets:
    """The kernel's LIO target through rtslib-fb (on the target host itself: no SSH).

    NOT RUN: LIO needs configfs (/sys/kernel/config/target) and the target_core_mod and
    iscsi_target_mod kernel modules, which the development and CI machines do not have. Written
    against rtslib-fb 2.x: one fileio storage object per image (named by its key), one target
    `IQN_PREFIX:KEY` with TPG 1 listening on PORTAL, LUN 1, and either demo-mode access for ALL
    initiators or one NodeACL (with mapped LUN 1) per INITIATORS name. Resize re-creates the
    storage object and the LUN, since fileio reads the size at creation. rtslib calls block
    (configfs writes), so each runs in a worker thread.
    """

    def __init__(self, settings: Settings, limiter: trio.CapacityLimiter) -> None:
        self.s = settings
        self.limiter = limiter
        self._rtslib: Any = None

    def _lib(self) -> Any:
        """rtslib_fb, imported on first use, with a clear OSError if it or configfs is missing."""
        if self._rtslib is None:
            try:
                import rtslib_fb  # type: ignore[import-not-found]
            except ImportError:
                raise OSError(errno.ENODEV, "iscsi driver: TARGET_MANAGER=lio needs rtslib-fb (Debian's "
                              "python3-rtslib-fb or `pip install rtslib-fb`)") from None
            self._rtslib = rtslib_fb
        if not os.path.isdir("/sys/kernel/config/target"):
            raise OSError(errno.ENODEV, "iscsi driver: TARGET_MANAGER=lio needs the kernel's LIO target: "
                          "configfs is not mounted at /sys/kernel/config or target_core_mod and "
                          "iscsi_target_mod are not loaded (modprobe them), or use TARGET_MANAGER=tgt")
        return self._rtslib

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        def call() -> Any:
            lib = self._lib()
            try:
                return fn(lib, *args)
            except lib.RTSLibError as e:
                raise OSError(errno.EIO, f"iscsi driver: LIO: {e}") from None

        return await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self.limiter)

    def _target(self, lib: Any, key: str) -> Any | None:
        wwn = self.s.iqn(key)
        return next((t for t in lib.RTSRoot().targets if t.wwn == wwn), None)

    def _storage(self, lib: Any, key: str) -> Any | None:
        return next((so for so in lib.RTSRoot().storage_objects
                     if so.plugin == "fileio" and so.name == key), None)

    async def check(self) -> None:
        await self._thread(lambda lib: list(lib.RTSRoot().targets))

    async def luns(self) -> dict[str, str]:
        def _luns(lib: Any) -> dict[str, str]:
            found = {}
            for t in lib.RTSRoot().targets:
                prefix, _, key = t.wwn.rpartition(":")
                if prefix != self.s.prefix or not KEY_RE.fullmatch(key):
                    continue
                found[key] = ""
                for tpg in t.tpgs:
                    for lun in tpg.luns:
                        if lun.lun == LUN:
                            found[key] = lun.storage_object.udev_path
            return found

        return await self._thread(_luns)

    def _map(self, lib: Any, tpg: Any, lun: Any) -> None:
        if not self.s.initiators:
            tpg.set_attribute("generate_node_acls", "1")
            tpg.set_attribute("demo_mode_write_protect", "0")
            tpg.set_attribute("cache_dynamic_acls", "1")
            tpg.set_attribute("authentication", "0")
            return
        for name in self.s.initiators:
            acl = next((a for a in tpg.node_acls if a.node_wwn == name), None) or lib.NodeACL(tpg, name)
            if not any(m.mapped_lun == LUN for m in acl.mapped_luns):
                lib.MappedLUN(acl, LUN, lun)

    async def create_lun(self, key: str, path: str, size: int) -> None:
        def _create(lib: Any) -> None:
            if self._target(lib, key) is not None:
                raise FileExistsError(errno.EEXIST, f"iscsi driver: target {self.s.iqn(key)} exists")
            so = lib.FileIOStorageObject(key, dev=path, size=round_up(size), write_back=False)
            try:
                target = lib.Target(lib.FabricModule("iscsi"), self.s.iqn(key))
                tpg = lib.TPG(target, 1)
                lib.NetworkPortal(tpg, self.s.host, self.s.port)
                lun = lib.LUN(tpg, LUN, so)
                self._map(lib, tpg, lun)
                tpg.enable = True
            except BaseException:
                t = self._target(lib, key)
                if t is not None:
                    t.delete()
                so.delete()
                raise

        await self._thread(_create)

    async def delete_lun(self, key: str) -> None:
        def _delete(lib: Any) -> None:
            target = self._target(lib, key)
            if target is not None:
                target.delete()
            so = self._storage(lib, key)
            if so is not None:
                so.delete()

        await self._thread(_delete)

    async def resize_lun(self, key: str, path: str, size: int) -> None:
        def _resize(lib: Any) -> None:
            target = self._target(lib, key)
            if target is None:
                return
            tpg = next(iter(target.tpgs))
            for lun in list(tpg.luns):
                if lun.lun == LUN:
                    lun.delete()
            so = self._storage(lib, key)
            if so is not None:
                so.delete()
            so = lib.FileIOStorageObject(key, dev=path, size=round_up(size), write_back=False)
            self._map(lib, tpg, lib.LUN(tpg, LUN, so))

        if key not in await self.luns():
            await self.create_lun(key, path, size)
            return
        await self._thread(_resize)

    async def bind(self, key: str, initiators: tuple[str, ...]) -> None:
        def _bind(lib: Any) -> None:
            target = self._target(lib, key)
            if target is None:
                raise FileNotFoundError(errno.ENOENT, f"iscsi driver: no target {self.s.iqn(key)}")
            tpg = next(iter(target.tpgs))
            lun = next(lun for lun in tpg.luns if lun.lun == LUN)
            for name in initiators:
                acl = next((a for a in tpg.node_acls if a.node_wwn == name), None) or lib.NodeACL(tpg, name)
                if not any(m.mapped_lun == LUN for m in acl.mapped_luns):
                    lib.MappedLUN(acl, LUN, lun)

        await self._thread(_bind)

    async def ensure(self, key: str, path: str, size: int) -> bool:
        luns = await self.luns()
        if luns.get(key):
            return False
        if key in luns:
            await self.delete_lun(key)
        await self.create_lun(key, path, size)
        return True


# ------------------------------------------------------------------------ libiscsi (ctypes)


class _ScsiTask(ctypes.Structure):
    """The head of libiscsi's `struct scsi_task` (scsi-lowlevel.h), up to the sense key."""

    _fields_ = [("status", ctypes.c_int), ("cdb_size", ctypes.c_int), ("xfer_dir", ctypes.c_int),
                ("expxferlen", ctypes.c_int), ("cdb", ctypes.c_ubyte * 16),
                ("residual_status", ctypes.c_int), ("residual", ctypes.c_size_t),
                ("sense_error_type", ctypes.c_ubyte), ("sense_key", ctypes.c_int),
                ("sense_ascq", ctypes.c_int)]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _ReadCapacity16(ctypes.Structure):
    _fields_ = [("returned_lba", ctypes.c_uint64), ("block_length", ctypes.c_uint32)]


STATUS_GOOD = 0
STATUS_CHECK_CONDITION = 2
STATUS_BUSY = 8
STATUS_TASK_SET_FULL = 0x28
STATUS_CANCELLED = 0x0F000000
STATUS_ERROR = 0x0F000001
STATUS_TIMEOUT = 0x0F000002
SENSE_UNIT_ATTENTION = 6
SESSION_NORMAL = 2
HEADER_DIGEST_NONE = 0

_lib_lock = threading.Lock()
_lib: Any = None


def libiscsi() -> Any:
    """libiscsi.so.7 with the prototypes of the few calls used here (Debian's libiscsi7)."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("iscsi") or "libiscsi.so.7")  # releases the GIL
        except OSError:
            raise OSError(errno.ENOSYS,
                          "iscsi driver: libiscsi is not installed (Debian's libiscsi7)") from None
        task = ctypes.POINTER(_ScsiTask)
        vp, cp, i, u32, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
        protos: dict[str, tuple[Any, list[Any]]] = {
            "iscsi_create_context": (vp, [cp]),
            "iscsi_set_targetname": (i, [vp, cp]),
            "iscsi_set_session_type": (i, [vp, i]),
            "iscsi_set_header_digest": (i, [vp, i]),
            "iscsi_set_timeout": (i, [vp, i]),
            "iscsi_set_noautoreconnect": (None, [vp, i]),
            "iscsi_set_tcp_syncnt": (i, [vp, i]),
            "iscsi_full_connect_sync": (i, [vp, cp, i]),
            "iscsi_read16_iov_sync": (task, [vp, i, u64, u32, i, i, i, i, i, i, ctypes.POINTER(_IoVec), i]),
            "iscsi_write16_sync": (task, [vp, i, u64, cp, u32, i, i, i, i, i, i]),
            "iscsi_synchronizecache10_sync": (task, [vp, i, i, i, i, i]),
            "iscsi_readcapacity16_sync": (task, [vp, i]),
            "scsi_datain_unmarshall": (ctypes.POINTER(_ReadCapacity16), [task]),
            "scsi_free_scsi_task": (None, [task]),
            "iscsi_logout_sync": (i, [vp]),
            "iscsi_destroy_context": (i, [vp]),
            "iscsi_get_error": (cp, [vp]),
        }
        for name, (restype, argtypes) in protos.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _lib = lib
        return lib


class SessionCount:
    """Open initiator sessions of one driver (changed from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def _errno_for(message: str) -> int:
    text = message.lower()
    if "refused" in text:
        return errno.ECONNREFUSED
    if "timed out" in text or "timeout" in text:
        return errno.ETIMEDOUT
    return errno.EIO


class Session:
    """One libiscsi session logged in to LUN 1 of one target. Blocking; one thread at a time."""

    def __init__(self, portal: str, target: str, initiator: str, timeout: float, count: SessionCount) -> None:
        self.lib = libiscsi()
        self.target = target
        self.count = count
        self.broken = False
        self.capacity = 0
        self.ctx = self.lib.iscsi_create_context(initiator.encode())
        if not self.ctx:
            raise OSError(errno.ENOMEM, "iscsi driver: cannot create an iSCSI context")
        lib, ctx = self.lib, self.ctx
        try:
            lib.iscsi_set_targetname(ctx, target.encode())
            lib.iscsi_set_session_type(ctx, SESSION_NORMAL)
            lib.iscsi_set_header_digest(ctx, HEADER_DIGEST_NONE)
            lib.iscsi_set_timeout(ctx, max(1, round(timeout)))  # every PDU, the login included
            lib.iscsi_set_noautoreconnect(ctx, 1)  # a dropped connection fails calls, never loops
            lib.iscsi_set_tcp_syncnt(ctx, 2)  # an unanswered TCP connect gives up after ~7 s
            if lib.iscsi_full_connect_sync(ctx, portal.encode(), LUN) != 0:
                message = self._error()
                raise OSError(_errno_for(message), f"iscsi driver: login to {target} at {portal} "
                              f"failed: {message}")
        except BaseException:
            lib.iscsi_destroy_context(ctx)
            self.ctx = None
            raise
        count.add(1)
        try:
            self.read_capacity()
        except BaseException:
            self.close()
            raise

    def _error(self) -> str:
        text = self.lib.iscsi_get_error(self.ctx)
        return text.decode(errors="replace").strip() if text else "unknown error"

    def _run(self, what: str, call: Callable[[], Any]) -> Any:
        """Run one SCSI command (retried on UNIT ATTENTION and BUSY); the task, which the caller frees."""
        if self.ctx is None or self.broken:
            raise OSError(errno.EIO, f"iscsi driver: the session to {self.target} is closed")
        for _attempt in range(4):
            task = call()
            if not task:
                self.broken = True
                message = self._error()
                raise OSError(_errno_for(message), f"iscsi driver: {what} on {self.target}: {message}")
            status = task.contents.status
            if status == STATUS_GOOD:
                return task
            key = task.contents.sense_key
            self.lib.scsi_free_scsi_task(task)
            if status == STATUS_CHECK_CONDITION and key == SENSE_UNIT_ATTENTION:
                continue
            if status in (STATUS_BUSY, STATUS_TASK_SET_FULL):
                continue
            if status == STATUS_TIMEOUT:
                self.broken = True
                raise OSError(errno.ETIMEDOUT, f"iscsi driver: {what} on {self.target} timed out")
            if status in (STATUS_CANCELLED, STATUS_ERROR):
                self.broken = True
                raise OSError(errno.EIO, f"iscsi driver: {what} on {self.target}: connection lost "
                              f"({self._error()})")
            raise OSError(errno.EIO, f"iscsi driver: {what} on {self.target} failed: {self._error()}")
        raise OSError(errno.EIO, f"iscsi driver: {what} on {self.target}: target stays busy")

    def read_capacity(self) -> int:
        task = self._run("READ CAPACITY(16)", lambda: self.lib.iscsi_readcapacity16_sync(self.ctx, LUN))
        try:
            data = self.lib.scsi_datain_unmarshall(task)
            if not data:
                raise OSError(errno.EIO, f"iscsi driver: READ CAPACITY(16) on {self.target}: bad answer")
            blocks = (data.contents.returned_lba + 1) & (2**64 - 1)
            if data.contents.block_length != BLOCK:
                raise OSError(errno.EIO, f"iscsi driver: {self.target} has {data.contents.block_length}"
                              "-byte blocks, not 512")
        finally:
            self.lib.scsi_free_scsi_task(task)
        self.capacity = blocks * BLOCK
        return self.capacity

    def read(self, lba: int, length: int) -> bytes:
        buf = ctypes.create_string_buffer(length)
        iov = _IoVec(ctypes.cast(buf, ctypes.c_void_p), length)
        task = self._run("READ(16)", lambda: self.lib.iscsi_read16_iov_sync(
            self.ctx, LUN, lba, length, BLOCK, 0, 0, 0, 0, 0, ctypes.byref(iov), 1))
        self.lib.scsi_free_scsi_task(task)
        return buf.raw

    def write(self, lba: int, data: bytes) -> None:
        task = self._run("WRITE(16)", lambda: self.lib.iscsi_write16_sync(
            self.ctx, LUN, lba, data, len(data), BLOCK, 0, 0, 0, 0, 0))
        self.lib.scsi_free_scsi_task(task)

    def sync(self) -> None:
        task = self._run("SYNCHRONIZE CACHE(10)",
                         lambda: self.lib.iscsi_synchronizecache10_sync(self.ctx, LUN, 0, 0, 0, 0))
        self.lib.scsi_free_scsi_task(task)

    def close(self) -> None:
        """Log out (best effort: a target that is gone cannot answer) and free the context."""
        if self.ctx is None:
            return
        ctx, self.ctx = self.ctx, None
        try:
            if not self.broken and self.lib.iscsi_logout_sync(ctx) != 0:
                log.debug("iscsi logout from %s failed", self.target)
        finally:
            self.lib.iscsi_destroy_context(ctx)
            self.count.add(-1)


# ------------------------------------------------------------------------------------ handles


class BlockHandle(Handle):
    """Byte access over a session's 512-byte blocks (blocking: runs in worker threads).

    One session per handle, so calls are serialized by a lock; a call stuck on a dead target
    holds it for at most TIMEOUT (libiscsi's own timeout), and a close that cannot get it leaves
    the logout to the holder. A broken session is replaced by a fresh login on the next call.
    """

    def __init__(self, connect: Callable[[], Session], session: Session, writable: bool,
                 timeout: float) -> None:
        self.connect = connect
        self.session: Session | None = session
        self.writable = writable
        self.timeout = timeout
        self.capacity = session.capacity  # what the target has (whole blocks)
        self.size = session.capacity  # what the image holds (bytes): pread stops there
        self.lock = threading.Lock()
        self.closed = False
        self.close_pending = False

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        if not self.lock.acquire(timeout=self.timeout + 2):
            raise OSError(errno.ETIMEDOUT, "iscsi driver: the session is stuck in an earlier call")
        try:
            if self.closed:
                raise OSError(errno.EBADF, "iscsi driver: the handle is closed")
            if self.session is None or self.session.broken:
                if self.session is not None:
                    old, self.session = self.session, None
                    old.close()
                self.session = self.connect()
                self.capacity = self.session.capacity
            yield self.session
        finally:
            if self.close_pending:
                self._close_locked()
            self.lock.release()

    def pread(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "iscsi driver: negative offset or size")
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        with self._session() as s:
            end = min(end, self.capacity)
            if end <= offset:
                return b""
            first = offset // BLOCK * BLOCK
            return self._read(s, first, round_up(end) - first)[offset - first:end - first]

    @staticmethod
    def _read(s: Session, start: int, length: int) -> bytes:
        chunks = []
        for pos in range(start, start + length, MAX_TRANSFER):
            n = min(MAX_TRANSFER, start + length - pos)
            chunks.append(s.read(pos // BLOCK, n))
        return b"".join(chunks)

    def pwrite(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise OSError(errno.EBADF, "iscsi driver: the image is open read-only")
        if offset < 0:
            raise OSError(errno.EINVAL, "iscsi driver: negative offset")
        if not data:
            return 0
        end = offset + len(data)
        with self._session() as s:
            if end > self.capacity:
                raise OSError(errno.EFBIG, f"iscsi driver: write ends at {end}, past the LUN's "
                              f"{self.capacity} bytes (apwrite grows the LUN first)")
            first, last = offset // BLOCK * BLOCK, round_up(end)
            if first != offset or last != end:  # read-modify-write of the partial edge blocks
                buf = bytearray(last - first)
                if first != offset:
                    buf[:BLOCK] = s.read(first // BLOCK, BLOCK)
                if last != end and not (first != offset and last - BLOCK == first):
                    buf[-BLOCK:] = s.read((last - BLOCK) // BLOCK, BLOCK)
                buf[offset - first:end - first] = data
                data_out = bytes(buf)
            else:
                data_out = bytes(data)
            for pos in range(0, len(data_out), MAX_TRANSFER):
                s.write((first + pos) // BLOCK, data_out[pos:pos + MAX_TRANSFER])
        self.size = max(self.size, end)
        return len(data)

    def truncate(self, size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "iscsi driver: a LUN changes size through atruncate (tgtadm)")

    def flush(self) -> None:
        if self.writable:
            with self._session() as s:
                s.sync()

    def refresh(self) -> int:
        """READ CAPACITY again (after the target resized the LUN)."""
        with self._session() as s:
            self.capacity = s.read_capacity()
        return self.capacity

    def close(self) -> None:
        if not self.lock.acquire(timeout=self.timeout + 2):
            self.close_pending = True  # the thread stuck in a call logs out when it returns
            return
        try:
            self._close_locked()
        finally:
            self.lock.release()

    def _close_locked(self) -> None:
        self.closed = True
        self.close_pending = False
        if self.session is not None:
            session, self.session = self.session, None
            session.close()


class IscsiHandle(ThreadedHandle):
    """An open image: a `BlockHandle` in abandonable worker threads, plus LUN size changes.

    Writing past the LUN's end grows the LUN first (tgtadm on the trio side), while the recorded
    image size stays what was last made durable; flush and close record the size written and cut
    the backing file back to it. One call at a time per handle (one session).
    """

    def __init__(self, inner: BlockHandle, driver: IscsiDriver, key: str, size: int) -> None:
        super().__init__(inner, driver.limiter)
        self.block = inner
        self.driver = driver
        self.key = key
        self.serial = trio.Lock()
        self.recorded = size  # the image size the backend holds
        inner.size = size

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self.limiter)

    async def apread(self, offset: int, size: int) -> bytes:
        async with self.serial:
            return await self._thread(self.block.pread, offset, size)

    async def apwrite(self, offset: int, data: bytes) -> int:
        async with self.serial:
            end = offset + len(data)
            if self.block.writable and end > self.block.capacity:
                cap = self.block.capacity
                grown = max(round_up(end), min(2 * cap, cap + GROW_MAX), cap + GROW_MIN)
                path = self.driver.s.path(self.key)
                await self.driver.files.grow(path, grown, self.recorded)
                await self.driver.targets.resize_lun(self.key, path, grown)
                await self._thread(self.block.refresh)
            return await self._thread(self.block.pwrite, offset, data)

    async def atruncate(self, size: int) -> None:
        if not self.block.writable:
            raise OSError(errno.EBADF, "iscsi driver: the image is open read-only")
        async with self.serial:
            await self._record(size)
            self.block.size = size

    async def _record(self, size: int) -> None:
        lun = round_up(size) != self.block.capacity
        await self.driver._set_size(self.key, size, lun=lun)
        self.recorded = size
        if lun:
            await self._thread(self.block.refresh)

    async def _settle(self) -> None:
        """Record the size written; cut a grown backing file back to it."""
        if self.block.writable and (self.block.size != self.recorded
                                    or self.block.capacity != round_up(self.block.size)):
            await self._record(self.block.size)

    async def aflush(self) -> None:
        async with self.serial:
            await self._thread(self.block.flush)
            await self._settle()

    async def aclose(self) -> None:
        async with self.serial:
            try:
                if not self.block.closed:
                    await self._settle()
            finally:
                await self._thread(self.block.close)


# ------------------------------------------------------------------------------------- driver


class IscsiDriver(Driver):
    name = "iscsi"
    cheap_clone = False  # `cp --reflink=auto` shares blocks only where STORE's filesystem can

    def __init__(self, tm_raw: dict[str, Any], state_dir: Path) -> None:
        super().__init__(tm_raw, state_dir)
        self.invalid: InvalidArgument | None = None
        try:
            self.s = Settings.parse(tm_raw)
        except InvalidArgument as e:  # start() reports it and the backend turns ERROR
            self.invalid = e
            self.s = Settings("127.0.0.1:3260", "127.0.0.1", 3260, DEFAULT_PREFIX, "tgt", 0, "/nonexistent",
                              None, DEFAULT_TIMEOUT, ())
        self.timeout = self.s.timeout
        self.limiter = trio.CapacityLimiter(16)
        self.runner = Runner(self.s.ssh, self.timeout)
        self.files: Files = (RemoteFiles(self.s.store, self.runner) if self.s.ssh
                             else LocalFiles(self.s.store, self.runner, self.limiter))
        self.targets: Targets = (LioTargets(self.s, self.limiter) if self.s.manager == "lio"
                                 else TgtTargets(self.s, self.runner))
        self.initiator = initiator_name(self.s.prefix)
        self.count = SessionCount()
        self.attached: dict[tuple[str, str, str], Session] = {}

    @classmethod
    def validate(cls, tm_raw: dict[str, Any], state_dir: Path, backend_name: str) -> dict[str, Any]:
        s = Settings.parse(tm_raw)
        if s.manager == "lio":
            try:
                LioTargets(s, trio.CapacityLimiter(1))._lib()
            except OSError as e:
                raise InvalidArgument(e.strerror or str(e),
                                      "TARGET_MANAGER=tgt works without kernel support") from None
        if not s.ssh:
            try:
                os.makedirs(s.store, mode=0o700, exist_ok=True)
            except OSError as e:
                raise InvalidArgument(f"iscsi driver: cannot use STORE {s.store!r}: {e.strerror}",
                                      "STORE must be a directory root can create and write") from None
        return s.to_raw()

    def sessions(self) -> int:
        """Open initiator sessions (handles, attachments), so tests can count leaks."""
        return self.count.value

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self.limiter)

    async def _check_portal(self) -> None:
        """A TCP connect to PORTAL within TIMEOUT."""
        what = f"iscsi driver: PORTAL {self.s.portal}"
        try:
            with trio.fail_after(self.timeout):
                infos = await trio.socket.getaddrinfo(self.s.host, self.s.port, type=socket.SOCK_STREAM)
                family, kind, proto, _, address = infos[0]
                sock = trio.socket.socket(family, kind, proto)
                with sock:
                    await sock.connect(address)
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, f"{what} does not answer within {self.timeout:g}s") from None
        except socket.gaierror as e:
            raise OSError(errno.EHOSTUNREACH, f"{what}: unknown host ({e.strerror})") from None
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise OSError(e.errno or errno.EIO, f"{what}: {reason} (is the target running?)") from None

    async def start(self) -> None:
        """Portal answers, target manager answers, STORE exists; then every backing file gets its
        target back (after a tgtd restart they are all gone)."""
        if self.invalid is not None:
            raise OSError(errno.EIO, self.invalid.message)
        await self._check_portal()
        await self.targets.check()
        await self.files.check()
        luns = await self.targets.luns()
        _, files = await self.files.usage()
        made = 0
        for key, size in files.items():
            if not luns.get(key):
                await self.targets.ensure(key, self.s.path(key), size)
                made += 1
            elif luns[key] != self.s.path(key):
                log.info("iscsi target %s is backed by %s, not %s", self.s.iqn(key), luns[key],
                         self.s.path(key))
        if made:
            log.info("iscsi backend at %s: re-created %d target(s) from STORE", self.s.portal, made)

    async def stop(self) -> None:
        """Log out the attachment sessions."""
        sessions, self.attached = list(self.attached.values()), {}
        for session in sessions:
            with contextlib.suppress(OSError):
                await self._thread(session.close)

    async def monitor(self) -> Capacity:
        await self._check_portal()
        await self.targets.check()
        capacity, _ = await self.files.usage()
        return capacity

    async def allocate(self, key: str, size: int) -> None:
        path = self.s.path(key)
        await self.files.create(path, size)  # exclusive: the key is new
        try:
            # ensure, not create: a start() running meanwhile may have made the target of the new file
            await self.targets.ensure(key, path, round_up(size))
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                await self.files.remove(path)
            raise

    async def delete(self, key: str) -> None:
        path = self.s.path(key)
        await self.targets.delete_lun(key)
        await self.files.remove(path)

    async def size(self, key: str) -> int:
        return await self.files.size(self.s.path(key))

    async def _set_size(self, key: str, size: int, lun: bool = True) -> None:
        """The image's new size; with `lun`, the target is told (its LUN changes length)."""
        path = self.s.path(key)
        await self.files.set_size(path, size)
        if lun:
            await self.targets.resize_lun(key, path, round_up(size))

    async def resize(self, key: str, size: int) -> None:
        if size < 0:
            raise OSError(errno.EINVAL, "iscsi driver: negative size")
        await self._set_size(key, size)

    async def clone(self, src_key: str, dst_key: str, progress: Progress | None = None) -> None:
        src, dst = self.s.path(src_key), self.s.path(dst_key)
        await self.files.copy(src, dst)
        try:
            size = await self.files.size(dst)
            await self.targets.ensure(dst_key, dst, size)
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                await self.files.remove(dst)
            raise
        if progress:
            progress(size)

    def _connect(self, key: str) -> Session:
        return Session(self.s.portal, self.s.iqn(key), self.initiator, self.timeout, self.count)

    async def _login(self, key: str) -> Session:
        """A session made in a worker thread; if the caller gave up meanwhile, it is closed."""
        check_key(key)
        state = {"abandoned": False, "session": None}
        lock = threading.Lock()

        def work() -> Session:
            session = self._connect(key)
            with lock:
                if state["abandoned"]:
                    session.close()
                    raise OSError(errno.ETIMEDOUT, "iscsi driver: login abandoned")
                state["session"] = session
            return session

        try:
            return await self._thread(work)
        except trio.Cancelled:
            with lock:
                state["abandoned"] = True
                late = state["session"]
            if isinstance(late, Session):
                threading.Thread(target=late.close, daemon=True).start()
            raise

    async def open(self, key: str, writable: bool) -> Handle:
        size = await self.files.size(self.s.path(key))
        session = await self._login(key)
        block = BlockHandle(lambda: self._connect(key), session, writable, self.timeout)
        return IscsiHandle(block, self, key, size)

    async def keys(self) -> list[str]:
        luns = await self.targets.luns()
        _, files = await self.files.usage()
        return sorted(set(luns) | set(files))

    async def attach(self, key: str, host: str, path: str) -> None:
        """Log this host's userspace initiator in to the image's target until detach."""
        ref = (key, host, path)
        if ref in self.attached:
            return
        session = await self._login(key)
        if ref in self.attached:  # a concurrent attach won
            await self._thread(session.close)
            return
        self.attached[ref] = session

    async def detach(self, key: str, host: str, path: str) -> None:
        session = self.attached.pop((key, host, path), None)
        if session is not None:
            await self._thread(session.close)

    def local_path(self, key: str) -> str | None:
        return None
