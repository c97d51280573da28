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


class NotFound(Tm2Error):
    errno = E.ENOENT
    status = 404
    code = "not_found"


class Exists(Tm2Error):
    errno = E.EEXIST
    status = 409
    code = "exists"


class InvalidArgument(Tm2Error):
    errno = E.EINVAL
    status = 400
    code = "invalid_argument"


class NameTooLong(Tm2Error):
    errno = E.ENAMETOOLONG
    status = 400
    code = "name_too_long"


class PermissionDenied(Tm2Error):
    errno = E.EACCES
    status = 403
    code = "permission_denied"


class NotPermitted(Tm2Error):
    errno = E.EPERM
    status = 403
    code = "not_permitted"


class NotEmpty(Tm2Error):
    errno = E.ENOTEMPTY
    status = 409
    code = "not_empty"


class IsADirectory(Tm2Error):
    errno = E.EISDIR
    status = 409
    code = "is_a_directory"


class NotADirectory(Tm2Error):
    errno = E.ENOTDIR
    status = 409
    code = "not_a_directory"


class CrossBackend(Tm2Error):
    errno = E.EXDEV
    status = 409
    code = "cross_backend"


class ReadOnly(Tm2Error):
    errno = E.EROFS
    status = 409
    code = "read_only"


class Busy(Tm2Error):
    errno = E.EBUSY
    status = 409
    code = "busy"


class NoSpace(Tm2Error):
    errno = E.ENOSPC
    status = 507
    code = "no_space"


class FileTooBig(Tm2Error):
    errno = E.EFBIG
    status = 400
    code = "too_big"


class Unsupported(Tm2Error):
    errno = E.EOPNOTSUPP
    status = 501
    code = "unsupported"


class BackendUnavailable(Tm2Error):
    errno = E.EIO
    status = 503
    code = "backend_unavailable"


class Remote(Tm2Error):
    """A host-local backend of another host."""

    errno = E.EREMOTE
    status = 409
    code = "remote"


class StoreUnavailable(Tm2Error):
    """The pool store stalled; `maybe_done` when the change was running and may yet commit."""

    errno = E.EIO
    status = 503
    code = "store_unavailable"
    maybe_done: bool = False


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
