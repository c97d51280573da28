"""One transaction's worth of queries, and the `Delta` a write transaction leaves.

The queries the kernel's requests make all the time (entries, images, reservations, leases) are
plain SQL run through the driver (`_x`): SQLAlchemy's statement compilation costs ten times the
statement itself on SQLite (measured: 70 us against 7 us per INSERT). The rest use SQLAlchemy Core.
Parameters are always bound, never formatted into the SQL; only column names (from this module,
never from users) are.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ..model import Attachment, Backend, Image, Node, now_ns
from .schema import (
    CHANNEL,
    attachment,
    backend,
    host,
    host_backend,
    image,
    lease,
    node,
    reservation,
    schema_info,
)

NODE_COLS = ("ino, parent, name, backend_id, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, target, "
             "image_id, ver")  # Node's field order
IMAGE_COLS = 'id, backend_id, "key", size, created, ver'  # Image's
ATTACHMENT_COLS = "id, image_id, host, path, link_ino, created, uid, native"  # Attachment's
CHUNK = 500  # ids per IN (...) list
_PG: dict[str, str] = {}  # SQL with ? -> with %s


def _marks(values: tuple[Any, ...]) -> str:
    return ", ".join("?" * len(values))


def _column(table: sa.Table, name: str) -> str:
    """A column name for plain SQL: only the table's own (they come from code, never users)."""
    if name not in table.c:
        raise KeyError(f"{table.name} has no column {name}")
    return f'"{name}"' if name == "key" else name


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
                             "timeout", "error", "root_ino", "created", "updated", "monitored",
                             "ver")},
        tm_raw=json.loads(m["tm_raw"]), tags=json.loads(m["tags"]), attrs=json.loads(m["attrs"]),
    )


def _node(row: Any) -> Node:
    return Node(**row._mapping)


@dataclass
class Delta:
    """What one transaction changed, as the rows now are (None: deleted). Applied to each host's
    in-memory view after the commit; other hosts hear it through NOTIFY: the rows themselves
    (`rows`) when they fit a notification, else their ids (`ids`) to re-read."""

    nodes: dict[int, Node | None] = field(default_factory=dict)
    images: dict[int, Image | None] = field(default_factory=dict)
    backends: dict[int, Backend | None] = field(default_factory=dict)
    complete: bool = False  # a full re-read: whatever is not in here is gone

    def __bool__(self) -> bool:
        return bool(self.nodes or self.images or self.backends)

    def merge(self, other: Delta) -> None:
        self.nodes.update(other.nodes)
        self.images.update(other.images)
        self.backends.update(other.backends)

    def ids(self) -> dict[str, list[int]]:
        return {"n": sorted(self.nodes), "i": sorted(self.images), "b": sorted(self.backends)}

    def rows(self) -> dict[str, list[Any]]:
        """The rows as JSON-able lists in their fields' order; deleted ones by id."""
        out: dict[str, list[Any]] = {}
        for kind, rows, fields in (("n", self.nodes, Node.__slots__),
                                   ("i", self.images, Image.__slots__),
                                   ("b", self.backends, Backend.__slots__)):
            out["r" + kind] = [[getattr(r, f) for f in fields] for r in rows.values() if r]
            out["d" + kind] = [i for i, r in rows.items() if r is None]
        return out

    @classmethod
    def from_rows(cls, data: dict[str, Any]) -> Delta:
        """The inverse of `rows`; ValueError/TypeError if malformed."""
        nodes: dict[int, Node | None] = {int(i): None for i in data.get("dn", [])}
        nodes.update((n.ino, n) for n in (Node(*r) for r in data.get("rn", [])))
        images: dict[int, Image | None] = {int(i): None for i in data.get("di", [])}
        images.update((m.id, m) for m in (Image(*r) for r in data.get("ri", [])))
        backends: dict[int, Backend | None] = {int(i): None for i in data.get("db", [])}
        backends.update((b.id, b) for b in (Backend(*r) for r in data.get("rb", [])))
        return cls(nodes, images, backends)


