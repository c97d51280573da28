"""The namespace: directories, names, modes, owners, symlinks and times of every entry.

Reads (lookup, getattr, readdir) come from memory (`Pool`). A change is checked against memory,
then made by one transaction whose delta updates memory after it commits; the store's uniqueness
constraint settles a race with another host (EEXIST). Removing an image's name removes the image:
its data goes once the rows are gone, or at its last close if it is open. A symlink on the mount
to an image is an attachment (it counts in NBVM) until it is removed.
"""

from __future__ import annotations

import logging
import posixpath
import stat
from collections.abc import Sequence
from typing import Any

from .. import errors as err
from ..drivers.base import Capacity
from ..model import ROOT_INO, Attachment, Attr, Backend, Caller, Node, now_ns
from ..names import check_name
from ..store import Tx
from . import links
from .backends import Backends
from .leases import Leases
from .permissions import EXEC, WRITE, check, new_gid, require_attach, sticky
from .pool import Pool

log = logging.getLogger(__name__)

FOLDER_MODE = 0o755  # folders made on the way to a new image, as `mkdir -p` with umask 022


class Namespace:
    def __init__(self, pool: Pool, backends: Backends, leases: Leases,
                 mountpoint: str | None) -> None:
        self.pool = pool
        self.backends = backends
        self.leases = leases
        self.mountpoint = mountpoint

    # ------------------------------------------------------------------ reading (memory)

    def attr(self, n: Node) -> Attr:
        size, mtime, nlink, allocated = 0, n.mtime_ns, 1, None
        if n.image_id is not None:
            if n.image_id not in self.pool.allocated:  # not measured here yet: soon
                self.pool.unmeasured.add(n.image_id)  # (core/allocation.py)
            allocated = self.pool.allocated.get(n.image_id)
            oi = self.pool.open.get(n.image_id)
            if oi is not None:
                size, mtime, nlink = oi.size, oi.mtime_ns, 0 if oi.unlinked else 1
            else:
                size = self.pool.image_size(n.image_id)
        elif n.target is not None:
            size = len(n.target.encode())
        elif n.is_dir:
            nlink = 2
        return Attr(n.ino, n.mode, nlink, n.uid, n.gid, size, n.atime_ns, mtime, n.ctime_ns,
                    n.backend_id, allocated)

    def get(self, ino: int) -> Node:
        n = self.pool.nodes.get(ino)
        if n is None:
            raise err.NotFound(f"inode {ino} does not exist")
        return n

    def getattr(self, ino: int) -> Attr:
        oi = self.pool.open_ino.get(ino)
        if oi is not None:  # hot: the kernel asks during I/O
            n = oi.node
            return Attr(n.ino, n.mode, 0 if oi.unlinked else 1, n.uid, n.gid, oi.size,
                        n.atime_ns, oi.mtime_ns, n.ctime_ns, n.backend_id,
                        self.pool.allocated.get(oi.image_id))
        return self.attr(self.get(ino))

    def parent_of(self, ino: int) -> int:
        n = self.get(ino)
        return n.parent if n.parent is not None else ROOT_INO

    def lookup(self, parent: int, name: str) -> Attr:
        n = self.pool.child(parent, name)
        if n is None:
            raise err.NotFound(f"{name} does not exist")
        return self.attr(n)

    def readdir(self, ino: int, after_ino: int = 0, limit: int = 1000) -> list[tuple[str, Attr]]:
        """Entries after the given inode, in inode order (a stable cookie for readdir)."""
        d = self.get(ino)
        if not d.is_dir:
            raise err.NotADirectory(f"{d.name} is not a directory")
        return [(c.name, self.attr(c)) for c in self.pool.listing(ino, after_ino, limit)]

    def readlink(self, ino: int) -> str:
        n = self.get(ino)
        if n.target is None:
            raise err.InvalidArgument(f"{n.name} is not a symlink")
        return n.target

    def statfs(self, ino: int) -> Capacity:
        """A backend directory shows its backend's capacity; the top level the pool's, each
        underlying storage counted once."""
        n = self.get(ino)
        if n.backend_id is not None:
            b = self.backends.get(n.backend_id)
            return Capacity(b.total, b.free, b.used)
        return self.backends.pooled()

    def mount_path(self, ino: int) -> str:
        rel = self.pool.path(ino)
        return f"{self.mountpoint}/{rel}" if self.mountpoint else rel

    # ------------------------------------------------------------------ rules

    def dir_for_change(self, parent: int, caller: Caller) -> tuple[Node, Backend]:
        """The directory an entry is added to or removed from, with its backend's write rules."""
        p = self.get(parent)
        if not p.is_dir:
            raise err.NotADirectory(f"{p.name} is not a directory")
        if p.ino == ROOT_INO:
            raise err.NotPermitted(
                "the top level holds only backends",
                "add one with `onestoragebackend create`; put images inside a backend directory")
        assert p.backend_id is not None
        b = self.backends.get(p.backend_id)
        self.backends.usable(b, write=True)
        check(caller, p, WRITE | EXEC)
        return p, b

    def entry(self, parent: int, name: str) -> Node:
        n = self.pool.child(parent, name)
        if n is None:
            raise err.NotFound(f"{name} does not exist")
        return n

    def free_name(self, parent: int, name: str) -> None:
        if self.pool.child(parent, name) is not None:
            raise err.Exists(f"{name} exists")

    # ------------------------------------------------------------------ changes

    async def mkdir(self, parent: int, name: str, mode: int, caller: Caller) -> Attr:
        check_name(name)
        p, _ = self.dir_for_change(parent, caller)
        self.free_name(parent, name)
        t = now_ns()
        setgid = p.mode & stat.S_ISGID

        def work(tx: Tx) -> int:
            ino = tx.insert_node(parent=parent, name=name, backend_id=p.backend_id,
                                 mode=stat.S_IFDIR | (mode & 0o7777) | setgid, uid=caller.uid,
                                 gid=new_gid(caller, p), atime_ns=t, mtime_ns=t, ctime_ns=t)
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)
            return ino

        return self.attr(self.get(await self.pool.write(work, caller)))

    def folders_in(self, tx: Tx, parent: Node, names: Sequence[str], caller: Caller,
                   t: int) -> int:
        """`mkdir -p` inside the transaction that puts something in the last folder: `names`
        below `parent` (where the caller may write), made where missing as `mkdir` makes them,
        owned by the caller; one another host made meanwhile is used if the caller may. The last
        folder's inode."""
        ino, setgid, gid = parent.ino, parent.mode & stat.S_ISGID, new_gid(caller, parent)
        for name in names:
            found = tx.child(ino, name)
            if found is not None:
                if not found.is_dir:
                    raise err.NotADirectory(f"{name} is not a directory")
                check(caller, found, WRITE | EXEC)
                ino = found.ino
                continue
            made = tx.insert_node(parent=ino, name=name, backend_id=parent.backend_id,
                                  mode=stat.S_IFDIR | FOLDER_MODE | setgid, uid=caller.uid,
                                  gid=gid, atime_ns=t, mtime_ns=t, ctime_ns=t)
            tx.update_node(ino, mtime_ns=t, ctime_ns=t)
            ino = made
        return ino

    async def rmdir(self, parent: int, name: str, caller: Caller) -> None:
        p, _ = self.dir_for_change(parent, caller)
        n = self.entry(parent, name)
        if not n.is_dir:
            raise err.NotADirectory(f"{name} is not a directory")
        sticky(caller, p, n)
        if self.pool.has_children(n.ino):
            raise err.NotEmpty(f"{name} is not empty")
        t = now_ns()

        def work(tx: Tx) -> None:
            if tx.has_children(n.ino):  # another host filled it meanwhile
                raise err.NotEmpty(f"{name} is not empty")
            tx.delete_node(n.ino)
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)

        await self.pool.write(work, caller)

    async def unlink(self, parent: int, name: str, caller: Caller) -> None:
        """Remove a file or symlink; an image's data goes now, or at last close if it is open."""
        p, b = self.dir_for_change(parent, caller)
        n = self.entry(parent, name)
        if n.is_dir:
            raise err.IsADirectory(f"{name} is a directory", "use rmdir")
        sticky(caller, p, n)
        t = now_ns()
        removal, gone = self._removal(n, name, caller)

        def work(tx: Tx) -> str | None:
            key = removal(tx)
            tx.delete_node(n.ino)
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)
            return key

        key = await self.pool.write(work, caller)
        await self._after_removal(n, b, key)
        self._log_detached(gone)

    def _removal(self, n: Node, name: str, caller: Caller) -> tuple[Any, list[Attachment]]:
        """What removing entry `n` does in its transaction (its image and its attachment, if it
        is a link); returns the key whose data must go after the commit, and fills the list of
        attachments it ended. Open images keep their rows until their last close."""
        image_id = n.image_id
        is_open = image_id is not None and image_id in self.pool.open
        writing = set(self.leases.writers)
        gone: list[Attachment] = []

        def remove(tx: Tx) -> str | None:
            gone.clear()  # a transaction run again starts afresh
            key = None
            if image_id is not None:
                self._check_detached(tx, image_id, name, caller)
                self.leases.not_elsewhere_in(tx, image_id, name)
                if not is_open:
                    im = tx.image(image_id)
                    key = im.key if im else None
                    tx.delete_image(image_id)
            link = tx.attachment_by_link(n.ino)
            if link:
                gone.append(link)
                tx.delete_attachment(link.id)
                self.leases.drop_attachment_lease_in(tx, link.image_id, link.host,
                                                     link.image_id in writing)
            return key

        return remove, gone

    def _log_detached(self, gone: list[Attachment], why: str = "its link was removed") -> None:
        """A link removed (or left dangling) on the mount is a detach: logged as `tm2 detach`
        logs one."""
        for a in gone:
            ino = self.pool.image_ino.get(a.image_id)
            image = self.pool.path(ino).replace("/", ":", 1) if ino else f"image {a.image_id}"
            log.info("detached %s from %s:%s (%s)", image, a.host, a.path, why)

    async def _after_removal(self, n: Node, b: Backend, key: str | None) -> None:
        """After the commit: the data goes, or the open image is marked to drop it at close."""
        if n.image_id is not None:
            oi = self.pool.open.get(n.image_id)
            if oi is not None and key is None:
                oi.unlinked = True
        if key is not None:
            await self.backends.delete_data(b, key)

    def _check_detached(self, tx: Tx, image_id: int, name: str, caller: Caller) -> None:
        """An attached image is not deleted. On the mount POSIX wins for links on the mount
        itself (`rm -rf` of a VM folder holding disk and link must work: the links dangle and
        their attachments end); an attachment recorded for a path elsewhere still refuses."""
        attached = tx.attachments(image_id=image_id)
        if caller.origin == "fs":
            attached = [a for a in attached if a.link_ino is None]
        if attached:
            raise err.Busy(f"{name} is attached at {attached[0].path} on {attached[0].host}",
                           "detach it first (`tm2 detach` or remove its link)")

    async def rename(self, parent: int, name: str, new_parent: int, new_name: str,
                     caller: Caller, noreplace: bool = False, exchange: bool = False) -> None:
        """A metadata update inside one backend; across backends EXDEV, so `mv` copies."""
        check_name(new_name)
        if exchange:
            raise err.Unsupported("RENAME_EXCHANGE is not supported")
        p, b = self.dir_for_change(parent, caller)
        np, nb = self.dir_for_change(new_parent, caller)
        n = self.entry(parent, name)
        if b.id != nb.id:
            raise err.CrossBackend(f"{name}: rename across backends",
                                   "copy then delete (mv does this by itself)")
        sticky(caller, p, n)
        if n.is_dir:  # not into itself
            a: Node | None = np
            while a is not None:
                if a.ino == n.ino:
                    raise err.InvalidArgument(f"cannot move {name} into itself")
                a = self.pool.nodes.get(a.parent) if a.parent is not None else None
        old = self.pool.child(new_parent, new_name)
        if old is not None and old.ino == n.ino:
            return  # rename onto itself
        removal, gone = None, list[Attachment]()
        if old is not None:
            if noreplace:
                raise err.Exists(f"{new_name} exists")
            sticky(caller, np, old)
            if old.is_dir != n.is_dir:
                raise (err.IsADirectory if old.is_dir else err.NotADirectory)(
                    f"{new_name}: cannot replace a {'directory' if old.is_dir else 'file'}")
            if old.is_dir and self.pool.has_children(old.ino):
                raise err.NotEmpty(f"{new_name} is not empty")
            removal, gone = self._removal(old, new_name, caller)
        t = now_ns()
        writing = set(self.leases.writers)
        ended: list[Attachment] = []

        def work(tx: Tx) -> str | None:
            key = None
            ended.clear()
            if old is not None and removal is not None:
                if old.is_dir and tx.has_children(old.ino):
                    raise err.NotEmpty(f"{new_name} is not empty")
                key = removal(tx)
                tx.delete_node(old.ino)
            # attachments below follow (recorded paths) or refuse (links left dangling)
            move = links.Move(links.path_in(tx, n.ino),
                              f"{links.path_in(tx, new_parent)}/{new_name}", self.mountpoint)
            for a in links.follow_rename(tx, tx.node(n.ino) or n, move):
                tx.delete_attachment(a.id)  # its link no longer reaches the image
                self.leases.drop_attachment_lease_in(tx, a.image_id, a.host,
                                                     a.image_id in writing)
                ended.append(a)
            tx.update_node(n.ino, parent=new_parent, name=new_name, ctime_ns=t)
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)
            if new_parent != parent:
                tx.update_node(new_parent, mtime_ns=t, ctime_ns=t)
            return key

        key = await self.pool.write(work, caller)
        self._log_detached(ended, "the rename left its link dangling")
        if old is not None:
            await self._after_removal(old, nb, key)
            self._log_detached(gone)

    async def symlink(self, parent: int, name: str, target: str, caller: Caller) -> Attr:
        """A symlink to an image on the mount is an attachment: it counts in NBVM until removed."""
        check_name(name)
        if not target or "\0" in target or len(target.encode()) > 4095:
            raise err.InvalidArgument("symlink target is empty, too long or has a NUL byte")
        p, _ = self.dir_for_change(parent, caller)
        self.free_name(parent, name)
        img = self._resolve_target(parent, target)
        if img is not None:
            require_attach(caller, img, self.pool.nodes.get, name)
        path = f"{self.mount_path(parent)}/{name}" if self.mountpoint else name
        t = now_ns()

        def work(tx: Tx) -> int:
            ino = tx.insert_node(parent=parent, name=name, backend_id=p.backend_id,
                                 mode=stat.S_IFLNK | 0o777, uid=caller.uid, gid=caller.gid,
                                 atime_ns=t, mtime_ns=t, ctime_ns=t, target=target)
            tx.update_node(parent, mtime_ns=t, ctime_ns=t)
            if img is not None and img.image_id is not None:
                stale = tx.attachment_at(self.pool.host, path)
                if stale:
                    tx.delete_attachment(stale.id)
                self.leases.take_in(tx, img.image_id, self.pool.host, img.name)
                tx.insert_attachment(img.image_id, self.pool.host, path, link_ino=ino,
                                     uid=caller.uid)
            return ino

        ino = await self.pool.write(work, caller)
        if img is not None:
            log.info("attached image %s at %s", img.image_id, path)
        return self.attr(self.get(ino))

    def _resolve_target(self, parent: int, target: str) -> Node | None:
        """The image a symlink points at, if it points into this tree (no symlinks followed)."""
        if target.startswith("/"):
            if not self.mountpoint or not target.startswith(self.mountpoint + "/"):
                return None
            parts = posixpath.normpath(target[len(self.mountpoint) + 1:]).split("/")
        else:
            joined = posixpath.normpath(posixpath.join("/", self.pool.path(parent), target))
            parts = joined.strip("/").split("/")
        n: Node | None = None
        ino = ROOT_INO
        for part in parts:
            if part in ("", "."):
                continue
            n = self.pool.child(ino, part)
            if n is None:
                return None
            ino = n.ino
        return n if n is not None and n.image_id is not None else None

    async def set_meta(self, n: Node, caller: Caller, values: dict[str, Any]) -> Attr:
        """chmod, chown and utimens, with POSIX's rules on who may do what."""
        owner = caller.is_root or caller.uid == n.uid or caller.origin == "internal"
        if ("mode" in values or "uid" in values) and not owner and caller.origin == "api":
            raise err.NotPermitted(f"{n.name}: only the owner or root may chmod or chown")
        if values.get("uid", n.uid) != n.uid and not caller.is_root and caller.origin == "api":
            raise err.NotPermitted(f"{n.name}: only root may change the owner")
        if "mode" in values:
            values["mode"] = (n.mode & ~0o7777) | (values["mode"] & 0o7777)
        values["ctime_ns"] = now_ns()
        await self.pool.write(lambda tx: tx.update_node(n.ino, **values), caller)
        oi = self.pool.open.get(n.image_id) if n.image_id is not None else None
        if oi is not None and "mtime_ns" in values:
            oi.mtime_ns = values["mtime_ns"]
        return self.getattr(n.ino)
