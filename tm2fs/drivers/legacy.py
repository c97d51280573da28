"""`legacy`: images kept by classic transfer-manager scripts (OpenNebula's tm_shared / tm_ssh style).

Why: sites have years of tested TM scripts that know how to copy, move, create and delete images on
their storage; this driver lets such a script set serve as a tm2fs backend without rewriting it.

How: TM_RAW names a script directory (SCRIPTS), an action map inside it (TM_CONF: lines
`CLONE = shared/tm_clone.sh`), the HOST that holds the images and the directory PATH on it. Image
KEY lives at HOST:PATH/KEY. The TM2 actions map onto the scripts:

- allocate -> MKIMAGE SIZE_MIB raw HOST:PATH/KEY (a local HOST then gets the exact byte size)
- delete   -> DELETE HOST:PATH/KEY
- clone    -> CLONE HOST:PATH/SRC HOST:PATH/DST
- open     -> CLONE HOST:PATH/KEY into a local staging file under STATE_DIR/staging; reads and writes
  go to that file; flush/close push it back with CLONE to HOST:PATH/KEY.tmp-XXXXXXXX and MV over
  HOST:PATH/KEY (an atomic replace). Every open costs one full (sparse-aware) copy, and every
  flush of a changed image another one plus a rename, even for a local shared directory:
  correctness first.
- size, resize, monitor, keys, local_path work on the files directly when HOST is this host;
  for a remote HOST, size/resize answer Unsupported, monitor answers "unknown" and keys None,
  and allocate rounds sizes up to whole MiB.

Every script runs as an argument list (never through a shell) in its own process group, bounded
by SCRIPT_TIMEOUT; a timeout kills the whole group and raises OSError ETIMEDOUT, a backend fault
(the backend turns ERROR). A failure raises a Tm2Error carrying the script's
`ERROR MESSAGE --8<------` block. Exit status 17 (EEXIST) means "the destination exists, nothing
was created" (the shipped scripts never overwrite an image) and raises Exists.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import trio

from ..errors import Exists, InvalidArgument, Tm2Error, Unsupported
from .base import (
    Capacity,
    Driver,
    Handle,
    InlineHandle,
    Progress,
    check_key,
    directory_capacity,
    fsync_dir,
)

log = logging.getLogger(__name__)

DEFAULT_SCRIPTS = Path(__file__).resolve().parents[2] / "drivers" / "legacy"
DEFAULT_CONF = "tm_shared.conf"
DEFAULT_HOST = "localhost"
DEFAULT_TIMEOUT = 300.0
KNOWN = {"SCRIPTS", "TM_CONF", "HOST", "PATH", "SCRIPT_TIMEOUT"}
REQUIRED_ACTIONS = ("CLONE", "MV", "DELETE", "MKIMAGE")
MIB = 2**20
EXISTS_STATUS = 17  # EEXIST: the destination exists, the script created nothing
CLEANUP_TIMEOUT = 30.0  # bound on the DELETE that removes a partial destination
HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
ACTION_RE = re.compile(r"([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*)")
MARKED_RE = re.compile(r"ERROR MESSAGE --8<------\n(.*?)\n?ERROR MESSAGE ------>8--", re.S)


def is_local_host(host: str) -> bool:
    """The host the scripts treat as this one (they run commands locally instead of over ssh)."""
    return host in ("localhost", "127.0.0.1", socket.gethostname())


def parse_action_map(scripts: Path, conf: str) -> dict[str, Path]:
    """Read an action map (`ACTION = relative/script.sh`, # comments); every script must exist, be
    executable and stay inside `scripts`. Raises InvalidArgument."""
    hint = f"see {DEFAULT_SCRIPTS / 'README.md'}"
    root = scripts.resolve()
    conf_path = (scripts / conf).resolve()
    if not conf_path.is_relative_to(root):
        raise InvalidArgument(f"legacy driver: TM_CONF {conf!r} is outside SCRIPTS {str(scripts)!r}", hint)
    try:
        text = conf_path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"legacy driver: cannot read the action map {str(conf_path)!r}: {e}",
                              hint) from None
    actions: dict[str, Path] = {}
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        m = ACTION_RE.fullmatch(line)
        if not m:
            raise InvalidArgument(f"legacy driver: {conf}:{number}: not `ACTION = script`: {line!r}", hint)
        action, value = m.group(1).upper(), m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if not value:
            raise InvalidArgument(f"legacy driver: {conf}:{number}: {action} names no script", hint)
        script = (scripts / value).resolve()
        if not script.is_relative_to(root):
            raise InvalidArgument(
                f"legacy driver: {conf}:{number}: script {value!r} is outside SCRIPTS {str(scripts)!r}",
                "scripts must live inside the SCRIPTS directory (no `..`, no absolute paths elsewhere)")
        if not script.is_file() or not os.access(script, os.X_OK):
            raise InvalidArgument(
                f"legacy driver: {conf}:{number}: script {str(script)!r} for {action} is missing or "
                "not executable", f"chmod +x {script}")
        actions[action] = script
    missing = [a for a in REQUIRED_ACTIONS if a not in actions]
    if missing:
        raise InvalidArgument(f"legacy driver: {conf} maps no script for {', '.join(missing)}",
                              f"the driver needs {', '.join(REQUIRED_ACTIONS)}")
    return actions


def script_message(stderr: bytes) -> str:
    """The text between the ERROR MESSAGE markers (the last block), else the last stderr lines."""
    text = stderr.decode(errors="replace")
    blocks = MARKED_RE.findall(text)
    if blocks:
        return blocks[-1].strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-5:]) if lines else "(no error output)"


def script_failure(action: str, script: Path, status: int, stderr: bytes) -> Tm2Error:
    """The error for a script that exited non-zero."""
    message = script_message(stderr)
    how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
    text = f"legacy driver: {action} script {script.name} failed ({how}): {message}"
    if status == EXISTS_STATUS:
        return Exists(text)
    return Tm2Error(text, f"the script is {script}; its log lines are on its stdout")


async def _kill_group(process: trio.Process) -> None:
    """On cancellation kill the script and everything it started (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


class LegacyDriver(Driver):
    name = "legacy"
    cheap_clone = False

    def __init__(self, tm_raw: dict[str, Any], state_dir: Path) -> None:
        super().__init__(tm_raw, state_dir)
        self.scripts = Path(tm_raw.get("SCRIPTS", DEFAULT_SCRIPTS))
        self.conf = str(tm_raw.get("TM_CONF", DEFAULT_CONF))
        self.host = str(tm_raw.get("HOST", DEFAULT_HOST))
        self.root = str(tm_raw["PATH"])
        self.timeout = float(tm_raw.get("SCRIPT_TIMEOUT", DEFAULT_TIMEOUT))
        self.local = is_local_host(self.host)
        self.staging = state_dir / "staging"
        self.limiter = trio.CapacityLimiter(16)
        try:
            self.actions = parse_action_map(self.scripts, self.conf)
        except InvalidArgument:
            self.actions = {}  # start() reports it and turns the backend to ERROR

    @classmethod
    def validate(cls, tm_raw: dict[str, Any], state_dir: Path, backend_name: str) -> dict[str, Any]:
        raw = {k.upper(): v for k, v in tm_raw.items()}
        unknown = set(raw) - KNOWN
        if unknown:
            raise InvalidArgument(f"legacy driver: unknown TM_RAW attribute(s) {', '.join(sorted(unknown))}",
                                  f"the legacy driver takes {', '.join(sorted(KNOWN))}")
        scripts = str(raw.get("SCRIPTS", DEFAULT_SCRIPTS))
        if not os.path.isabs(scripts) or "\0" in scripts or not os.path.isdir(scripts):
            raise InvalidArgument(f"legacy driver: SCRIPTS {scripts!r} is not an absolute directory",
                                  f"the shipped script sets are in {DEFAULT_SCRIPTS}")
        conf = str(raw.get("TM_CONF", DEFAULT_CONF))
        if "\0" in conf:
            raise InvalidArgument(f"legacy driver: TM_CONF {conf!r} is not a file name")
        parse_action_map(Path(scripts), conf)
        host = str(raw.get("HOST", DEFAULT_HOST))
        if not HOST_RE.fullmatch(host):
            raise InvalidArgument(f"legacy driver: HOST {host!r} is not a plain host name",
                                  "letters, digits, '.', '-' and '_' only (no user@, no port, no options)")
        if "PATH" not in raw:
            raise InvalidArgument("legacy driver: PATH is required",
                                  "PATH = the absolute directory of the images on HOST")
        path = str(raw["PATH"])
        if not os.path.isabs(path) or "\0" in path or "\n" in path:
            raise InvalidArgument(f"legacy driver: PATH {path!r} is not an absolute path",
                                  "PATH = the absolute directory of the images on HOST")
        path = os.path.normpath(path)
        if path == "/":
            raise InvalidArgument("legacy driver: PATH must not be the root directory")
        try:
            timeout = float(str(raw.get("SCRIPT_TIMEOUT", DEFAULT_TIMEOUT)))
        except ValueError:
            raise InvalidArgument(f"legacy driver: SCRIPT_TIMEOUT {raw['SCRIPT_TIMEOUT']!r} is not a "
                                  "number of seconds") from None
        if not 0 < timeout <= 86400:
            raise InvalidArgument("legacy driver: SCRIPT_TIMEOUT must be between 0 and 86400 seconds")
        if is_local_host(host):
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as e:
                raise InvalidArgument(f"legacy driver: cannot use PATH {path!r}: {e.strerror}") from None
        return {"SCRIPTS": scripts, "TM_CONF": conf, "HOST": host, "PATH": path,
                "SCRIPT_TIMEOUT": f"{timeout:g}"}

    marked = True

    @classmethod
    def storage_dir(cls, tm_raw: dict[str, Any], host: str) -> str | None:
        if "PATH" not in tm_raw or not is_local_host(str(tm_raw.get("HOST", DEFAULT_HOST))):
            return None  # the scripts' files are on another host
        return str(tm_raw["PATH"])

    # -- helpers

    def _arg(self, key: str) -> str:
        """The `host:/path` argument naming an image."""
        check_key(key, "legacy")
        return f"{self.host}:{self._path(key)}"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def _script(self, action: str) -> Path:
        script = self.actions.get(action)
        if script is None:
            raise Tm2Error(f"legacy driver: {self.conf} maps no script for {action}")
        return script

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self.limiter)

    async def _run(self, action: str, *args: str) -> str:
        """Run the script of `action` with `args`; its stdout, or a Tm2Error."""
        script = self._script(action)
        try:
            with trio.fail_after(self.timeout):
                result = await trio.run_process(
                    [str(script), *args], capture_stdout=True, capture_stderr=True, check=False,
                    start_new_session=True, deliver_cancel=_kill_group)
        except trio.TooSlowError:
            raise self._timed_out(action, script) from None
        return self._result(action, script, result.returncode, result.stdout, result.stderr)

    def _run_blocking(self, action: str, *args: str) -> str:
        """`_run` for the synchronous Handle methods (blocks the calling thread)."""
        script = self._script(action)
        with subprocess.Popen([str(script), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) as proc:
            try:
                out, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise self._timed_out(action, script) from None
        return self._result(action, script, proc.returncode, out, err)

    def _timed_out(self, action: str, script: Path) -> OSError:
        """A script that outlived SCRIPT_TIMEOUT (its process group is killed): ETIMEDOUT, a
        backend fault, so the backend turns ERROR and its files answer EIO until the monitor
        sees it well again."""
        return OSError(errno.ETIMEDOUT,
                       f"legacy driver: {action} script {script.name} timed out after "
                       f"{self.timeout:g}s and was killed (raise SCRIPT_TIMEOUT in TM_RAW, or "
                       "check the storage host)")

    def _result(self, action: str, script: Path, status: int, out: bytes, err: bytes) -> str:
        if status != 0:
            raise script_failure(action, script, status, err)
        text = out.decode(errors="replace")
        if text.strip():
            log.debug("%s (%s): %s", action, script.name, text.strip())
        return text

    async def _discard(self, key: str) -> None:
        """Remove a partial destination after a failure; never raises, bounded even if cancelled."""
        with trio.CancelScope(shield=True), trio.move_on_after(min(self.timeout, CLEANUP_TIMEOUT)):
            try:
                await self._run("DELETE", self._arg(key))
            except (Tm2Error, OSError) as e:
                log.info("legacy driver: could not remove partial %s: %s", key, e)

    async def _push(self, key: str, staging: Path) -> None:
        """Copy a staging file over HOST:PATH/key atomically: CLONE to a temporary key, then MV."""
        tmp = f"{key}.tmp-{secrets.token_hex(4)}"
        try:
            await self._run("CLONE", f"localhost:{staging}", self._arg(tmp))
            await self._run("MV", self._arg(tmp), self._arg(key))
        except BaseException:
            await self._discard(tmp)
            raise

    def _push_blocking(self, key: str, staging: Path) -> None:
        tmp = f"{key}.tmp-{secrets.token_hex(4)}"
        try:
            self._run_blocking("CLONE", f"localhost:{staging}", self._arg(tmp))
            self._run_blocking("MV", self._arg(tmp), self._arg(key))
        except BaseException:
            try:
                self._run_blocking("DELETE", self._arg(tmp))
            except (Tm2Error, OSError) as e:
                log.info("legacy driver: could not remove partial %s: %s", tmp, e)
            raise

    def _local_only(self, what: str) -> None:
        if not self.local:
            raise Unsupported(f"legacy driver: {what} needs a local HOST (HOST is {self.host!r})",
                              "the scripts have no action for it; use a shared PATH on this host")

    # -- the contract

    async def start(self) -> None:
        try:
            self.actions = await self._thread(parse_action_map, self.scripts, self.conf)
        except InvalidArgument as e:
            raise OSError(errno.EIO, e.message) from None  # the backend turns ERROR with this message
        if self.local and not await self._thread(os.path.isdir, self.root):
            raise FileNotFoundError(errno.ENOENT, "backend directory is gone", self.root)

    async def monitor(self) -> Capacity:
        if not self.local:
            return Capacity(None, None, None)
        return await self._thread(self._monitor)

    def _monitor(self) -> Capacity:
        return directory_capacity(self.root)

    async def allocate(self, key: str, size: int) -> None:
        """MKIMAGE of ceil(size / MiB) MiB, raw; a local image is then cut to the exact size."""
        arg = self._arg(key)
        try:
            await self._run("MKIMAGE", str(math.ceil(size / MIB)), "raw", arg)
        except Exists:
            raise  # nothing was created: nothing to remove
        except BaseException:
            await self._discard(key)
            raise
        if self.local:
            try:
                await self._thread(_settle, self._path(key), size)
            except BaseException:
                await self._discard(key)
                raise

    async def delete(self, key: str) -> None:
        await self._run("DELETE", self._arg(key))

    async def size(self, key: str) -> int:
        check_key(key, "legacy")
        self._local_only("size")
        st = await self._thread(os.stat, self._path(key))
        return st.st_size

    async def allocated(self, key: str) -> int | None:
        """The image file's blocks where it is on this host; elsewhere no script tells."""
        check_key(key, "legacy")
        if not self.local:
            return None
        st = await self._thread(os.stat, self._path(key))
        return st.st_blocks * 512

    async def resize(self, key: str, size: int) -> None:
        check_key(key, "legacy")
        self._local_only("resize")
        await self._thread(_resize, self._path(key), size)

    async def clone(self, src_key: str, dst_key: str, progress: Progress | None = None) -> None:
        src, dst = self._arg(src_key), self._arg(dst_key)
        try:
            await self._run("CLONE", src, dst)
        except Exists:
            raise
        except BaseException:
            await self._discard(dst_key)
            raise
        if progress and self.local:
            st = await self._thread(os.stat, self._path(dst_key))
            progress(st.st_size)

    async def open(self, key: str, writable: bool) -> Handle:
        """A staging copy of the image (CLONE to STATE_DIR/staging/open-XXXX/image)."""
        src = self._arg(key)
        directory = Path(await self._thread(_staging_dir, self.staging))
        file = directory / "image"
        try:
            await self._run("CLONE", src, f"localhost:{file}")
            fd = await self._thread(os.open, file, os.O_RDWR if writable else os.O_RDONLY)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return StagingHandle(self, key, file, fd)

    async def keys(self) -> list[str] | None:
        if not self.local:
            return None
        return await self._thread(
            lambda: [e.name for e in os.scandir(self.root) if e.is_file(follow_symlinks=False)])

    def local_path(self, key: str) -> str | None:
        return self._path(key) if self.local else None

    def source(self, key: str) -> dict[str, Any] | None:
        """The file itself when HOST is this host (a VM then bypasses the scripts: they copy
        whole images, and nothing else writes it while the VM holds the lease)."""
        return {"type": "file", "path": self._path(check_key(key, "legacy"))} if self.local else None


class StagingHandle(InlineHandle):
    """An open image: a local staging copy, pushed back to the host by flush and close."""

    def __init__(self, driver: LegacyDriver, key: str, file: Path, fd: int) -> None:
        self.driver = driver
        self.key = key
        self.file = file
        self.fd = fd
        self.changes = 0  # bumped by every change
        self.pushed = 0  # the value of `changes` the last successful push saw
        self.lock = trio.Lock()  # one push at a time, so an older copy never lands last
        self.closed = False

    @property
    def dirty(self) -> bool:
        return self.changes != self.pushed

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, offset: int, data: bytes) -> int:
        n = os.pwrite(self.fd, data, offset)
        self.changes += 1
        return n

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.changes += 1

    def flush(self) -> None:
        """Push the staging copy to the host (blocking)."""
        if self.dirty:
            seen = self.changes
            self.driver._push_blocking(self.key, self.file)
            self.pushed = seen

    def close(self) -> None:
        """Push if changed, then drop the staging copy (kept, and named, if the push failed)."""
        if self.closed:
            return
        try:
            self.flush()
        except (Tm2Error, OSError) as e:
            self._close_fd()
            raise _kept(e, self.file) from e
        except BaseException:
            self._close_fd()
            raise
        self._close_fd()
        shutil.rmtree(self.file.parent, ignore_errors=True)

    async def aflush(self) -> None:
        async with self.lock:
            if self.dirty:
                seen = self.changes
                await self.driver._push(self.key, self.file)
                self.pushed = seen

    async def aclose(self) -> None:
        if self.closed:
            return
        try:
            await self.aflush()
        except (Tm2Error, OSError) as e:
            self._close_fd()
            raise _kept(e, self.file) from e
        except BaseException:
            self._close_fd()
            raise
        self._close_fd()
        await trio.to_thread.run_sync(shutil.rmtree, self.file.parent, True)

    def _close_fd(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def _kept(e: Tm2Error | OSError, file: Path) -> Tm2Error | OSError:
    """A failed final push: the changes stay in the staging file, whose name the admin needs.
    An OSError keeps its errno, so a backend fault (a timeout) still turns the backend ERROR."""
    if isinstance(e, OSError):
        return OSError(e.errno, f"{e.strerror or e} (the unsaved image is kept in {file})")
    return Tm2Error(f"{e.message} (the unsaved image is kept in {file})",
                    "copy it back by hand once the storage works again")


def _staging_dir(staging: Path) -> str:
    os.makedirs(staging, mode=0o700, exist_ok=True)
    return tempfile.mkdtemp(prefix="open-", dir=staging)


def _settle(path: str, size: int) -> None:
    """Give a new local image its exact size and make it durable."""
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def _resize(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
