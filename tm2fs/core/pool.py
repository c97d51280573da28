"""The pool as this host knows it: the namespace, images and backends in memory.

The kernel asks lookup, getattr and readdir all the time; they are answered from here, never from
the pool store. Memory is kept true in one way only: a `Delta` (rows as a transaction left them)
applied on the trio loop after the commit, in commit order — this host's own changes as their
transactions commit (`storeworker.py`), other hosts' as their notifications are re-read. Applying
a delta also tells the kernel what to forget, unless the kernel made the change itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..model import DEFAULT_CLUSTER, ROOT_INO, Backend, Caller, Image, Node
from ..store import Delta, PoolStore, Tx
from ..storeworker import StoreWorker

if TYPE_CHECKING:
    from .openfiles import OpenImage

log = logging.getLogger(__name__)

#: called with (ino, parent, name): the kernel should forget that inode and/or that entry
Listener = Callable[[int | None, int | None, str | None], None]
REMOTE = "remote"  # origin of a delta re-read after another host's notification
GONE_KEPT = 200_000  # deleted ids remembered; a notification is late by seconds, not that many
KERNEL_KNOWS = Caller(0, 0, origin="fs")  # origin of changes the kernel saw happen (sizes of writes)


class Pool:
    def __init__(self, store: PoolStore, host: str,
                 clusters: frozenset[str] = frozenset({DEFAULT_CLUSTER})) -> None:
        self.store = store
        self.host = host
        self.clusters = clusters  # where this host places new images (`placing.py`)
        self.db = StoreWorker(store, host, self._apply)
        self.nodes: dict[int, Node] = {}
        self.children: dict[int, dict[str, int]] = {}
        self.images: dict[int, Image] = {}
        self.image_ino: dict[int, int] = {}  # image id -> the entry that names it
        self.backend_rows: dict[int, Backend] = {}  # as stored; `Backends` adds this host's view
        self.open: dict[int, OpenImage] = {}  # by image id: every open file on an image shares it
        self.open_ino: dict[int, OpenImage] = {}  # the same, by inode (the kernel's getattr)
        self.listeners: list[Listener] = []
        self.backend_hooks: list[Callable[[], None]] = []  # after backends changed
        self.stale: set[int] = set()  # backends whose FREE/USED changed: monitor them soon
        #: entries other hosts changed since this host last opened them: the kernel may still
        #: cache their old size (its invalidation runs in the background), so open waits for one
        self.remote_touched: set[int] = set()
        #: entries and images deleted (PostgreSQL never reuses their ids): a late notification
        #: of an older version must not bring them back
        self.gone: dict[tuple[str, int], None] = {}
        #: image id -> bytes its backend holds, and images to measure again (core/allocation.py)
        self.allocated: dict[int, int | None] = {}
        self.unmeasured: set[int] = set()

    async def start(self) -> None:
        self.db.start()
        await self.db.refresh(Tx.everything, origin=None)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ reading memory

    def node(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def child(self, parent: int, name: str) -> Node | None:
        ino = self.children.get(parent, {}).get(name)
        return self.nodes.get(ino) if ino is not None else None

    def listing(self, parent: int, after_ino: int = 0, limit: int = 1000) -> list[Node]:
        """Entries in inode order after `after_ino`: a stable readdir cookie."""
        inos = sorted(i for i in self.children.get(parent, {}).values() if i > after_ino)
        return [self.nodes[i] for i in inos[:limit]]

    def has_children(self, ino: int) -> bool:
        return bool(self.children.get(ino))

    def path(self, ino: int) -> str:
        """`backend/dir/name` of an entry."""
        parts: list[str] = []
        n = self.nodes.get(ino)
        while n is not None and n.ino != ROOT_INO:
            parts.append(n.name)
            n = self.nodes.get(n.parent) if n.parent is not None else None
        return "/".join(reversed(parts))

    async def open_image(self, image_id: int) -> OpenImage | None:
        """The image's shared open state, if it is open; one being closed is waited for (its
        handle is going: the caller then works on the closed image)."""
        while (oi := self.open.get(image_id)) is not None and oi.closing is not None:
            await oi.closing.wait()
        return oi

    def image_size(self, image_id: int) -> int:
        oi = self.open.get(image_id)
        if oi is not None:
            return oi.size
        im = self.images.get(image_id)
        return im.size if im else 0

    # ------------------------------------------------------------------ changes

    async def write(self, work: Callable[[Tx], Any], caller: Caller | None = None,
                    timeout: float | None = None) -> Any:
        """One transaction; memory (and the kernel, unless it made the change) follow its commit."""
        return await self.db.write(work, caller, timeout)

    async def read(self, work: Callable[[Tx], Any], timeout: float | None = None) -> Any:
        return await self.db.read(work, timeout)

    async def remote_change(self, payload: str) -> None:
        """Another host changed rows: apply those its notification carries, or re-read those it
        only names (or everything)."""
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if not isinstance(data, dict) or data.get("h") == self.host:
            return
        if data.get("all"):
            await self.db.refresh(Tx.everything, REMOTE)
            return
        try:
            rows = Delta.from_rows(data)
            ids = [[int(i) for i in data.get(k, [])] for k in ("n", "i", "b")]
        except (TypeError, ValueError):
            log.error("a malformed change notification: re-reading everything")
            await self.db.refresh(Tx.everything, REMOTE)
            return
        if "rn" in data:  # the rows themselves (their ids are for older daemons)
            self._apply(rows, REMOTE)
        elif any(ids):
            await self.db.refresh(lambda tx: tx.read_delta(*ids), REMOTE)

    async def revalidate(self, n: Node) -> bool:
        """Re-read one entry and its image (as NFS revalidates at open): another host's change
        may not have been heard of yet. Whether anything had changed."""
        before = (self.nodes.get(n.ino), self.images.get(n.image_id or 0))
        ids = [[n.ino], [n.image_id] if n.image_id is not None else [], []]
        await self.db.refresh(lambda tx: tx.read_delta(*ids), REMOTE)
        return before != (self.nodes.get(n.ino), self.images.get(n.image_id or 0))

    def _apply(self, delta: Delta, origin: Any) -> None:
        kernel = not (isinstance(origin, Caller) and origin.origin == "fs")
        remote = origin == REMOTE
        if remote and len(self.remote_touched) > 100_000:
            self.remote_touched.clear()  # the kernel's 1 s attribute timeout still bounds it
        if delta.complete:
            self._drop_missing(delta, kernel)
        for ino, new in delta.nodes.items():
            if self._older(("n", ino), new, self.nodes.get(ino)):
                continue
            if self._apply_node(ino, new, kernel) and remote:
                self.remote_touched.add(ino)
        for image_id, im in delta.images.items():
            if self._older(("i", image_id), im, self.images.get(image_id)):
                continue
            if im is None:
                self.images.pop(image_id, None)
                self.allocated.pop(image_id, None)
                continue
            if remote and self.images.get(image_id) != im and image_id in self.image_ino:
                self.remote_touched.add(self.image_ino[image_id])
            self.images[image_id] = im
            oi = self.open.get(image_id)
            if remote and oi is not None and not oi.dirty:
                oi.size = im.size  # another host resized it
        if delta.backends:
            for bid, b in delta.backends.items():
                old_b = self.backend_rows.get(bid)
                if self._older(("b", bid), b, old_b):
                    continue
                if b is None:
                    self.backend_rows.pop(bid, None)
                    continue
                self.backend_rows[bid] = b
                if kernel and old_b is not None and (old_b.state, old_b.name) != (b.state, b.name):
                    for listener in self.listeners:  # its files now answer differently
                        listener(b.root_ino, ROOT_INO, old_b.name)
            for hook in self.backend_hooks:
                hook()

    def _older(self, key: tuple[str, int], new: Node | Image | Backend | None,
               old: Node | Image | Backend | None) -> bool:
        """Whether a row heard of is older than what memory holds: notifications, this host's
        own commits and re-reads arrive in different orders; row versions (PostgreSQL) and the
        ids of deleted rows tell. (SQLite has one host, in order, and may reuse ids.)"""
        if not self.store.shared:
            return False
        if new is None:
            self.gone[key] = None
            if len(self.gone) > GONE_KEPT:
                del self.gone[next(iter(self.gone))]
            return False
        return key in self.gone or (old is not None and old.ver > new.ver)

    def _drop_missing(self, delta: Delta, kernel: bool) -> None:
        for ino in [i for i in self.nodes if i not in delta.nodes]:
            self._apply_node(ino, None, kernel)
        for image_id in [i for i in self.images if i not in delta.images]:
            self.images.pop(image_id)
            self.allocated.pop(image_id, None)
        for bid in [i for i in self.backend_rows if i not in delta.backends]:
            delta.backends[bid] = None

    def _apply_node(self, ino: int, new: Node | None, kernel: bool) -> bool:
        """Bring one entry up to date; whether it changed."""
        old = self.nodes.get(ino)
        if old == new:  # (versions aside)
            if new is not None and old is not new:  # the newer version: a later, older one loses
                self.nodes[ino] = new
                oi = self.open_ino.get(ino)
                if oi is not None:
                    oi.node = new
            return False
        moved = old is not None and (new is None or (old.parent, old.name) != (new.parent, new.name))
        if old is not None and moved and old.parent is not None:
            siblings = self.children.get(old.parent)
            if siblings is not None and siblings.get(old.name) == ino:
                del siblings[old.name]
        if old is not None and old.image_id is not None:
            self.image_ino.pop(old.image_id, None)
        if new is None:
            self.nodes.pop(ino, None)
            self.children.pop(ino, None)
        else:
            self.nodes[ino] = new
            if new.image_id is not None:
                self.image_ino[new.image_id] = ino
            if new.parent is not None:
                self.children.setdefault(new.parent, {})[new.name] = ino
            if new.is_dir:
                self.children.setdefault(ino, {})
            oi = self.open_ino.get(ino)
            if oi is not None:
                oi.node = new
        if kernel:
            for listener in self.listeners:
                if moved and old is not None:
                    listener(ino, old.parent, old.name)
                if new is not None and (old is None or moved):
                    listener(None, new.parent, new.name)  # a negative entry the kernel may hold
                if not moved:
                    listener(ino, None, None)
        return True
