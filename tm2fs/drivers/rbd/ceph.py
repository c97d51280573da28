"""The Ceph bindings (librados and librbd, as the distribution packages them), errors mapped.

Every librados/librbd call of the driver goes through `call` or `os_error`, so what leaves the
driver is an OSError with a fitting errno, which the service maps; and every image key is checked
here before it names an RBD image.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from typing import Any, TypeVar

from ...errors import InvalidArgument
from ..base import check_key as plain_key

try:  # the bindings exist only as distribution packages (python3-rados, python3-rbd)
    import rados
    import rbd
except ImportError:  # pragma: no cover - reported by validate()
    rados = rbd = None

T = TypeVar("T")

CLONE_SNAP = "tm2fs-clone-"  # + the clone's key: the snapshot of its parent a clone reads through
KEY_RE = re.compile(r"[0-9a-f]{32}")


def features() -> int:
    """Thin, COW-capable images with a fast usage map; deep-flatten so flattening frees parents."""
    return (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK | rbd.RBD_FEATURE_OBJECT_MAP
            | rbd.RBD_FEATURE_FAST_DIFF | rbd.RBD_FEATURE_DEEP_FLATTEN)


def os_error(e: BaseException, what: str) -> OSError:
    """A librados/librbd exception as an OSError with a fitting errno (the service maps those)."""
    if isinstance(e, OSError):  # builtin, e.g. raised by this driver
        return e
    code = getattr(e, "errno", None) or errno.EIO
    if isinstance(e, rbd.ImageHasSnapshots | rbd.ImageBusy):
        code = errno.EBUSY
    elif isinstance(e, rbd.Timeout | rados.TimedOut):
        code = errno.ETIMEDOUT
    elif isinstance(e, rbd.ConnectionShutdown | rados.ConnectionShutdown) or code == errno.ESHUTDOWN:
        code = errno.ENOTCONN
    text = re.sub(r"^\[errno \d+\] ", "", str(e))
    return OSError(code, f"{what}: {text}")


def call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking librbd/librados call with its errors mapped to OSError."""
    try:
        return fn(*args, **kwargs)
    except (rados.Error, rbd.Error) as e:
        raise os_error(e, what) from None


def check_key(key: str) -> None:
    """Keys name RBD images: no pool/snapshot separators, short enough for a snapshot name too."""
    plain_key(key, "rbd")
    if len(key) > 200 or "@" in key:
        raise InvalidArgument(f"rbd driver: invalid image key {key!r}")
