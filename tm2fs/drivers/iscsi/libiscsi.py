"""libiscsi's userspace initiator, bound with ctypes: a `Session` is one login to LUN 1 of a target.

Why ctypes and not cython-iscsi (the PyPI wrapper): that one holds the GIL during its blocking
calls (a hung target would freeze the whole trio loop), never frees its tasks or contexts, and has
no logout and no timeouts. ctypes releases the GIL in every foreign call. Login and logout are
blocking calls, run in abandonable worker threads; libiscsi's own timeout
(iscsi_set_timeout = TIMEOUT) ends an abandoned call soon after. The data path uses the
asynchronous calls from the trio thread (`pipeline`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import threading
from typing import Any

from .settings import LUN

log = logging.getLogger(__name__)


class _ScsiTask(ctypes.Structure):
    """The head of libiscsi's `struct scsi_task` (scsi-lowlevel.h), up to the sense key."""

    _fields_ = [("status", ctypes.c_int), ("cdb_size", ctypes.c_int), ("xfer_dir", ctypes.c_int),
                ("expxferlen", ctypes.c_int), ("cdb", ctypes.c_ubyte * 16),
                ("residual_status", ctypes.c_int), ("residual", ctypes.c_size_t),
                ("sense_error_type", ctypes.c_ubyte), ("sense_key", ctypes.c_int),
                ("sense_ascq", ctypes.c_int)]


class _IoVec(ctypes.Structure):  # struct scsi_iovec
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _ReadCapacity16(ctypes.Structure):
    _fields_ = [("returned_lba", ctypes.c_uint64), ("block_length", ctypes.c_uint32)]


#: void (*iscsi_command_cb)(struct iscsi_context *, int status, void *command_data, void *private)
COMMAND_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

STATUS_GOOD = 0
STATUS_CHECK_CONDITION = 2
STATUS_BUSY = 8
STATUS_TASK_SET_FULL = 0x28
STATUS_CANCELLED = 0x0F000000
STATUS_ERROR = 0x0F000001
STATUS_TIMEOUT = 0x0F000002
SENSE_UNIT_ATTENTION = 6
SESSION_NORMAL = 2
HEADER_DIGEST_NONE = 0

_lib_lock = threading.Lock()
_lib: Any = None


def libiscsi() -> Any:
    """libiscsi.so.7 with the prototypes of the few calls used here (Debian's libiscsi7)."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("iscsi") or "libiscsi.so.7")  # releases the GIL
        except OSError:
            raise OSError(errno.ENOSYS,
                          "iscsi driver: libiscsi is not installed (Debian's libiscsi7)") from None
        task = ctypes.POINTER(_ScsiTask)
        vp, cp, i, u32, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
        protos: dict[str, tuple[Any, list[Any]]] = {
            "iscsi_create_context": (vp, [cp]),
            "iscsi_set_targetname": (i, [vp, cp]),
            "iscsi_set_session_type": (i, [vp, i]),
            "iscsi_set_header_digest": (i, [vp, i]),
            "iscsi_set_timeout": (i, [vp, i]),
            "iscsi_set_noautoreconnect": (None, [vp, i]),
            "iscsi_set_tcp_syncnt": (i, [vp, i]),
            "iscsi_full_connect_sync": (i, [vp, cp, i]),
            "iscsi_get_fd": (i, [vp]),
            "iscsi_which_events": (i, [vp]),
            "iscsi_service": (i, [vp, i]),
            "iscsi_read16_iov_task": (task, [vp, i, u64, u32, i, i, i, i, i, i, COMMAND_CB, vp,
                                             ctypes.POINTER(_IoVec), i]),
            "iscsi_write16_task": (task, [vp, i, u64, cp, u32, i, i, i, i, i, i, COMMAND_CB, vp]),
            "iscsi_synchronizecache10_task": (task, [vp, i, i, i, i, i, COMMAND_CB, vp]),
            "iscsi_readcapacity16_task": (task, [vp, i, COMMAND_CB, vp]),
            "iscsi_scsi_cancel_all_tasks": (None, [vp]),
            "scsi_datain_unmarshall": (ctypes.POINTER(_ReadCapacity16), [task]),
            "scsi_free_scsi_task": (None, [task]),
            "iscsi_logout_sync": (i, [vp]),
            "iscsi_destroy_context": (i, [vp]),
            "iscsi_get_error": (cp, [vp]),
        }
        for name, (restype, argtypes) in protos.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _lib = lib
        return lib


class SessionCount:
    """Open initiator sessions of one driver (changed from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def errno_for(message: str) -> int:
    text = message.lower()
    if "refused" in text:
        return errno.ECONNREFUSED
    if "timed out" in text or "timeout" in text:
        return errno.ETIMEDOUT
    return errno.EIO


class Session:
    """One libiscsi session logged in to LUN 1 of one target: login and logout (blocking)."""

    def __init__(self, portal: str, target: str, initiator: str, timeout: float, count: SessionCount) -> None:
        self.lib = libiscsi()
        self.target = target
        self.count = count
        self.broken = False
        self.ctx = self.lib.iscsi_create_context(initiator.encode())
        if not self.ctx:
            raise OSError(errno.ENOMEM, "iscsi driver: cannot create an iSCSI context")
        lib, ctx = self.lib, self.ctx
        try:
            lib.iscsi_set_targetname(ctx, target.encode())
            lib.iscsi_set_session_type(ctx, SESSION_NORMAL)
            lib.iscsi_set_header_digest(ctx, HEADER_DIGEST_NONE)
            lib.iscsi_set_timeout(ctx, max(1, round(timeout)))  # every PDU, the login included
            lib.iscsi_set_noautoreconnect(ctx, 1)  # a dropped connection fails calls, never loops
            lib.iscsi_set_tcp_syncnt(ctx, 2)  # an unanswered TCP connect gives up after ~7 s
            if lib.iscsi_full_connect_sync(ctx, portal.encode(), LUN) != 0:
                message = self.error()
                raise OSError(errno_for(message), f"iscsi driver: login to {target} at {portal} "
                              f"failed: {message}")
        except BaseException:
            lib.iscsi_destroy_context(ctx)
            self.ctx = None
            raise
        count.add(1)

    def error(self) -> str:
        if self.ctx is None:
            return "the session is closed"
        text = self.lib.iscsi_get_error(self.ctx)
        return text.decode(errors="replace").strip() if text else "unknown error"

    def close(self) -> None:
        """Log out (best effort: a target that is gone cannot answer) and free the context."""
        if self.ctx is None:
            return
        ctx, self.ctx = self.ctx, None
        try:
            if not self.broken and self.lib.iscsi_logout_sync(ctx) != 0:
                log.debug("iscsi logout from %s failed", self.target)
        finally:
            self.lib.iscsi_destroy_context(ctx)
            self.count.add(-1)
