"""The one error hierarchy: each error knows its errno (for the mount) and HTTP status (for the API).

The service layer raises these; the filesystem and the API only translate them, so the same mistake
gets the same answer however it was made.
"""

from __future__ import annotations

import errno as E


class Tm2Error(Exception):
    """Base class; `hint` says what to do next and is shown by the CLIs."""

    errno: int = E.EIO
    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict:
        return {"error": self.code, "message": self.message, "hint": self.hint}


def _kind(name: str, err: int, status: int, code: str) -> type[Tm2Error]:
    return type(name, (Tm2Error,), {"errno": err, "status": status, "code": code})


NotFound = _kind("NotFound", E.ENOENT, 404, "not_found")
Exists = _kind("Exists", E.EEXIST, 409, "exists")
InvalidArgument = _kind("InvalidArgument", E.EINVAL, 400, "invalid_argument")
NameTooLong = _kind("NameTooLong", E.ENAMETOOLONG, 400, "name_too_long")
PermissionDenied = _kind("PermissionDenied", E.EACCES, 403, "permission_denied")
NotPermitted = _kind("NotPermitted", E.EPERM, 403, "not_permitted")
NotEmpty = _kind("NotEmpty", E.ENOTEMPTY, 409, "not_empty")
IsADirectory = _kind("IsADirectory", E.EISDIR, 409, "is_a_directory")
NotADirectory = _kind("NotADirectory", E.ENOTDIR, 409, "not_a_directory")
CrossBackend = _kind("CrossBackend", E.EXDEV, 409, "cross_backend")
ReadOnly = _kind("ReadOnly", E.EROFS, 409, "read_only")
Busy = _kind("Busy", E.EBUSY, 409, "busy")
NoSpace = _kind("NoSpace", E.ENOSPC, 507, "no_space")
FileTooBig = _kind("FileTooBig", E.EFBIG, 400, "too_big")
Unsupported = _kind("Unsupported", E.EOPNOTSUPP, 501, "unsupported")
BackendUnavailable = _kind("BackendUnavailable", E.EIO, 503, "backend_unavailable")
Remote = _kind("Remote", E.EREMOTE, 409, "remote")  # a host-local backend of another host
StoreUnavailable = _kind("StoreUnavailable", E.EIO, 503, "store_unavailable")  # pool store stalled

BY_CODE: dict[str, type[Tm2Error]] = {
    cls.code: cls
    for cls in (
        Tm2Error, NotFound, Exists, InvalidArgument, NameTooLong, PermissionDenied, NotPermitted,
        NotEmpty, IsADirectory, NotADirectory, CrossBackend, ReadOnly, Busy, NoSpace, FileTooBig,
        Unsupported, BackendUnavailable, Remote, StoreUnavailable,
    )
}


def from_dict(data: dict) -> Tm2Error:
    """Rebuild an error sent by the API, so clients raise what the daemon raised."""
    cls = BY_CODE.get(data.get("error", ""), Tm2Error)
    return cls(data.get("message", "unknown error"), data.get("hint"))
