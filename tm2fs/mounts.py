"""The mount table (/proc/self/mounts), read one way everywhere.

Why a module: the kernel writes a mount point with space, tab, newline and backslash escaped as
octal (`\\040 \\011 \\012 \\134`), so comparing raw fields with a path is wrong for exactly the
names an admin did not expect. Every reader of the table goes through `mounts()`.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

MOUNTS = "/proc/self/mounts"
MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


class Mount(NamedTuple):
    source: bytes
    point: bytes
    fstype: str


def unescape(field: bytes) -> bytes:
    """A /proc/mounts field as the path it names. The kernel escapes every backslash too, so a
    backslash there always starts an octal escape."""
    return _ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field)


def mounts() -> list[Mount]:
    """This process's mount table, in mount order, with the fields unescaped."""
    with open(MOUNTS, "rb") as f:
        rows = [line.split(b" ") for line in f.read().splitlines()]
    return [Mount(unescape(r[0]), unescape(r[1]), r[2].decode(errors="replace"))
            for r in rows if len(r) >= 3]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Is `path` itself a mount point (as given, not resolved: a FUSE mount may not answer)."""
    target = os.fsencode(os.path.abspath(path))
    return any(m.point == target for m in mounts())


def device(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The (major, minor) device of the filesystem mounted at `path` (the last mount there), from
    /proc/self/mountinfo: no stat of a FUSE mount that this very process may have to answer."""
    target = os.fsencode(os.path.abspath(path))
    found = None
    with open(MOUNTINFO, "rb") as f:
        for line in f.read().splitlines():
            fields = line.split(b" ")
            if len(fields) > 4 and unescape(fields[4]) == target:
                major, _, minor = fields[2].partition(b":")
                found = (int(major), int(minor))
    return found


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem holding `path`: the last-mounted of the longest mount points
    above it (a later mount over the same point hides the earlier one)."""
    real = os.fsencode(os.path.realpath(path))
    best, kind = b"", ""
    for m in mounts():
        inside = real == m.point or real.startswith(m.point.rstrip(b"/") + b"/")
        if inside and len(m.point) >= len(best):
            best, kind = m.point, m.fstype
    return kind
