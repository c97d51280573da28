"""The core: the only place with rules. `Service` is its facade; the rooms are its modules."""

from ..model import ROOT, Attr, Caller
from .leases import HEARTBEAT
from .native import XATTR
from .openfiles import OpenFile
from .service import Service
from .streams import COPY_CHUNK, STREAM_DEPTH, copy_data, read_chunks, write_chunks

__all__ = ["COPY_CHUNK", "HEARTBEAT", "ROOT", "STREAM_DEPTH", "XATTR", "Attr", "Caller", "OpenFile",
           "Service", "copy_data", "read_chunks", "write_chunks"]
