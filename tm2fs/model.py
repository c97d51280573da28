"""The words of the pool as values: backends, namespace entries, images, attachments, callers.

Immutable rows as the pool store returns them (a change makes a new value), so the in-memory view
can hand them out without copies and tell "unchanged" by identity.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field
from typing import Any

ROOT_INO = 1
STATES = ("INIT", "READY", "DISABLED", "ERROR")  # and REMOTE: a host-local backend of another host
ROLES = ("SAN", "REPOSITORY")


def now_ns() -> int:
    return time.time_ns()


DEFAULT_CLUSTER = "default"  # of backends and hosts that name none


@dataclass(frozen=True, slots=True)
class Node:
    """A namespace entry: a directory, an image (a regular file) or a symlink."""

    ino: int
    parent: int | None
    name: str
    backend_id: int | None
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    target: str | None
    image_id: int | None
    #: bumped by every transaction that touches the row (PostgreSQL): of two versions of a row
    #: heard from different places, the higher is the newer (`core/pool.py`)
    ver: int = field(default=0, compare=False)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(frozen=True, slots=True)
class Image:
    id: int
    backend_id: int
    key: str
    size: int
    created: float
    ver: int = field(default=0, compare=False)  # as Node.ver


@dataclass(frozen=True, slots=True)
class Backend:
    id: int
    name: str
    state: str
    tm: str
    tm_raw: dict[str, Any]
    capacity: int | None
    total: int | None
    free: int | None
    used: int | None
    cost: int
    overcommit: float
    reserved: float
    priority: int
    role: str
    tags: list[str]
    attrs: dict[str, Any]
    cluster: str
    timeout: float
    error: str | None
    root_ino: int
    created: float
    updated: float
    monitored: float | None
    ver: int = field(default=0, compare=False)  # as Node.ver


@dataclass(frozen=True, slots=True)
class Attachment:
    id: int
    image_id: int
    host: str
    path: str
    link_ino: int | None
    created: float
    uid: int | None = None  # who attached it (None: made before schema version 3)
    native: bool = False  # the hypervisor uses the image's own path, not the mount


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks. `origin` is 'fs' when the kernel already checked permissions (default_permissions)."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    origin: str = "api"

    @property
    def is_root(self) -> bool:
        return self.uid == 0


ROOT = Caller(0, 0, origin="internal")


@dataclass(slots=True)
class Attr:
    """What stat shows for a namespace entry."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    backend_id: int | None
    allocated: int | None = None  # bytes its backend holds (st_blocks); None: unknown, or no image
