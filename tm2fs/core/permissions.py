"""Who may do what: POSIX modes for callers the kernel did not check (the API's), and root-only
administration. The mount is checked by the kernel itself (`default_permissions`)."""

from __future__ import annotations

import stat

from .. import errors as err
from ..model import Caller, Node

READ, WRITE, EXEC = 4, 2, 1


def require_root(caller: Caller, what: str) -> None:
    if not caller.is_root:
        raise err.PermissionDenied(f"only root may {what}", "run the command as root")


def check(caller: Caller, n: Node, want: int) -> None:
    """POSIX permission check for callers the kernel did not check (the API's)."""
    if caller.origin in ("fs", "internal") or caller.is_root:
        return
    if caller.uid == n.uid:
        bits = (n.mode >> 6) & 7
    elif n.gid == caller.gid or n.gid in caller.groups:
        bits = (n.mode >> 3) & 7
    else:
        bits = n.mode & 7
    if want & ~bits:
        raise err.PermissionDenied(f"permission denied on {n.name or '/'}")


def may(caller: Caller, n: Node | None, want: int) -> bool:
    if caller.is_root:
        return True
    if n is None:
        return False
    try:
        check(caller, n, want)
    except err.Tm2Error:
        return False
    return True


def sticky(caller: Caller, parent: Node, n: Node) -> None:
    """In a sticky directory only the entry's or the directory's owner (or root) removes it."""
    if (parent.mode & stat.S_ISVTX and caller.origin == "api" and not caller.is_root
            and caller.uid not in (n.uid, parent.uid)):
        raise err.NotPermitted(f"{n.name}: sticky directory")


def new_gid(caller: Caller, parent: Node) -> int:
    """A setgid directory hands its group to what is made in it."""
    return parent.gid if parent.mode & stat.S_ISGID else caller.gid
