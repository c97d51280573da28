"""Who may do what: the one place the pool's permission model is written as code (the README's
"Who may do what" table says the same in words).

POSIX modes decide everything about entries. The kernel already checks the mount's callers
(`default_permissions`), so `check` lets them through; the API's callers are checked here the
same way. Some decisions the kernel cannot make, because they are not about the entry it checks:
whether a symlink becomes an attachment (the kernel checked only the link's directory, not the
image), who may end an attachment, who may name another host, and which names a view shows.
Those are checked here explicitly, for every caller.
"""

from __future__ import annotations

import stat
from collections.abc import Callable

from .. import errors as err
from ..model import ROOT_INO, Attachment, Caller, Node

READ, WRITE, EXEC = 4, 2, 1


def require_root(caller: Caller, what: str) -> None:
    """Administration (backends, breaking leases, naming other hosts): root only."""
    if not caller.is_root:
        raise err.PermissionDenied(f"only root may {what}", "run the command as root")


def allows(caller: Caller, n: Node, want: int) -> bool:
    """POSIX: the owner's, else the group's, else the others' bits must hold all of `want`."""
    if caller.is_root or caller.origin == "internal":
        return True
    if caller.uid == n.uid:
        bits = (n.mode >> 6) & 7
    elif n.gid == caller.gid or n.gid in caller.groups:
        bits = (n.mode >> 3) & 7
    else:
        bits = n.mode & 7
    return not want & ~bits


def check(caller: Caller, n: Node, want: int) -> None:
    """POSIX permission check for callers the kernel did not check (the API's)."""
    if caller.origin == "fs" or allows(caller, n, want):
        return
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


# ---------------------------------------------------------------------- names

Nodes = Callable[[int], Node | None]


def reaches(caller: Caller, n: Node, node: Nodes) -> bool:
    """May the caller reach `n` by its path: search (x) on every directory above it."""
    if caller.is_root or caller.origin == "internal":
        return True
    parent = n.parent
    while parent is not None:
        d = node(parent)
        if d is None or not allows(caller, d, EXEC):
            return False
        parent = d.parent if d.ino != ROOT_INO else None
    return True


def sees(caller: Caller, n: Node, node: Nodes) -> bool:
    """May the caller learn that `n` exists by listing: its directory readable, and reachable."""
    if caller.is_root or caller.origin == "internal":
        return True
    d = node(n.parent) if n.parent is not None else None
    return d is not None and allows(caller, d, READ) and reaches(caller, n, node)


# ---------------------------------------------------------------------- attachments

def require_attach(caller: Caller, image: Node, node: Nodes, name: str) -> None:
    """An attachment pins an image (no delete while attached) and takes its write lease: only a
    caller who may reach and read the image makes one, on the mount (a symlink) as through the
    API. The kernel checked only the link's directory, so this holds for every origin."""
    if not (reaches(caller, image, node) and allows(caller, image, READ)):
        raise err.PermissionDenied(f"{name}: only a user who may read the image may attach it",
                                   "ask its owner for read permission, or attach it as root")


def require_detach(caller: Caller, image: Node, a: Attachment) -> None:
    """An attachment ends by its attacher, the image's owner or root (others would unpin an image
    a VM of someone else uses)."""
    if caller.is_root or caller.origin == "internal" or caller.uid == image.uid:
        return
    if a.uid is not None and caller.uid == a.uid:
        return
    raise err.NotPermitted(f"{a.path} on {a.host}: only who attached it, the image's owner or "
                           "root may detach it")


def require_host(caller: Caller, host: str | None, this_host: str) -> str:
    """The host an attachment is recorded for: this one, unless root names another."""
    if host is None or host == this_host:
        return this_host
    require_root(caller, f"attach or detach on another host ({host})")
    return host
