"""The pool store's schema: its tables, its version, and the migrations from each older version.

A new schema version appends one function to MIGRATIONS; `PoolStore` runs the missing ones at
start, in one transaction.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import sqlalchemy as sa

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
CHANNEL = "tm2fs"  # PostgreSQL NOTIFY channel for changes between daemons

meta = sa.MetaData()


def _version() -> sa.Column[int]:
    """Bumped by every transaction that touches the row (PostgreSQL): `model.Node.ver`."""
    return sa.Column("ver", sa.BigInteger, nullable=False, default=0, server_default="0")


schema_info = sa.Table(
    "schema_info", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    # the pool's identity: backends' directories carry it in their marker (core/ownership.py)
    sa.Column("pool_id", sa.String(32)),
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
    _version(),
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
    _version(),
    sa.UniqueConstraint("parent", "name", name="namespace_parent_name"),
)

image = sa.Table(
    "image", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("backend_id", sa.Integer, nullable=False, index=True),
    sa.Column("key", sa.String(255), nullable=False),  # opaque name on the backend
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    _version(),
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
    sa.Column("uid", sa.Integer),  # who attached it: they, the image's owner or root detach it
    # the hypervisor uses the image's own path (tm2 attach --native), not the mount
    sa.Column("native", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
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
    sa.Column("clusters", sa.Text, nullable=False, default='["default"]',
              server_default='["default"]'),  # JSON list: the clusters this host places in
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


def _v2_to_v3(c: sa.Connection) -> None:
    """Attachments remember who made them (older ones: NULL, so only the image's owner or root
    detaches them)."""
    if "uid" not in {col["name"] for col in sa.inspect(c).get_columns("attachment")}:
        c.exec_driver_sql("ALTER TABLE attachment ADD COLUMN uid INTEGER")


def new_pool_id() -> str:
    return uuid.uuid4().hex


def _v3_to_v4(c: sa.Connection) -> None:
    """The pool's identity, so a backend's directory can say which pool it belongs to."""
    if "pool_id" not in {col["name"] for col in sa.inspect(c).get_columns("schema_info")}:
        c.exec_driver_sql("ALTER TABLE schema_info ADD COLUMN pool_id VARCHAR(32)")
    c.execute(schema_info.update().values(pool_id=new_pool_id()))


def _v4_to_v5(c: sa.Connection) -> None:
    """Row versions, so hosts can apply the rows a change notification carries in any order they
    hear them; the clusters each host places in; whether an attachment's hypervisor reaches the
    image natively (older ones: through the mount, as they all did)."""
    for table, column, kind, default in (("namespace", "ver", "BIGINT", "0"),
                                         ("image", "ver", "BIGINT", "0"),
                                         ("storagebackend_pool", "ver", "BIGINT", "0"),
                                         ("host", "clusters", "TEXT", """'["default"]'"""),
                                         ("attachment", "native", "BOOLEAN", "false")):
        if column not in {col["name"] for col in sa.inspect(c).get_columns(table)}:
            c.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind} NOT NULL "
                              f"DEFAULT {default}")


# Migrations from version N to N+1; a new schema version appends one function here.
MIGRATIONS: list[Callable[[sa.Connection], None]] = [_v1_to_v2, _v2_to_v3, _v3_to_v4, _v4_to_v5]


