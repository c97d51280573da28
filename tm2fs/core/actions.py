"""The TM2 actions by address (`BACKEND:PATH`, or `auto:PATH` for placement): what `tm2` and the
API call. Each resolves its address in memory, checks the caller's rights, and uses the rooms'
protocols: images are made only by `Images.create`, removed only by the namespace's unlink.
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from .. import errors as err
from ..drivers.base import Progress
from ..model import ROOT, Attachment, Backend, Caller, Node
from ..names import AUTO, parse_address
from ..sizes import parse_size
from ..store import Tx
from . import permissions
from .backends import Backends, quietly
from .images import Images
from .leases import Leases
from .namespace import Namespace
from .native import forms as source_forms
from .openfiles import OpenFile, OpenFiles
from .permissions import EXEC, READ, WRITE, check
from .placing import Placing
from .pool import Pool
from .streams import copy_data

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Upload:
    """A push, write or copy on its way: the open hidden image (or, `staged` False, the image
    itself), and where it goes when complete."""

    file: OpenFile
    address: str
    parent: int
    name: str
    mode: int
    caller: Caller
    replaces: Node | None = None  # the image whose bytes this replaces (a write)
    folders: tuple[str, ...] = ()  # below `parent`, made with the name where missing
    staged: bool = True
    released: bool = False
    done: bool = False


class Actions:
    def __init__(self, pool: Pool, backends: Backends, namespace: Namespace, leases: Leases,
                 placing: Placing, images: Images, files: OpenFiles) -> None:
        self.pool = pool
        self.backends = backends
        self.ns = namespace
        self.leases = leases
        self.placing = placing
        self.images = images
        self.files = files

    # ------------------------------------------------------------------ addresses

    def resolve(self, address: str, caller: Caller, partial: bool = False,
                ) -> tuple[Backend, list[str], Node | None]:
        """BACKEND:PATH -> backend, path components and the node if it exists (`partial`: also
        None when a folder on the way is missing, for actions that make them)."""
        ref, parts = parse_address(address)
        b = self.backends.find(ref)
        n: Node | None = self.ns.get(b.root_ino)
        for i, part in enumerate(parts):
            assert n is not None
            if not n.is_dir:
                raise err.NotADirectory(f"{'/'.join(parts[:i])} is not a directory")
            check(caller, n, EXEC)
            child = self.pool.child(n.ino, part)
            if child is None:
                if i < len(parts) - 1 and not partial:
                    raise err.NotFound(f"{b.name}:{'/'.join(parts[:i + 1])} does not exist",
                                       "create the directory first (mkdir on the mount)")
                return b, parts, None
            n = child
        return b, parts, n

    def image_node(self, address: str, caller: Caller) -> tuple[Backend, Node]:
        b, _, n = self.resolve(address, caller)
        if n is None:
            raise err.NotFound(f"{address} does not exist",
                               f"`ls` the backend directory or `onestoragebackend show {b.name}`")
        if n.is_dir:
            raise err.IsADirectory(f"{address} is a directory, not an image")
        if n.image_id is None:
            raise err.InvalidArgument(f"{address} is a symlink, not an image")
        return b, n

    def parent_of(self, address: str, caller: Caller) -> tuple[Backend, int, tuple[str, ...], str]:
        """Where a new image goes: its backend, the deepest folder of its path that exists, the
        folders still to make below it and its name. A transfer manager makes the VM's folder
        before its disks, so the actions that make an image make missing folders, as `mkdir -p`
        (in the image's own transaction: a failure leaves no folder behind)."""
        ref, parts = parse_address(address)
        b = self.backends.find(ref)
        n = self.ns.get(b.root_ino)
        for i, part in enumerate(parts):
            if not n.is_dir:
                raise err.NotADirectory(f"{b.name}:{'/'.join(parts[:i])} is not a directory")
            check(caller, n, EXEC)
            child = self.pool.child(n.ino, part)
            if child is None:
                return b, n.ino, tuple(parts[i:-1]), parts[-1]
            n = child
        raise err.Exists(f"{address} exists", "delete it first or choose another name")

    def address_of(self, ino: int) -> str:
        """BACKEND:PATH of a namespace entry (e.g. where placement put it)."""
        backend_name, _, path = self.pool.path(ino).partition("/")
        return f"{backend_name}:{path}"

    async def _target(self, address: str, caller: Caller, size: int, place: dict[str, Any] | None,
                      role: str = "SAN") -> tuple[str, int | None, str | None]:
        """`auto:PATH` -> the placed backend's `NAME:PATH` (its missing folders are made with the
        image), the reservation and the key it holds; any other address as it is."""
        ref, parts = parse_address(address)
        if ref != AUTO:
            return address, None, None
        options = {k: v for k, v in (place or {}).items() if v not in (None, "")}
        options.setdefault("role", role)
        key = uuid.uuid4().hex
        _, b, reservation = await self.placing.place(caller, size, key=key, **options)
        assert b is not None
        return f"{b.name}:{'/'.join(parts)}", reservation, key

    # ------------------------------------------------------------------ the actions

    async def image_info(self, address: str, caller: Caller, new: bool = False) -> dict[str, Any]:
        """An image's attributes and attachments (`new`: just made, so none: no query)."""
        b, n = self.image_node(address, caller)
        assert n.image_id is not None
        image_id = n.image_id
        attached = [] if new else await self.pool.read(
            lambda tx: tx.attachments(image_id=image_id))
        im = self.pool.images.get(image_id)
        path = self.pool.path(n.ino)
        return {"ID": image_id, "PATH": path, "SIZE": self.pool.image_size(image_id),
                "KEY": im.key if im and caller.is_root else None, "CREATED": im.created if im else None,
                "BACKEND": b.name, "BACKEND_ID": b.id,
                "ADDRESS": f"{b.name}:{path.partition('/')[2]}", "INO": n.ino,
                "ATTACHMENTS": [attachment_view(a) for a in attached]}

    async def allocate(self, address: str, size: int | str, caller: Caller, mode: int = 0o600,
                       place: dict[str, Any] | None = None) -> dict[str, Any]:
        size = parse_size(size)
        address, reservation, key = await self._target(address, caller, size, place)
        try:
            _, parent, folders, name = self.parent_of(address, caller)
        except BaseException:
            with trio.CancelScope(shield=True):
                await quietly(self.placing.unreserve(reservation))
            raise
        await self.images.create(parent, name, mode, caller, size=size, reservation=reservation,
                                 key=key, folders=folders)
        log.info("allocated %s (%d bytes)", address, size)
        return await self.image_info(address, caller, new=True)

    def get_size(self, address: str, caller: Caller) -> int:
        _, n = self.image_node(address, caller)
        return self.ns.getattr(n.ino).size

    async def resize(self, address: str, size: int | str, caller: Caller,
                     shrink: bool = False) -> dict[str, Any]:
        """Grow by default; shrinking loses data, so it must be asked for."""
        size = parse_size(size)
        _, n = self.image_node(address, caller)
        current = self.ns.getattr(n.ino).size
        if size < current and not shrink:
            raise err.InvalidArgument(
                f"{address} is {current} bytes; {size} would shrink it and lose data",
                "pass --shrink if that is what you want")
        await self.images.setattr(n.ino, caller, size=size)
        return await self.image_info(address, caller)

    async def delete(self, address: str, caller: Caller) -> None:
        _, _, n = self.resolve(address, caller)
        if n is None:
            raise err.NotFound(f"{address} does not exist")
        if n.is_dir:
            raise err.IsADirectory(f"{address} is a directory", "remove it with rm -r on the mount")
        assert n.parent is not None
        await self.ns.unlink(n.parent, n.name, caller)
        log.info("deleted %s", address)

    async def clone(self, src: str, dst: str, caller: Caller, progress: Progress | None = None,
                    place: dict[str, Any] | None = None) -> dict[str, Any]:
        """Inside one backend the driver clones (reflink/COW where it can); across, a copy."""
        sb, sn = self.image_node(src, caller)
        self.backends.usable(sb, write=False)
        check(caller, sn, READ)
        assert sn.image_id is not None
        oi = await self.pool.open_image(sn.image_id)
        if oi is not None:  # make what is written so far visible to the driver
            with oi.borrowed():
                await self.files.fsync(OpenFile(oi, False))
        size = self.pool.image_size(sn.image_id)
        dst, reservation, key = await self._target(dst, caller, size, place)
        try:
            db, parent, folders, name = self.parent_of(dst, caller)
            self.ns.dir_for_change(parent, caller)
        except BaseException:
            with trio.CancelScope(shield=True):
                await quietly(self.placing.unreserve(reservation))
            raise
        if sb.id != db.id:
            await self._copy_across(sn, parent, folders, name, caller, progress, reservation, key)
            log.info("copied %s -> %s across backends", src, dst)
        else:
            await self.images.create(parent, name, sn.mode & 0o777, caller, size=size,
                                     reservation=reservation, key=key, source=sn,
                                     progress=progress, folders=folders)
            log.info("cloned %s -> %s", src, dst)
        return await self.image_info(dst, caller, new=True)

    async def _copy_across(self, sn: Node, parent: int, folders: tuple[str, ...], name: str,
                           caller: Caller,
                           progress: Progress | None, reservation: int | None,
                           key: str | None) -> None:
        """Stream between two backends' handles into a hidden image, named once complete and
        synced; zero chunks are skipped so thin stays thin."""
        try:
            src_of = await self.files.open(sn.ino, caller, writable=False)
        except BaseException:
            with trio.CancelScope(shield=True):
                await quietly(self.placing.unreserve(reservation))
            raise
        try:
            size = src_of.image.size
            attr = await self.images.create(parent, name, 0o600, caller, size=size,
                                            reservation=reservation, key=key, hidden=True)
            up = Upload(await self._open_hidden(attr.ino, caller), name, parent, name,
                        sn.mode & 0o777, caller, folders=folders)
            try:
                await copy_data(self.files, src_of, up.file, size, progress)
                await self._complete(up, size)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.abort_upload(up)
                raise
        finally:
            with trio.CancelScope(shield=True):
                await self.files.release(src_of)

    async def _open_hidden(self, ino: int, caller: Caller) -> OpenFile:
        try:
            return await self.files.open(ino, caller, writable=True)
        except BaseException:
            with trio.CancelScope(shield=True):
                await quietly(self.images.discard(ino))
            raise

    async def open_upload(self, address: str, caller: Caller, push: bool, size: int = 0,
                          place: dict[str, Any] | None = None) -> Upload:
        """A push (new image only) or write (replace, creating if missing): the bytes go to a
        hidden image that `finish_upload` names, or whose data the old image takes, at the end.
        An image open on this host is rewritten in place instead (its readers see the writes)."""
        reservation = key = None
        if parse_address(address)[0] == AUTO:
            address, reservation, key = await self._target(address, caller, size, place,
                                                           role="REPOSITORY")
        folders: tuple[str, ...] = ()
        try:
            _, _, n = self.resolve(address, caller, partial=True)
            if n is None:
                _, parent, folders, name = self.parent_of(address, caller)
            elif push:
                raise err.Exists(f"{address} exists", "delete it first or choose another name")
            elif n.image_id is None:
                raise (err.IsADirectory if n.is_dir else err.InvalidArgument)(
                    f"{address} is not an image")
            else:
                check(caller, n, READ | WRITE)
                assert n.parent is not None
                parent, name = n.parent, n.name
        except BaseException:
            with trio.CancelScope(shield=True):
                await quietly(self.placing.unreserve(reservation))
            raise
        if n is not None and n.image_id is not None and n.image_id not in self.pool.open:
            image_id, where = n.image_id, n.name  # another host writing it: refused now, not
            try:                                  # after the whole transfer
                await self.pool.read(partial(self._writable_in, image_id=image_id, name=where))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await quietly(self.placing.unreserve(reservation))
                raise
        if n is not None and n.image_id in self.pool.open:
            await self.placing.unreserve(reservation)
            of = await self.files.open(n.ino, caller, writable=True, truncate=True)
            return Upload(of, address, parent, name, n.mode, caller, replaces=n, staged=False)
        # a replacement is the old image's, not a new entry of the caller's in the directory
        maker = caller if n is None else ROOT
        attr = await self.images.create(parent, name, 0o600, maker, size=size,
                                        reservation=reservation, key=key, hidden=True)
        return Upload(await self._open_hidden(attr.ino, maker), address, parent, name, 0o600,
                      maker, replaces=n, folders=folders)

    def _writable_in(self, tx: Tx, image_id: int, name: str) -> None:
        """Nobody else writes it: no other host (lease), no VM attached natively."""
        self.leases.not_elsewhere_in(tx, image_id, name)
        self.leases.no_native_in(tx, image_id, name)

    async def finish_upload(self, up: Upload, size: int) -> str:
        """The bytes are all there: cut to `size`, synced, then visible; the final address."""
        try:
            await self._complete(up, size)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.abort_upload(up)
            raise
        return self.address_of(up.replaces.ino if up.replaces else up.file.image.ino)

    async def _complete(self, up: Upload, size: int) -> None:
        of = up.file
        if of.image.size != size:  # trailing zeros were skipped, or fewer than announced
            await self.images.setattr(of.image.ino, up.caller, size=size)
        await self.files.fsync(of)
        up.released = True
        await self.files.release(of)
        if not up.staged:
            return
        if up.replaces is None:
            await self.images.publish(of.image.ino, up.parent, up.name, up.mode, up.caller,
                                      up.folders)
        else:
            await self.images.replace_with(up.replaces, of.image.ino, up.caller)
        up.done = True

    async def abort_upload(self, up: Upload) -> None:
        """A transfer that failed: its hidden image goes; the old one, if any, is untouched."""
        if not up.released:
            up.released = True
            await self.files.release(up.file)
        if up.staged and not up.done:
            await quietly(self.images.discard(up.file.image.ino))

    async def open_address(self, address: str, caller: Caller, writable: bool,
                           create: bool = False, exclusive: bool = False,
                           truncate: bool = False, size: int = 0,
                           place: dict[str, Any] | None = None) -> OpenFile:
        """For read/write/get/push through the API: open (creating if asked, `size` bytes, on a
        placed backend for `auto:` addresses, base images going to REPOSITORY ones) by address."""
        reservation = key = None
        if create and parse_address(address)[0] == AUTO:
            address, reservation, key = await self._target(address, caller, size, place,
                                                           role="REPOSITORY")
        folders: tuple[str, ...] = ()
        try:
            _, _, n = self.resolve(address, caller, partial=create)
            if n is None and create:
                _, parent, folders, name = self.parent_of(address, caller)
        except BaseException:
            with trio.CancelScope(shield=True):
                await quietly(self.placing.unreserve(reservation))
            raise
        if n is None:
            if not create:
                raise err.NotFound(f"{address} does not exist")
            attr = await self.images.create(parent, name, 0o600, caller, size=size,
                                            reservation=reservation, key=key, folders=folders)
            return await self.files.open(attr.ino, caller, writable=True)
        await self.placing.unreserve(reservation)
        if exclusive:
            raise err.Exists(f"{address} exists", "delete it first or choose another name")
        if n.image_id is None:
            raise (err.IsADirectory if n.is_dir else err.InvalidArgument)(
                f"{address} is not an image")
        return await self.files.open(n.ino, caller, writable=writable, truncate=truncate)

    async def attach(self, address: str, path: str, caller: Caller, host: str | None = None,
                     native: bool = False, takeover: bool = False,
                     dev: str = "vda") -> dict[str, Any]:
        """Record that an image is in use at a path on a host (the link itself is the caller's).

        `native`: the hypervisor of this host uses the image's own path (`source`), so the
        caller needs write permission as well (the mount's checks are bypassed) and the backend
        must take writes; the answer carries the source in every form. `takeover`: a live
        migration's destination takes the write lease from the host whose attachment holds it
        (that attachment stays until its host detaches); the caller must be one who could end
        that attachment."""
        if not path.startswith("/") or "\0" in path:
            raise err.InvalidArgument(f"attach path {path!r} must be absolute")
        b, n = self.image_node(address, caller)
        on = permissions.require_host(caller, host, self.pool.host)
        permissions.require_attach(caller, n, self.pool.nodes.get, address)
        image_id = n.image_id
        assert image_id is not None
        forms: dict[str, Any] = {}
        if native:
            if on != self.pool.host:
                raise err.InvalidArgument(f"a native attachment is made on the host that runs the "
                                          f"VM, not for {on}", "run tm2 attach --native there")
            check(caller, n, READ | WRITE)
            self.backends.usable(b, write=True)
            forms = source_forms(self._source(b, n, address), image_id, dev)
        else:
            self.backends.usable(b, write=False)
        where = posixpath.normpath(path)

        def work(tx: Tx) -> tuple[int, str | None]:
            if tx.attachment_at(on, where):
                raise err.Exists(f"{path} on {on} is already an attachment", "detach it first")
            taken = None
            if takeover:
                current = tx.lease(image_id)
                if current is not None and current[0] != on:
                    for a in tx.attachments(image_id=image_id, host=current[0]):
                        permissions.require_detach(caller, n, a)
                taken = self.leases.take_over_in(tx, image_id, on, address)
            else:
                self.leases.take_in(tx, image_id, on, address)
            return tx.insert_attachment(image_id, on, where, uid=caller.uid, native=native), taken

        aid, taken = await self.pool.write(work)
        if taken:
            log.info("%s: write lease taken over from host %s by %s (live migration)", address,
                     taken, on)
        log.info("attached %s at %s:%s%s", address, on, path, " (native)" if native else "")
        return {"ID": aid, "IMAGE": address, "HOST": on, "PATH": path, "NATIVE": native,
                "TAKEN_FROM": taken, **forms}

    async def detach(self, address: str, path: str, caller: Caller,
                     host: str | None = None) -> None:
        _, n = self.image_node(address, caller)
        on = permissions.require_host(caller, host, self.pool.host)
        writing = n.image_id in self.leases.writers

        def work(tx: Tx) -> None:
            a = tx.attachment_at(on, posixpath.normpath(path))
            if a is None or a.image_id != n.image_id:
                raise err.NotFound(f"{address} is not attached at {path} on {on}")
            permissions.require_detach(caller, n, a)
            if a.link_ino is not None:
                raise err.Busy(f"{path} is a link on the mount", "remove the link: rm PATH")
            tx.delete_attachment(a.id)
            self.leases.drop_attachment_lease_in(tx, a.image_id, on, writing)

        await self.pool.write(work)
        log.info("detached %s from %s:%s", address, on, path)

    def _source(self, b: Backend, n: Node, address: str) -> dict[str, Any]:
        """The driver's native source of the image (see `drivers.base.HypervisorSource`)."""
        self.backends.usable(b, write=False)  # a backend REMOTE here answers what to do instead
        im = self.pool.images.get(n.image_id) if n.image_id is not None else None
        try:
            src = self.backends.runtime(b).driver.source(im.key) if im else None
        except OSError as e:
            raise err.BackendUnavailable(f"backend {b.name}: {e.strerror or e}") from None
        if src is None:
            raise err.Unsupported(f"{address} has no native path on this host ({b.tm} backend)",
                                  "reach it through the mount (tm2 attach without --native)")
        return src

    def source(self, address: str, caller: Caller, dev: str = "vda") -> dict[str, Any]:
        """How a hypervisor here reaches the image natively, in every form (`core/native.py`);
        for callers who may read the image."""
        b, n = self.image_node(address, caller)
        check(caller, n, READ)
        assert n.image_id is not None
        return {"ADDRESS": address, "IMAGE_ID": n.image_id,
                **source_forms(self._source(b, n, address), n.image_id, dev)}

    def source_of(self, ino: int, caller: Caller) -> dict[str, Any] | None:
        """The native source of the image at `ino` (the mount's extended attribute); None for
        what is not an image or has no native path here."""
        n = self.ns.get(ino)
        if n is None or n.image_id is None:
            return None
        address = self.address_of(ino)
        b, n = self.image_node(address, caller)
        check(caller, n, READ)
        try:
            return self._source(b, n, address)
        except (err.Unsupported, err.Remote):
            return None

    def local_path(self, address: str, caller: Caller) -> str | None:
        """Where the image's bytes can be reached on this host without the mount, if anywhere
        (it names the backend's KEY: for callers who may read the image)."""
        b, n = self.image_node(address, caller)
        check(caller, n, READ)
        im = self.pool.images.get(n.image_id) if n.image_id is not None else None
        return self.backends.runtime(b).driver.local_path(im.key) if im else None

    async def break_lease(self, address: str, caller: Caller, force: bool = False,
                          ) -> dict[str, Any]:
        _, n = self.image_node(address, caller)
        assert n.image_id is not None
        return await self.leases.break_lease(address, n.image_id, caller, force)


def attachment_view(a: Attachment) -> dict[str, Any]:
    return {"ID": a.id, "IMAGE_ID": a.image_id, "HOST": a.host, "PATH": a.path,
            "ON_MOUNT": a.link_ino is not None, "NATIVE": bool(a.native), "CREATED": a.created}
