"""The pool store: backends, the namespace, images and attachments, in SQL (SQLite or PostgreSQL).

Everything the daemon knows about the pool lives here, so a restart (or another host) sees the same
tree. Backends keep only image bytes under an opaque key. The store knows SQL and nothing of the
rules: those are the core's. It is synchronous and slow (a round trip to PostgreSQL, a commit to
SQLite): the daemon calls it only from its store worker thread (`storeworker.py`), never from the
trio loop. Each write transaction records which rows it touched (`Tx.delta`), so the in-memory view
of every host can be brought up to date from exactly those rows.
"""

from __future__ import annotations

import json
import logging
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from .model import ROOT_INO, Attachment, Backend, Image, Node, now_ns

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
CHANNEL = "tm2fs"  # PostgreSQL NOTIFY channel for changes between daemons

meta = sa.MetaData()

schema_info = sa.Table(
    "schema_info", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

backend = sa.Table(
    "storagebackend_pool", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("state", sa.String(16), nullable=False, default="INIT"),
    sa.Column("tm", sa.String(64), nullable=False),
    sa.Column("tm_raw", sa.Text, nullable=False, default="{}"),  # JSON object, driver arguments
    sa.Column("capacity", sa.BigInteger),  # admin's cap in bytes; NULL = what the driver reports
    sa.Column("total", sa.BigInteger),  # last monitored, bytes; NULL = unknown
    sa.Column("free", sa.BigInteger),
    sa.Column("used", sa.BigInteger),
    sa.Column("cost", sa.Integer, nullable=False, default=0),
    sa.Column("role", sa.String(16), nullable=False, default="SAN"),
    sa.Column("tags", sa.Text, nullable=False, default="[]"),  # JSON list
    sa.Column("attrs", sa.Text, nullable=False, default="{}"),  # JSON object, custom attributes
    sa.Column("cluster", sa.String(255), nullable=False, default="default"),
    sa.Column("timeout", sa.Float, nullable=False, default=30.0),  # seconds, every driver call
    # placement: virtual space may reach (total - reserved share) x overcommit
    sa.Column("overcommit", sa.Float, nullable=False, default=1.0, server_default="1"),
    sa.Column("reserved", sa.Float, nullable=False, default=0.0, server_default="0"),
    sa.Column("priority", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("error", sa.Text),  # why the backend is in ERROR
    sa.Column("root_ino", sa.BigInteger),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("monitored", sa.Float),
)

node = sa.Table(
    "namespace", meta,
    sa.Column("ino", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("parent", sa.BigInteger, nullable=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("backend_id", sa.Integer, nullable=True),  # NULL only for the root
    sa.Column("mode", sa.Integer, nullable=False),  # full st_mode, type bits included
    sa.Column("uid", sa.Integer, nullable=False),
    sa.Column("gid", sa.Integer, nullable=False),
    sa.Column("atime_ns", sa.BigInteger, nullable=False),
    sa.Column("mtime_ns", sa.BigInteger, nullable=False),
    sa.Column("ctime_ns", sa.BigInteger, nullable=False),
    sa.Column("target", sa.Text),  # symlinks
    sa.Column("image_id", sa.Integer, nullable=True, unique=True),  # regular files
    sa.UniqueConstraint("parent", "name", name="namespace_parent_name"),
)

image = sa.Table(
    "image", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("backend_id", sa.Integer, nullable=False, index=True),
    sa.Column("key", sa.String(255), nullable=False),  # opaque name on the backend
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.UniqueConstraint("backend_id", "key", name="image_backend_key"),
)

attachment = sa.Table(
    "attachment", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("image_id", sa.Integer, nullable=False, index=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("link_ino", sa.BigInteger),  # the symlink on the mount that made it, if any
    sa.Column("created", sa.Float, nullable=False),
    sa.UniqueConstraint("host", "path", name="attachment_host_path"),
)

reservation = sa.Table(
    "reservation", meta,  # space promised to a create in progress (placement), until its rows exist
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("backend_id", sa.Integer, nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("key", sa.String(255)),  # the key being made, so no sweep takes it for a leftover
    sa.Column("created", sa.Float, nullable=False),
)


host = sa.Table(
    "host", meta,  # every daemon (hypervisor) sharing the pool store
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # ONLINE, OFFLINE (a clean stop)
    sa.Column("heartbeat", sa.Float, nullable=False),  # time.time() of the last sign of life
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("mountpoint", sa.Text),
    sa.Column("version", sa.String(64)),
)

host_backend = sa.Table(
    "host_backend", meta,  # each host's own view of each backend, from its monitor
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("backend_id", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("checked", sa.Float, nullable=False),
)

lease = sa.Table(
    "lease", meta,  # the one host that may write an image (an open for writing, an attachment)
    sa.Column("image_id", sa.Integer, primary_key=True),
    sa.Column("host", sa.String(255), nullable=False, index=True),
    sa.Column("since", sa.Float, nullable=False),
)


def _v1_to_v2(c: sa.Connection) -> None:
    """Placement and many hosts: overcommit ratio, reserved share and priority per backend (the
    reservation, host, host_backend and lease tables are new, so create_all has made them)."""
    for column, kind, default in (("overcommit", "FLOAT", "1"), ("reserved", "FLOAT", "0"),
                                  ("priority", "INTEGER", "0")):
        c.exec_driver_sql(f"ALTER TABLE storagebackend_pool ADD COLUMN {column} {kind} "
                          f"NOT NULL DEFAULT {default}")


# Migrations from version N to N+1; a new schema version appends one function here.
MIGRATIONS: list = [_v1_to_v2]


_decoded: dict[tuple, Backend] = {}  # row -> Backend: a pool of 10,000 backends re-reads in ms


def _backend(row: Any) -> Backend:
    """Rows decode once: an unchanged row gives the very same (immutable) Backend, so JSON is
    parsed only for rows that changed, and callers can tell 'unchanged' by identity."""
    raw = tuple(row)
    b = _decoded.get(raw)
    if b is None:
        if len(_decoded) > 100_000:
            _decoded.clear()
        b = _decoded[raw] = _decode_backend(row)
    return b


def _decode_backend(row: Any) -> Backend:
    m = row._mapping
    return Backend(
        **{k: m[k] for k in ("id", "name", "state", "tm", "capacity", "total", "free", "used",
                             "cost", "overcommit", "reserved", "priority", "role", "cluster",
                             "timeout", "error", "root_ino", "created", "updated", "monitored")},
        tm_raw=json.loads(m["tm_raw"]), tags=json.loads(m["tags"]), attrs=json.loads(m["attrs"]),
    )


def _node(row: Any) -> Node:
    return Node(**row._mapping)


@dataclass
class Delta:
    """What one transaction changed, as the rows now are (None: deleted). Applied to each host's
    in-memory view after the commit; `ids` is what other hosts are told (NOTIFY) to re-read."""

    nodes: dict[int, Node | None] = field(default_factory=dict)
    images: dict[int, Image | None] = field(default_factory=dict)
    backends: dict[int, Backend | None] = field(default_factory=dict)
    complete: bool = False  # a full re-read: whatever is not in here is gone

    def __bool__(self) -> bool:
        return bool(self.nodes or self.images or self.backends)

    def ids(self) -> dict[str, list[int]]:
        return {"n": sorted(self.nodes), "i": sorted(self.images), "b": sorted(self.backends)}


class Tx:
    """One transaction's worth of queries; the core composes them into its rules. Writes note the
    rows they touch so `delta()` can read them back before the commit."""

    def __init__(self, conn: sa.Connection) -> None:
        self.c = conn
        self.touched_nodes: set[int] = set()
        self.touched_images: set[int] = set()
        self.touched_backends: set[int] = set()

    def delta(self) -> Delta:
        """The touched rows as this transaction leaves them: a few indexed reads."""
        d = Delta()
        if self.touched_nodes:
            found = self.nodes(sorted(self.touched_nodes))
            d.nodes = {i: found.get(i) for i in self.touched_nodes}
        if self.touched_images:
            got = self.images_by_id(sorted(self.touched_images))
            d.images = {i: got.get(i) for i in self.touched_images}
        if self.touched_backends:
            rows = self.c.execute(sa.select(backend).where(backend.c.id.in_(
                sorted(self.touched_backends))))
            got_b = {b.id: b for b in map(_backend, rows)}
            d.backends = {i: got_b.get(i) for i in self.touched_backends}
        return d

    def read_delta(self, nodes: list[int], images: list[int], backends: list[int]) -> Delta:
        """The rows another host said it changed, as they are now."""
        self.touched_nodes.update(nodes)
        self.touched_images.update(images)
        self.touched_backends.update(backends)
        return self.delta()

    def _insert(self, insert: sa.Insert) -> int:
        """Run a one-row insert; the new row's id."""
        key = self.c.execute(insert).inserted_primary_key
        assert key is not None  # only inserts of many rows have none
        return key[0]

    def everything(self) -> Delta:
        """The whole namespace, every image and backend: a host's view at start, or after
        notifications may have been lost."""
        return Delta(nodes={r.ino: _node(r) for r in self.c.execute(sa.select(node))},
                     images={r.id: Image(**r._mapping) for r in self.c.execute(sa.select(image))},
                     backends={b.id: b for b in self.backends()}, complete=True)

    def images_by_id(self, ids: list[int]) -> dict[int, Image]:
        return {r.id: Image(**r._mapping)
                for r in self.c.execute(sa.select(image).where(image.c.id.in_(ids)))}

    # backends
    def backends(self) -> list[Backend]:
        return [_backend(r) for r in self.c.execute(sa.select(backend).order_by(backend.c.id))]

    def backend(self, backend_id: int) -> Backend | None:
        row = self.c.execute(sa.select(backend).where(backend.c.id == backend_id)).first()
        return _backend(row) if row else None

    def backend_by_name(self, name: str) -> Backend | None:
        row = self.c.execute(sa.select(backend).where(backend.c.name == name)).first()
        return _backend(row) if row else None

    def insert_backend(self, **values: Any) -> int:
        values = _encode_backend(values)
        t = time.time()
        bid = self._insert(backend.insert().values(created=t, updated=t, **values))
        self.touched_backends.add(bid)
        return bid

    def update_backend(self, backend_id: int, **values: Any) -> None:
        values = _encode_backend(values)
        values.setdefault("updated", time.time())
        self.c.execute(backend.update().where(backend.c.id == backend_id).values(**values))
        self.touched_backends.add(backend_id)

    def lock_backend(self, backend_id: int) -> Backend | None:
        """The backend row, locked until commit: reservations on one backend take turns.
        (SQLite's BEGIN IMMEDIATE already serialises every writer.)"""
        q = sa.select(backend).where(backend.c.id == backend_id)
        if self.c.dialect.name == "postgresql":
            q = q.with_for_update()
        row = self.c.execute(q).first()
        return _backend(row) if row else None

    def allocated(self, backend_id: int) -> int:
        """Virtual space of a backend: its images' sizes plus pending reservations. One statement,
        so a reservation turning into an image in another transaction is never counted 0 or 2
        times (each statement sees one snapshot, even under READ COMMITTED)."""
        images = (sa.select(sa.func.coalesce(sa.func.sum(image.c.size), 0))
                  .where(image.c.backend_id == backend_id).scalar_subquery())
        pending = (sa.select(sa.func.coalesce(sa.func.sum(reservation.c.size), 0))
                   .where(reservation.c.backend_id == backend_id).scalar_subquery())
        return int(self.c.execute(sa.select(images + pending)).scalar_one())

    def insert_reservation(self, backend_id: int, size: int, host: str,
                           key: str | None = None) -> int:
        return self._insert(reservation.insert().values(
            backend_id=backend_id, size=size, host=host, key=key, created=time.time()))

    def set_reservation_key(self, reservation_id: int, key: str) -> None:
        self.c.execute(reservation.update().where(reservation.c.id == reservation_id)
                       .values(key=key))

    def reserved_keys(self, backend_id: int) -> set[str]:
        """Keys of creates in progress (on any host): not leftovers, whatever a sweep thinks."""
        return {k for (k,) in self.c.execute(sa.select(reservation.c.key).where(
            reservation.c.backend_id == backend_id, reservation.c.key.is_not(None)))}

    def delete_reservation(self, reservation_id: int) -> None:
        self.c.execute(reservation.delete().where(reservation.c.id == reservation_id))

    def reservations(self, host: str | None = None) -> list[tuple[int, int, int, str]]:
        """(id, backend id, size, host) of pending reservations."""
        q = sa.select(reservation.c.id, reservation.c.backend_id, reservation.c.size,
                      reservation.c.host).order_by(reservation.c.id)
        if host is not None:
            q = q.where(reservation.c.host == host)
        return [tuple(r) for r in self.c.execute(q)]

    def notify(self, payload: str) -> None:
        """Tell the other daemons at this transaction's commit (PostgreSQL NOTIFY); SQLite: no-op."""
        if self.c.dialect.name == "postgresql":
            self.c.execute(sa.select(sa.func.pg_notify(CHANNEL, payload)))

    # hosts
    def upsert_host(self, name: str, **values: Any) -> None:
        if not self.c.execute(host.update().where(host.c.name == name).values(**values)).rowcount:
            self.c.execute(host.insert().values(name=name, **values))

    def hosts(self) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in self.c.execute(sa.select(host).order_by(host.c.name))]

    def host_heartbeat(self, name: str) -> float | None:
        return self.c.execute(sa.select(host.c.heartbeat).where(host.c.name == name)).scalar()

    def set_host_backend(self, name: str, backend_id: int, state: str, error: str | None) -> None:
        values = dict(state=state, error=error, checked=time.time())
        if not self.c.execute(host_backend.update().where(
                host_backend.c.host == name, host_backend.c.backend_id == backend_id)
                .values(**values)).rowcount:
            self.c.execute(host_backend.insert().values(host=name, backend_id=backend_id, **values))

    def host_backends(self) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in self.c.execute(
            sa.select(host_backend).order_by(host_backend.c.backend_id, host_backend.c.host))]

    # leases
    def lease(self, image_id: int) -> tuple[str, float] | None:
        """(host, since) of the image's write lease, locked until commit (PostgreSQL)."""
        q = sa.select(lease.c.host, lease.c.since).where(lease.c.image_id == image_id)
        if self.c.dialect.name == "postgresql":
            q = q.with_for_update()
        row = self.c.execute(q).first()
        return (row[0], row[1]) if row else None

    def insert_lease(self, image_id: int, holder: str) -> None:
        self.c.execute(lease.insert().values(image_id=image_id, host=holder, since=time.time()))

    def delete_lease(self, image_id: int, holder: str | None = None) -> None:
        q = lease.delete().where(lease.c.image_id == image_id)
        if holder is not None:
            q = q.where(lease.c.host == holder)
        self.c.execute(q)

    def leases(self, holder: str | None = None) -> list[tuple[int, str, float]]:
        q = sa.select(lease.c.image_id, lease.c.host, lease.c.since).order_by(lease.c.image_id)
        if holder is not None:
            q = q.where(lease.c.host == holder)
        return [tuple(r) for r in self.c.execute(q)]

    def delete_backend(self, backend_id: int) -> None:
        self.touched_backends.add(backend_id)
        self.touched_nodes.update(self.c.execute(
            sa.select(node.c.ino).where(node.c.backend_id == backend_id)).scalars())
        self.touched_images.update(self.c.execute(
            sa.select(image.c.id).where(image.c.backend_id == backend_id)).scalars())
        self.c.execute(reservation.delete().where(reservation.c.backend_id == backend_id))
        self.c.execute(host_backend.delete().where(host_backend.c.backend_id == backend_id))
        self.c.execute(lease.delete().where(lease.c.image_id.in_(
            sa.select(image.c.id).where(image.c.backend_id == backend_id))))
        self.c.execute(attachment.delete().where(attachment.c.image_id.in_(
            sa.select(image.c.id).where(image.c.backend_id == backend_id))))
        self.c.execute(image.delete().where(image.c.backend_id == backend_id))
        self.c.execute(node.delete().where(node.c.backend_id == backend_id))
        self.c.execute(backend.delete().where(backend.c.id == backend_id))

    def counters(self) -> dict[int, tuple[int, int, int]]:
        """backend id -> (NBIMAGE, NBVM, ALLOCATED: image sizes plus pending reservations),
        counted, so they are always true (for a view; `allocated()` is the one to decide on)."""
        images = dict(
            (r[0], (r[1], r[2] or 0))
            for r in self.c.execute(
                sa.select(image.c.backend_id, sa.func.count(), sa.func.sum(image.c.size))
                .group_by(image.c.backend_id))
        )
        vms: dict[int, int] = dict(self.c.execute(
            sa.select(image.c.backend_id, sa.func.count())
            .select_from(attachment.join(image, attachment.c.image_id == image.c.id))
            .group_by(image.c.backend_id)).all())
        pending = dict(self.c.execute(
            sa.select(reservation.c.backend_id, sa.func.sum(reservation.c.size))
            .group_by(reservation.c.backend_id)).all())
        ids = set(images) | set(vms) | set(pending)
        return {i: (images.get(i, (0, 0))[0], vms.get(i, 0),
                    int(images.get(i, (0, 0))[1]) + int(pending.get(i) or 0)) for i in ids}

    def nodes(self, inos: list[int]) -> dict[int, Node]:
        """Many entries in one query (e.g. every backend's root)."""
        return {r.ino: _node(r) for r in self.c.execute(sa.select(node).where(node.c.ino.in_(inos)))}

    # namespace
    def node(self, ino: int) -> Node | None:
        row = self.c.execute(sa.select(node).where(node.c.ino == ino)).first()
        return _node(row) if row else None

    def child(self, parent: int, name: str) -> Node | None:
        row = self.c.execute(
            sa.select(node).where(node.c.parent == parent, node.c.name == name)).first()
        return _node(row) if row else None

    def children(self, parent: int, after_ino: int = 0, limit: int | None = None) -> list[Node]:
        q = (sa.select(node).where(node.c.parent == parent, node.c.ino > after_ino)
             .order_by(node.c.ino))
        if limit:
            q = q.limit(limit)
        return [_node(r) for r in self.c.execute(q)]

    def has_children(self, parent: int) -> bool:
        return self.c.execute(
            sa.select(node.c.ino).where(node.c.parent == parent).limit(1)).first() is not None

    def count_subdirs(self, parent: int) -> int:
        return self.c.execute(
            sa.select(sa.func.count()).where(node.c.parent == parent,
                                             sa.func.mod(node.c.mode, 0o200000) >= 0o40000,
                                             sa.func.mod(node.c.mode, 0o200000) < 0o60000)
        ).scalar_one()

    def insert_node(self, **values: Any) -> int:
        t = now_ns()
        for k in ("atime_ns", "mtime_ns", "ctime_ns"):
            values.setdefault(k, t)
        ino = self._insert(node.insert().values(**values))
        self.touched_nodes.add(ino)
        return ino

    def update_node(self, ino: int, **values: Any) -> None:
        self.c.execute(node.update().where(node.c.ino == ino).values(**values))
        self.touched_nodes.add(ino)

    def delete_node(self, ino: int) -> None:
        self.c.execute(node.delete().where(node.c.ino == ino))
        self.touched_nodes.add(ino)

    def node_by_image(self, image_id: int) -> Node | None:
        row = self.c.execute(sa.select(node).where(node.c.image_id == image_id)).first()
        return _node(row) if row else None

    def subtree_images(self, ino: int) -> list[int]:
        """Image ids below a directory (used to refuse deleting what is attached)."""
        out, todo = [], [ino]
        while todo:
            for child in self.children(todo.pop()):
                if child.image_id is not None:
                    out.append(child.image_id)
                if child.is_dir:
                    todo.append(child.ino)
        return out

    # images
    def image(self, image_id: int) -> Image | None:
        row = self.c.execute(sa.select(image).where(image.c.id == image_id)).first()
        return Image(**row._mapping) if row else None

    def images(self, backend_id: int | None = None) -> list[Image]:
        q = sa.select(image).order_by(image.c.id)
        if backend_id is not None:
            q = q.where(image.c.backend_id == backend_id)
        return [Image(**r._mapping) for r in self.c.execute(q)]

    def insert_image(self, backend_id: int, key: str, size: int) -> int:
        image_id = self._insert(image.insert().values(
            backend_id=backend_id, key=key, size=size, created=time.time()))
        self.touched_images.add(image_id)
        return image_id

    def set_image_size(self, image_id: int, size: int) -> None:
        self.c.execute(image.update().where(image.c.id == image_id).values(size=size))
        self.touched_images.add(image_id)

    def delete_image(self, image_id: int) -> None:
        self.c.execute(lease.delete().where(lease.c.image_id == image_id))
        self.c.execute(attachment.delete().where(attachment.c.image_id == image_id))
        self.c.execute(image.delete().where(image.c.id == image_id))
        self.touched_images.add(image_id)

    def orphan_images(self) -> list[Image]:
        """Images that no namespace entry names (left by a crash during an unlink)."""
        q = sa.select(image).where(~sa.exists().where(node.c.image_id == image.c.id))
        return [Image(**r._mapping) for r in self.c.execute(q)]

    # attachments
    def attachments(self, image_id: int | None = None, backend_id: int | None = None,
                    host: str | None = None) -> list[Attachment]:
        q = sa.select(attachment).order_by(attachment.c.id)
        if image_id is not None:
            q = q.where(attachment.c.image_id == image_id)
        if backend_id is not None:
            q = q.where(attachment.c.image_id.in_(
                sa.select(image.c.id).where(image.c.backend_id == backend_id)))
        if host is not None:
            q = q.where(attachment.c.host == host)
        return [Attachment(**r._mapping) for r in self.c.execute(q)]

    def attachment_at(self, host: str, path: str) -> Attachment | None:
        row = self.c.execute(sa.select(attachment).where(
            attachment.c.host == host, attachment.c.path == path)).first()
        return Attachment(**row._mapping) if row else None

    def attachment_by_link(self, link_ino: int) -> Attachment | None:
        row = self.c.execute(
            sa.select(attachment).where(attachment.c.link_ino == link_ino)).first()
        return Attachment(**row._mapping) if row else None

    def insert_attachment(self, image_id: int, host: str, path: str,
                          link_ino: int | None = None) -> int:
        return self._insert(attachment.insert().values(
            image_id=image_id, host=host, path=path, link_ino=link_ino, created=time.time()))

    def set_attachment_path(self, attachment_id: int, path: str) -> None:
        self.c.execute(attachment.update().where(attachment.c.id == attachment_id).values(path=path))

    def delete_attachment(self, attachment_id: int) -> None:
        self.c.execute(attachment.delete().where(attachment.c.id == attachment_id))


def _encode_backend(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for k in ("tm_raw", "tags", "attrs"):
        if k in out and not isinstance(out[k], str):
            out[k] = json.dumps(out[k], sort_keys=True)
    return out


class PoolStore:
    """Owns the engine; `begin()` gives a transaction, `read()` a consistent read."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)
        self._migrate()

    @property
    def shared(self) -> bool:
        """Whether several hosts can share this store (PostgreSQL); SQLite is one host's."""
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def begin(self) -> Iterator[Tx]:
        """A write transaction (on SQLite it takes the write lock at once). A uniqueness
        violation (two hosts making the same name at once) is `Exists`, as a check would say."""
        try:
            with self.engine.begin() as conn:
                yield Tx(conn)
        except sa.exc.IntegrityError as e:
            from .errors import Exists

            raise Exists("it exists (made concurrently elsewhere)",
                         "look again: another host made it meanwhile") from e

    def sync(self) -> None:
        """Make every committed transaction durable against power loss. PostgreSQL's commits are
        (synchronous_commit). SQLite runs with synchronous=NORMAL (a commit reaches the WAL in the
        OS, safe from a crash of the daemon): here one tiny commit under synchronous=FULL fsyncs
        the WAL, and with it every commit before. (SQLite's own file handles only: a descriptor
        opened and closed on its files elsewhere in the process would drop its POSIX locks.)"""
        if self.engine.dialect.name != "sqlite":
            return
        raw = self.engine.raw_connection()
        try:
            db = raw.driver_connection
            assert db is not None
            db.execute("PRAGMA synchronous=FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("UPDATE schema_info SET version = version")
                db.execute("COMMIT")
            finally:
                db.execute("PRAGMA synchronous=NORMAL")
        finally:
            raw.close()

    def listen(self) -> Any:
        """A dedicated psycopg connection LISTENing on the change channel (PostgreSQL only)."""
        import psycopg

        url = self.engine.url.set(drivername="postgresql")
        conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only transaction: never takes SQLite's write lock."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(tm2fs_read=True)
            with conn.begin():
                yield Tx(conn)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> PoolStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self.begin() as tx:
            meta.create_all(tx.c)
            row = tx.c.execute(sa.select(schema_info.c.version)).first()
            if row is None:
                tx.c.execute(schema_info.insert().values(id=1, version=SCHEMA_VERSION))
                t = now_ns()
                tx.c.execute(node.insert().values(
                    ino=ROOT_INO, parent=None, name="", backend_id=None, mode=stat.S_IFDIR | 0o755,
                    uid=0, gid=0, atime_ns=t, mtime_ns=t, ctime_ns=t))
                if tx.c.dialect.name == "postgresql":  # explicit ino above: move the sequence on
                    tx.c.execute(sa.text(
                        "SELECT setval(pg_get_serial_sequence('namespace', 'ino'), 1)"))
                return
            version = row[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"pool store schema is version {version}, newer than this tm2fs "
                    f"({SCHEMA_VERSION}): upgrade tm2fs")
            for v in range(version, SCHEMA_VERSION):
                log.info("migrating pool store schema %d -> %d", v, v + 1)
                MIGRATIONS[v - 1](tx.c)
            tx.c.execute(schema_info.update().values(version=SCHEMA_VERSION))


def _engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # a commit survives a crash of the daemon at once (it is in the WAL, in the OS);
            # against power loss the WAL is fsynced by `sync()`: on fsync, and within a second
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # Writers take the lock up front: no deadlock between two readers that both upgrade.
            read = conn.get_execution_options().get("tm2fs_read")
            conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

        return engine
    # No pre-ping (a round trip per transaction): a dead connection fails its statement, the pool
    # drops it, and the next transaction connects again. A server that stops answering is noticed
    # by TCP keepalives instead of hanging the store worker for ever.
    return sa.create_engine(url, pool_size=2, max_overflow=2, connect_args={
        "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
        "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": 30000})


def sqlite_url(path: str) -> str:
    return f"sqlite:///{path}"