class Tx:
    """One transaction's worth of queries; the core composes them into its rules. Writes note the
    rows they touch so `delta()` can read them back before the commit."""

    def __init__(self, conn: sa.Connection) -> None:
        self.c = conn
        self.pg = conn.dialect.name == "postgresql"
        self._cursor: Any = None
        self.touched_nodes: set[int] = set()
        self.touched_images: set[int] = set()
        self.touched_backends: set[int] = set()

    def delta(self, bump: bool = True) -> Delta:
        """The touched rows as this transaction leaves them: a few indexed statements. On
        PostgreSQL each row's version is bumped as it is read, under its row lock, so versions of
        one row grow in commit order whichever hosts commit them."""
        d = Delta()
        bump = bump and self.pg
        if self.touched_nodes:
            found = self.nodes(sorted(self.touched_nodes), bump)
            d.nodes = {i: found.get(i) for i in self.touched_nodes}
        if self.touched_images:
            got = self.images_by_id(sorted(self.touched_images), bump)
            d.images = {i: got.get(i) for i in self.touched_images}
        if self.touched_backends:
            ids = sorted(self.touched_backends)
            rows = self.c.execute(
                backend.update().where(backend.c.id.in_(ids)).values(ver=backend.c.ver + 1)
                .returning(*backend.c) if bump else
                sa.select(backend).where(backend.c.id.in_(ids)))
            got_b = {b.id: b for b in map(_backend, rows)}
            d.backends = {i: got_b.get(i) for i in self.touched_backends}
        return d

    def read_delta(self, nodes: list[int], images: list[int], backends: list[int]) -> Delta:
        """The rows another host said it changed, as they are now."""
        self.touched_nodes.update(nodes)
        self.touched_images.update(images)
        self.touched_backends.update(backends)
        return self.delta(bump=False)

    def _x(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """Plain SQL on the driver's own cursor, `?` placeholders (turned into psycopg's `%s`):
        even SQLAlchemy's driver-level execution costs 45 us a statement in result set-up, the
        statement itself 12 us on SQLite. Rows are plain tuples in the SQL's order; the result
        is consumed before the next statement. (Typed Any: the shape is the SQL's.)"""
        if self.pg:
            sql = _PG.get(sql) or _PG.setdefault(sql, sql.replace("?", "%s"))
        if self._cursor is None:
            raw = self.c.connection.dbapi_connection
            assert raw is not None  # a Connection in a transaction holds its driver connection
            self._cursor = raw.cursor()
        try:
            self._cursor.execute(sql, params)
        except self.c.dialect.loaded_dbapi.Error as e:  # as SQLAlchemy would raise it
            raise sa.exc.DBAPIError.instance(sql, params, e, self.c.dialect.loaded_dbapi.Error,
                                             dialect=self.c.dialect) from e
        return self._cursor

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self._x(sql, params).fetchone()

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

    def pool_id(self) -> str:
        """The pool's identity (random, made with the store)."""
        return str(self.c.execute(sa.select(schema_info.c.pool_id)).scalar_one())

    def images_by_id(self, ids: list[int], bump: bool = False) -> dict[int, Image]:
        return self._by_id("image", "id", IMAGE_COLS, Image, ids, bump)

    def _by_id(self, table: str, key: str, cols: str, make: Any, ids: list[int],
               bump: bool) -> dict[int, Any]:
        """Rows by id, in one statement per CHUNK; with `bump`, their versions moved on in the
        same statement (and the rows locked)."""
        out: dict[int, Any] = {}
        for i in range(0, len(ids), CHUNK):
            part = tuple(ids[i:i + CHUNK])
            marks = _marks(part)
            sql = (f"UPDATE {table} SET ver = ver + 1 WHERE {key} IN ({marks}) RETURNING {cols}"
                   if bump else f"SELECT {cols} FROM {table} WHERE {key} IN ({marks})")
            out.update((r[0], make(*r)) for r in self._x(sql, part))
        return out

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
        lock = " FOR UPDATE" if self.pg else ""
        sql = f"SELECT * FROM storagebackend_pool WHERE id = ?{lock}"
        row = self.c.exec_driver_sql(sql.replace("?", "%s") if self.pg else sql,
                                     (backend_id,)).first()
        return _backend(row) if row else None

    def allocated(self, backend_id: int) -> int:
        """Virtual space of a backend: its images' sizes plus pending reservations. One statement,
        so a reservation turning into an image in another transaction is never counted 0 or 2
        times (each statement sees one snapshot, even under READ COMMITTED)."""
        return int(self._x(
            "SELECT (SELECT COALESCE(SUM(size), 0) FROM image WHERE backend_id = ?)"
            " + (SELECT COALESCE(SUM(size), 0) FROM reservation WHERE backend_id = ?)",
            (backend_id, backend_id)).fetchone()[0])

    def insert_reservation(self, backend_id: int, size: int, host: str,
                           key: str | None = None) -> int:
        return int(self._one('INSERT INTO reservation (backend_id, size, host, "key", created) '
                           "VALUES (?, ?, ?, ?, ?) RETURNING id",
                           (backend_id, size, host, key, time.time()))[0])

    def set_reservation_key(self, reservation_id: int, key: str) -> None:
        self.c.execute(reservation.update().where(reservation.c.id == reservation_id)
                       .values(key=key))

    def reserved_keys(self, backend_id: int) -> set[str]:
        """Keys of creates in progress (on any host): not leftovers, whatever a sweep thinks."""
        return {k for (k,) in self.c.execute(sa.select(reservation.c.key).where(
            reservation.c.backend_id == backend_id, reservation.c.key.is_not(None)))}

    def delete_reservation(self, reservation_id: int | None) -> None:
        if reservation_id is not None:
            self._x("DELETE FROM reservation WHERE id = ?", (reservation_id,))

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
        lock = " FOR UPDATE" if self.pg else ""
        row = self._one(f"SELECT host, since FROM lease WHERE image_id = ?{lock}", (image_id,))
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

    def nodes(self, inos: list[int], bump: bool = False) -> dict[int, Node]:
        """Many entries in one query each chunk (e.g. every backend's root, a delta)."""
        return self._by_id("namespace", "ino", NODE_COLS, Node, inos, bump)

    # namespace
    def node(self, ino: int) -> Node | None:
        row = self._one(f"SELECT {NODE_COLS} FROM namespace WHERE ino = ?", (ino,))
        return Node(*row) if row else None

    def child(self, parent: int, name: str) -> Node | None:
        row = self._one(f"SELECT {NODE_COLS} FROM namespace WHERE parent = ? AND name = ?",
                      (parent, name))
        return Node(*row) if row else None

    def children(self, parent: int, after_ino: int = 0, limit: int | None = None) -> list[Node]:
        q = (sa.select(node).where(node.c.parent == parent, node.c.ino > after_ino)
             .order_by(node.c.ino))
        if limit:
            q = q.limit(limit)
        return [_node(r) for r in self.c.execute(q)]

    def has_children(self, parent: int) -> bool:
        return self._one("SELECT 1 FROM namespace WHERE parent = ? LIMIT 1", (parent,)) is not None

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
        cols = tuple(sorted(values))
        ino = int(self._x(f"INSERT INTO namespace ({', '.join(_column(node, c) for c in cols)}) "
                          f"VALUES ({_marks(cols)}) RETURNING ino",
                          tuple(values[c] for c in cols)).fetchone()[0])
        self.touched_nodes.add(ino)
        return ino

    def update_node(self, ino: int, **values: Any) -> None:
        cols = tuple(sorted(values))
        self._x(f"UPDATE namespace SET {', '.join(f'{_column(node, c)} = ?' for c in cols)} "
                "WHERE ino = ?", (*(values[c] for c in cols), ino))
        self.touched_nodes.add(ino)

    def delete_node(self, ino: int) -> None:
        self._x("DELETE FROM namespace WHERE ino = ?", (ino,))
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
        row = self._one(f"SELECT {IMAGE_COLS} FROM image WHERE id = ?", (image_id,))
        return Image(*row) if row else None

    def images(self, backend_id: int | None = None) -> list[Image]:
        q = sa.select(image).order_by(image.c.id)
        if backend_id is not None:
            q = q.where(image.c.backend_id == backend_id)
        return [Image(**r._mapping) for r in self.c.execute(q)]

    def insert_image(self, backend_id: int, key: str, size: int) -> int:
        image_id = int(self._one('INSERT INTO image (backend_id, "key", size, created) '
                               "VALUES (?, ?, ?, ?) RETURNING id",
                               (backend_id, key, size, time.time()))[0])
        self.touched_images.add(image_id)
        return image_id

    def set_image_size(self, image_id: int, size: int) -> None:
        self._x("UPDATE image SET size = ? WHERE id = ?", (size, image_id))
        self.touched_images.add(image_id)

    def set_image_data(self, image_id: int, key: str, size: int) -> None:
        """An image takes other data (a replacing write): its key and size change together."""
        self._x('UPDATE image SET "key" = ?, size = ? WHERE id = ?', (key, size, image_id))
        self.touched_images.add(image_id)

    def detached_nodes(self) -> list[Node]:
        """Entries outside the tree (the root aside): images being filled (`Images.create`)."""
        rows = self._x(f"SELECT {NODE_COLS} FROM namespace WHERE parent IS NULL "
                       "AND backend_id IS NOT NULL")
        return [Node(*r) for r in rows.fetchall()]

    def delete_image(self, image_id: int) -> None:
        self._x("DELETE FROM lease WHERE image_id = ?", (image_id,))
        self._x("DELETE FROM attachment WHERE image_id = ?", (image_id,))
        self._x("DELETE FROM image WHERE id = ?", (image_id,))
        self.touched_images.add(image_id)

    def orphan_images(self) -> list[Image]:
        """Images that no namespace entry names (left by a crash during an unlink)."""
        q = sa.select(image).where(~sa.exists().where(node.c.image_id == image.c.id))
        return [Image(**r._mapping) for r in self.c.execute(q)]

    # attachments
    def attachments(self, image_id: int | None = None, backend_id: int | None = None,
                    host: str | None = None) -> list[Attachment]:
        if image_id is not None and backend_id is None and host is None:  # every unlink asks
            return [Attachment(*r) for r in self._x(
                f"SELECT {ATTACHMENT_COLS} FROM attachment WHERE image_id = ? ORDER BY id",
                (image_id,))]
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
        row = self._one(f"SELECT {ATTACHMENT_COLS} FROM attachment WHERE link_ino = ?",
                      (link_ino,))
        return Attachment(*row) if row else None

    def insert_attachment(self, image_id: int, host: str, path: str,
                          link_ino: int | None = None, uid: int | None = None,
                          native: bool = False) -> int:
        return self._insert(attachment.insert().values(
            image_id=image_id, host=host, path=path, link_ino=link_ino, created=time.time(),
            uid=uid, native=native))

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


