"""What a rename does to attachments, in the rename's own transaction.

A VM's disk is a link to an image, and libvirt and OpenNebula open the disk by that link's path
for as long as the VM lives (a restart, a migration, a snapshot open it again). As `rm` does
(namespace.py), the rules part where the link is:

- an attachment's recorded path follows its link when the link, or any folder above it, is
  renamed (`tm2 info` keeps naming the link where it is);
- an image attached by `tm2 attach` (its link, outside the mount, names the image by its absolute
  path) is not moved: EBUSY, detach first, as `rm` refuses it;
- on the mount POSIX wins (old transfer-manager scripts `mv` a linked image, then link it
  again): a rename that leaves a link there no longer reaching its image ends that attachment
  (NBVM stops counting a dangling link), as removing the link would. A folder holding a disk and
  a relative link to it, or an absolute link to an image that stays, moves with its attachment.
- A backend renamed (an admin's act, not a `mv`) refuses any attachment it would end.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from .. import errors as err
from ..model import ROOT_INO, Attachment, Node
from ..store import Tx


@dataclass(frozen=True)
class Move:
    """`old` (`backend/path` of the moved entry) becomes `new`; what is below moves with it."""

    old: str
    new: str
    mountpoint: str | None

    def moved(self, path: str) -> str:
        if path == self.old or path.startswith(self.old + "/"):
            return self.new + path[len(self.old):]
        return path

    def reaches(self, target: str, link: str) -> str | None:
        """The `backend/path` a link at `link` with `target` names, or None if outside the tree
        (as the namespace resolves it: no symlinks followed on the way)."""
        if target.startswith("/"):
            if not self.mountpoint or not target.startswith(self.mountpoint.rstrip("/") + "/"):
                return None
            target = target[len(self.mountpoint.rstrip("/")):]
        else:
            target = posixpath.join("/", posixpath.dirname(link), target)
        return posixpath.normpath("/" + target).strip("/")


def path_in(tx: Tx, ino: int) -> str:
    """`backend/dir/name` of an entry as the transaction sees it."""
    parts: list[str] = []
    n = tx.node(ino)
    while n is not None and n.ino != ROOT_INO:
        parts.append(n.name)
        n = tx.node(n.parent) if n.parent is not None else None
    return "/".join(reversed(parts))


def follow(tx: Tx, move: Move, attached: list[Attachment], images: dict[int, int],
           posix: bool = True) -> list[Attachment]:
    """Check and update the attachments a move touches (before the move is written): those of
    the moved images (`images`: image id -> inode) and of the moved links. The attachments of
    links on the mount the move leaves dangling (`posix`), for the caller to end; else EBUSY."""
    ending: list[Attachment] = []
    for a in attached:
        ino = images.get(a.image_id)
        if ino is None:
            found = tx.node_by_image(a.image_id)
            if found is None:
                continue
            ino = found.ino
        image = path_in(tx, ino)
        link = tx.node(a.link_ino) if a.link_ino is not None else None
        if link is None or link.target is None:
            if move.moved(image) != image:
                raise err.Busy(f"{image} is attached at {a.path} on {a.host}: its link names it "
                               "by its path, which the rename would leave dangling",
                               "detach it first (`tm2 detach`), rename, then attach again")
            continue
        where = path_in(tx, link.ino)
        if move.reaches(link.target, move.moved(where)) != move.moved(image):
            if not posix:
                raise err.Busy(f"the link {a.path} to {image} would dangle after the rename",
                               "remove the link first (that detaches it)")
            ending.append(a)
        elif move.moved(where) != where and a.path.endswith("/" + where):
            tx.set_attachment_path(a.id, a.path[:-len(where)] + move.moved(where))
    return ending


def follow_rename(tx: Tx, top: Node, move: Move) -> list[Attachment]:
    """A rename of `top` on the mount: its subtree's images and links, then `follow`."""
    images: dict[int, int] = {}
    attached: dict[int, Attachment] = {}
    todo = [top]
    while todo:
        n = todo.pop()
        if n.image_id is not None:
            images[n.image_id] = n.ino
            attached.update((a.id, a) for a in tx.attachments(image_id=n.image_id))
        elif n.target is not None and (a := tx.attachment_by_link(n.ino)) is not None:
            attached[a.id] = a
        if n.is_dir:
            todo.extend(tx.children(n.ino))
    return follow(tx, move, list(attached.values()), images)


def follow_backend_rename(tx: Tx, backend_id: int, move: Move) -> None:
    """A backend renamed: every path in it moves (its attachments read at once)."""
    follow(tx, move, tx.attachments(backend_id=backend_id), {}, posix=False)
