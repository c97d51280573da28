"""Whose directory is it: backends' storage never overlaps, and the sweep proves what it deletes.

A backend whose data is a local directory (dir, legacy on this host, iscsi STORE here) may not
share it with another backend, sit inside or around another's, or the state directory, or be a
system directory: the crash sweep of one would delete the other's images. The check compares
real paths (symlinks resolved) and the directories' identity (device, inode: bind mounts).

A marked backend's directory holds `.tm2fs-backend` naming the pool and the backend; the sweep
deletes there only when the marker names exactly this backend of this pool. A directory without
one (made before markers) gets it when it holds no image file the store does not know.

Every call here touches admin-given paths (maybe on a hung NFS server): the blocking functions
run in worker threads the backend's timeout abandons, never on the trio loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import trio

from .. import errors as err

MARKER = ".tm2fs-backend"
# the directories themselves (not what is below them: /var/lib/tm2fs stays allowed)
SYSTEM = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/proc", "/run", "/sbin", "/sys",
                    "/usr", "/var"})
SYSTEM_RE = re.compile(r"/lib[^/]*")  # /lib, /lib32, /lib64, /libx32...
KEY_RE = re.compile(r"[0-9a-f]{32}")

T = TypeVar("T")


def is_key(name: str) -> bool:
    """A name the core could have given an image (the sweep never touches any other)."""
    return KEY_RE.fullmatch(name) is not None


async def in_thread(call: Callable[[], T], timeout: float, what: str) -> T:
    """A blocking call on an admin path, abandoned after `timeout` (then InvalidArgument)."""
    try:
        with trio.fail_after(timeout):
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise err.InvalidArgument(f"{what} timed out after {timeout:g}s",
                                  "is the storage reachable? nothing was changed") from None


# ------------------------------------------------------------------------------ overlap


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _lineage(path: str) -> set[tuple[int, int]]:
    """The identities of a directory and of every directory above it."""
    out = set()
    while True:
        ident = _identity(path)
        if ident is not None:
            out.add(ident)
        up = os.path.dirname(path)
        if up == path:
            return out
        path = up


def spelled_relation(path: str, other: str) -> str | None:
    """How `path` overlaps `other` as written (no syscalls): 'is', 'is inside', 'contains'."""
    path, other = os.path.normpath(path), os.path.normpath(other)
    if path == other:
        return "is"
    if _inside(path, other):
        return "is inside"
    if _inside(other, path):
        return "contains"
    return None


def _relation(path: str, other: str) -> str | None:
    """How `path` overlaps `other` (both real paths): 'is', 'is inside', 'contains' or None."""
    spelled = spelled_relation(path, other)
    if spelled is not None:
        return spelled
    mine, theirs = _identity(path), _identity(other)
    if mine is not None and mine == theirs:
        return "is"  # the same directory by another way (a bind mount)
    if theirs is not None and theirs in _lineage(path):
        return "is inside"
    if mine is not None and mine in _lineage(other):
        return "contains"
    return None


def check_place(what: str, path: str, others: Iterable[tuple[str, str]], state_dir: Path,
                mountpoint: str | None = None) -> None:
    """Blocking: refuse a backend directory `path` that is a system directory, lies on the pool's
    own mount (every image write would come back to the daemon through FUSE), or overlaps the
    state directory (outside its `backends/`) or another backend's (`others`: name, path)."""
    if mountpoint is not None and _inside(os.path.normpath(path), os.path.normpath(mountpoint)):
        raise err.InvalidArgument(f"{what} {path!r} is on the pool's own mount {mountpoint}",
                                  "give the backend a directory outside the mount")
    real = os.path.realpath(path)
    if mountpoint is not None and _inside(real, os.path.realpath(mountpoint)):
        raise err.InvalidArgument(f"{what} {path!r} leads onto the pool's own mount {mountpoint}",
                                  "give the backend a directory outside the mount")
    for p in (os.path.normpath(path), real):
        if p in SYSTEM or SYSTEM_RE.fullmatch(p):
            raise err.InvalidArgument(f"{what} {path!r} is a system directory",
                                      "give the backend a directory of its own, e.g. under "
                                      "/var/lib or a mount point of its own")
    state = os.path.realpath(state_dir)
    shelf = os.path.join(state, "backends")
    if not (_inside(real, shelf) and real != shelf):
        how = _relation(real, state)
        if how is not None:
            raise err.InvalidArgument(f"{what} {path!r} {how} the daemon's state directory {state}",
                                      "a backend's directory must be its own")
    for name, other in others:
        how = _relation(real, os.path.realpath(other)) or spelled_relation(path, other)
        if how is not None:
            raise overlap(what, path, how, name, other)


def overlap(what: str, path: str, how: str, name: str, other: str) -> err.InvalidArgument:
    how = "is the directory of" if how == "is" else f"{how} the directory of"
    return err.InvalidArgument(f"{what} {path!r} {how} backend {name} ({other})",
                               "backends must not share storage: the crash sweep of one would "
                               "delete the other's images; give this backend a directory of its own")


# ------------------------------------------------------------------------------ marker


def marker_text(pool_id: str, backend_id: int) -> str:
    return json.dumps({"pool": pool_id, "backend": backend_id}) + "\n"


def read_marker(directory: str) -> dict[str, Any] | None:
    """Blocking: the marker's content; None without one; {} when it cannot be read as one."""
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as f:
            data = json.loads(f.read(4096))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(directory: str, pool_id: str, backend_id: int) -> None:
    """Blocking: the marker, made durable and replaced atomically."""
    tmp = os.path.join(directory, MARKER + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, marker_text(pool_id, backend_id).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, MARKER))
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_marker(directory: str, pool_id: str, backend_id: int) -> None:
    """Blocking: drop the marker if it is this backend's (the backend is being deleted)."""
    if read_marker(directory) == {"pool": pool_id, "backend": backend_id}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, MARKER))


def _describe(marker: dict[str, Any]) -> str:
    if not marker:
        return f"its marker {MARKER} is unreadable"
    return (f"its marker {MARKER} names backend {marker.get('backend')} of pool "
            f"{marker.get('pool')}")


def refusal(directory: str, pool_id: str, backend_id: int | None, known: set[str],
            gone: Callable[[int], bool] = lambda _: False) -> str | None:
    """Blocking: why `directory` cannot be taken as backend `backend_id`'s (None: it can).
    Without a marker it may hold only the image files in `known`; a marker of this pool naming a
    backend that is `gone` (deleted) may be replaced."""
    marker = read_marker(directory)
    if marker is not None:
        if marker == {"pool": pool_id, "backend": backend_id}:
            return None
        backend = marker.get("backend")
        if not (marker.get("pool") == pool_id and isinstance(backend, int) and gone(backend)):
            return _describe(marker)
    strangers = sorted(e.name for e in os.scandir(directory)
                       if is_key(e.name) and e.name not in known)
    if strangers:
        return (f"it has no marker of this backend and holds {len(strangers)} image file(s) this "
                f"backend did not make (e.g. {strangers[0]})")
    return None


def claim(directory: str, pool_id: str, backend_id: int, known: set[str]) -> str | None:
    """Blocking: the marker written if the directory can be taken as this backend's, else why
    not (nothing written)."""
    why = refusal(directory, pool_id, backend_id, known)
    if why is None and read_marker(directory) is None:
        write_marker(directory, pool_id, backend_id)
    return why
