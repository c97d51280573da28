"""What a backend template may say: attributes as admins write them, checked and turned into
column values (sizes, numbers, tags, owners, OpenNebula-style permissions). Names of users and
groups are looked up in a worker thread: NSS may ask a slow directory server."""

from __future__ import annotations

import grp
import pwd
from collections.abc import Callable
from typing import Any

import trio

from .. import errors as err
from ..model import ROLES
from ..names import check_backend_name, check_name
from ..sizes import parse_size
from ..template import parse_template

BACKEND_KEYS = {"NAME", "TM", "TM_RAW", "CAPACITY", "COST", "ROLE", "TAGS", "CLUSTER", "TIMEOUT",
                "USER", "GROUP", "PERMISSIONS", "OVERCOMMIT", "RESERVED", "PRIORITY"}


def upper(spec: dict[str, Any]) -> dict[str, Any]:
    return {str(k).upper(): v for k, v in spec.items()}


def values(spec: dict[str, Any]) -> dict[str, Any]:
    """Template attributes -> column values, each checked; unknown keys are custom attributes."""
    spec = upper(spec)
    out: dict[str, Any] = {}
    if "NAME" in spec:
        out["name"] = check_backend_name(str(spec["NAME"]))
    if "CAPACITY" in spec:
        cap = spec["CAPACITY"]
        out["capacity"] = None if cap in (None, "", "unlimited") else parse_size(cap)
    if "COST" in spec:
        try:
            out["cost"] = int(spec["COST"])
        except (TypeError, ValueError):
            raise err.InvalidArgument(f"COST {spec['COST']!r} is not a whole number") from None
        if out["cost"] < 0:
            raise err.InvalidArgument("COST must be 0 or more")
    if "ROLE" in spec:
        role = str(spec["ROLE"]).upper()
        if role not in ROLES:
            raise err.InvalidArgument(f"ROLE {spec['ROLE']!r} is not one of {', '.join(ROLES)}")
        out["role"] = role
    if "TAGS" in spec:
        out["tags"] = _tags(spec["TAGS"])
    if "CLUSTER" in spec:
        out["cluster"] = check_name(str(spec["CLUSTER"]), "cluster")
    if "OVERCOMMIT" in spec:
        out["overcommit"] = number(spec["OVERCOMMIT"], "OVERCOMMIT", 1, 100)
    if "RESERVED" in spec:
        text = str(spec["RESERVED"]).strip()
        share = number(text.rstrip("%"), "RESERVED", 0, 90)
        out["reserved"] = share / 100 if text.endswith("%") or share >= 1 else share
        if out["reserved"] > 0.9:
            raise err.InvalidArgument("RESERVED must be at most 90%")
    if "PRIORITY" in spec:
        out["priority"] = int(number(spec["PRIORITY"], "PRIORITY", -10**6, 10**6))
    if "TIMEOUT" in spec:
        try:
            timeout = float(spec["TIMEOUT"])
        except (TypeError, ValueError):
            raise err.InvalidArgument(f"TIMEOUT {spec['TIMEOUT']!r} is not a number") from None
        if not 0 < timeout <= 3600:
            raise err.InvalidArgument("TIMEOUT must be between 0 and 3600 seconds")
        out["timeout"] = timeout
    attrs = {k: v for k, v in spec.items() if k not in BACKEND_KEYS}
    for k, v in attrs.items():
        if not k.replace("_", "").isalnum():
            raise err.InvalidArgument(f"attribute name {k!r} may use letters, digits and '_'")
        if not isinstance(v, str | int | float | None):
            raise err.InvalidArgument(f"attribute {k} must be a single value")
    if attrs:
        out["attrs"] = attrs
    return out


def _tags(tags: Any) -> list[str]:
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise err.InvalidArgument("TAGS must be a comma-separated list of words")
    for t in tags:
        if not t.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise err.InvalidArgument(f"tag {t!r} may use letters, digits, '-', '_', '.'")
    return sorted(set(tags), key=tags.index)


def tm_raw(value: Any) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return {str(k).upper(): v for k, v in value.items()}
    if isinstance(value, str):
        return parse_template(value)
    raise err.InvalidArgument("TM_RAW must be KEY=VALUE pairs")


async def owner(spec: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """USER, GROUP (names or numbers) and PERMISSIONS of a backend's directory."""
    spec = upper(spec)
    uid = gid = mode = None
    if "USER" in spec:
        uid = await _account_id(spec["USER"], lambda name: pwd.getpwnam(name).pw_uid, "user")
    if "GROUP" in spec:
        gid = await _account_id(spec["GROUP"], lambda name: grp.getgrnam(name).gr_gid, "group")
    if "PERMISSIONS" in spec:
        mode = permissions(spec["PERMISSIONS"])
    return uid, gid, mode


async def _account_id(value: Any, lookup: Callable[[str], int], what: str) -> int:
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return await trio.to_thread.run_sync(lookup, text, abandon_on_cancel=True)
    except KeyError:
        raise err.InvalidArgument(f"no {what} {text!r} on this host") from None


def number(value: Any, what: str, low: float, high: float) -> float:
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise err.InvalidArgument(f"{what} {value!r} is not a number") from None
    if not low <= n <= high:
        raise err.InvalidArgument(f"{what} must be between {low:g} and {high:g}, not {n:g}")
    return n


def permissions(value: Any) -> int:
    """Octal (`0755`, `755`) or OpenNebula's `um- u-- ---` form."""
    text = str(value).strip()
    if text and all(c in "01234567" for c in text) and len(text) <= 4:
        return int(text, 8)
    parts = text.split()
    if len(parts) == 3 and all(len(p) == 3 for p in parts):
        mode = 0
        for i, p in enumerate(parts):
            bits = (4 if p[0] == "u" else 0) | (2 if p[1] == "m" else 0) | (1 if p[2] == "a" else 0)
            if any(c not in "-uma" for c in p):
                break
            mode |= bits << (6 - 3 * i)
        else:
            return mode | 0o111 if mode else mode
    raise err.InvalidArgument(f"PERMISSIONS {value!r} is not octal (0755) or like 'um- u-- ---'")


class Names:
    """uid/gid -> name for views, looked up in a worker thread and remembered."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    async def user(self, uid: int) -> str:
        if uid not in self._users:
            self._users[uid] = await trio.to_thread.run_sync(_name, pwd.getpwuid, uid,
                                                             abandon_on_cancel=True)
        return self._users[uid]

    async def group(self, gid: int) -> str:
        if gid not in self._groups:
            self._groups[gid] = await trio.to_thread.run_sync(_name, grp.getgrgid, gid,
                                                              abandon_on_cancel=True)
        return self._groups[gid]


def _name(lookup: Callable[[int], Any], number: int) -> str:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)
