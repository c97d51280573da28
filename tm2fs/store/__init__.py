"""The pool store: backends, the namespace, images and attachments, in SQL (SQLite or PostgreSQL).

Everything the daemon knows about the pool lives here, so a restart (or another host) sees the same
tree. Backends keep only image bytes under an opaque key. The store knows SQL and nothing of the
rules: those are the core's. It is synchronous and slow (a commit to SQLite, a round trip to
PostgreSQL): the daemon calls it only from its store worker thread (`storeworker.py`), never from
the trio loop. Each write transaction records which rows it touched (`Tx.delta`), so the in-memory
view of every host can be brought up to date from exactly those rows.
"""

from ..model import ROOT_INO, Attachment, Backend, Image, Node, now_ns
from .engine import PoolStore, sqlite_url
from .schema import CHANNEL, MIGRATIONS, SCHEMA_VERSION, schema_info
from .tx import Delta, Tx

__all__ = ["CHANNEL", "MIGRATIONS", "ROOT_INO", "SCHEMA_VERSION", "Attachment", "Backend", "Delta",
           "Image", "Node", "PoolStore", "Tx", "now_ns", "schema_info", "sqlite_url"]
