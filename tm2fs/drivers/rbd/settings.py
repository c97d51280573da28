"""TM_RAW of an rbd backend, checked, and the librados connection it describes.

`check` is what `RbdDriver.validate` does: static checks only, no cluster contact (`connect`
makes that, at `start()`, and the service turns its failure into "not reachable"). `connect`
opens the cluster with every librados wait bounded by CONNECT_TIMEOUT (librados waits forever by
default) and checks that the pool, and the namespace if one is set, exist.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidArgument
from .ceph import call, os_error, rados, rbd

KNOWN = {"CEPH_CONF", "CLIENT_ID", "KEYRING", "POOL", "NAMESPACE", "MAX_CLONE_DEPTH", "CONNECT_TIMEOUT"}
DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_CLIENT = "admin"
DEFAULT_DEPTH = 8
DEFAULT_TIMEOUT = 10.0
NAME_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}")
HINT = ("the rbd driver takes POOL=name and optionally CEPH_CONF=/etc/ceph/ceph.conf, CLIENT_ID=admin, "
        "KEYRING=/path, NAMESPACE=name, MAX_CLONE_DEPTH=8, CONNECT_TIMEOUT=10 (seconds)")


@dataclass(frozen=True)
class Settings:
    """TM_RAW of a backend, as the driver uses it."""

    conf_file: str
    client_id: str  # without `client.`
    keyring: str | None
    pool: str
    namespace: str  # "" for the pool's default namespace
    max_depth: int  # clones whose parent chain would be longer are flattened
    timeout: float

    @classmethod
    def parse(cls, tm_raw: dict[str, Any]) -> Settings:
        """TM_RAW that `check` accepted (what it refuses is not looked at again here)."""
        raw = {k.upper(): v for k, v in tm_raw.items()}
        return cls(
            conf_file=str(raw.get("CEPH_CONF") or DEFAULT_CONF),
            client_id=str(raw.get("CLIENT_ID") or DEFAULT_CLIENT).removeprefix("client."),
            keyring=str(raw["KEYRING"]) if raw.get("KEYRING") else None,
            pool=str(raw["POOL"]),
            namespace=str(raw.get("NAMESPACE") or ""),
            max_depth=int(raw.get("MAX_CLONE_DEPTH", DEFAULT_DEPTH)),
            timeout=float(raw.get("CONNECT_TIMEOUT", DEFAULT_TIMEOUT)),
        )

    def rados_conf(self) -> dict[str, str]:
        """Every op against a dead OSD or monitor fails with ETIMEDOUT after `timeout`; a
        restarted OSD is found again by the next op (objecter_timeout and its tick well below)."""
        t = f"{self.timeout:g}"
        lag = f"{min(1.0, self.timeout / 3):g}"
        conf = {"rados_osd_op_timeout": t, "rados_mon_op_timeout": t, "client_mount_timeout": t,
                "objecter_timeout": lag, "objecter_tick_interval": lag}
        if self.keyring:
            conf["keyring"] = self.keyring
        return conf


def check(tm_raw: dict[str, Any]) -> dict[str, Any]:
    """TM_RAW checked and normalised (upper-case names, defaults filled in, strings)."""
    if rados is None or rbd is None:
        raise InvalidArgument("rbd driver: the Ceph Python bindings are not installed",
                              "apt-get install python3-rados python3-rbd (the virtual env needs "
                              "--system-site-packages)")
    raw = {k.upper(): v for k, v in tm_raw.items()}
    unknown = set(raw) - KNOWN
    if unknown:
        raise InvalidArgument(f"rbd driver: unknown TM_RAW attribute(s) {', '.join(sorted(unknown))}",
                              HINT)
    pool = str(raw.get("POOL") or "")
    if not pool:
        raise InvalidArgument("rbd driver: POOL is missing from TM_RAW", HINT)
    if not NAME_RE.fullmatch(pool):
        raise InvalidArgument(f"rbd driver: POOL {pool!r} is not a plain pool name", HINT)
    out: dict[str, Any] = {"POOL": pool}
    conf = str(raw.get("CEPH_CONF") or DEFAULT_CONF)
    if not os.path.isabs(conf) or "\0" in conf:
        raise InvalidArgument(f"rbd driver: CEPH_CONF {conf!r} is not an absolute path", HINT)
    if not os.path.isfile(conf) or not os.access(conf, os.R_OK):
        raise InvalidArgument(f"rbd driver: cannot read CEPH_CONF {conf!r}",
                              "copy the cluster's ceph.conf (mon_host at least) to this host")
    out["CEPH_CONF"] = conf
    client = str(raw.get("CLIENT_ID") or DEFAULT_CLIENT).removeprefix("client.")
    if not NAME_RE.fullmatch(client):
        raise InvalidArgument(f"rbd driver: CLIENT_ID {client!r} is not a plain Ceph user name",
                              "e.g. CLIENT_ID=admin or CLIENT_ID=tm2fs (for client.tm2fs)")
    out["CLIENT_ID"] = client
    if raw.get("KEYRING"):
        keyring = str(raw["KEYRING"])
        if not os.path.isabs(keyring) or not os.path.isfile(keyring) or not os.access(keyring, os.R_OK):
            raise InvalidArgument(f"rbd driver: cannot read KEYRING {keyring!r}",
                                  f"e.g. /etc/ceph/ceph.client.{client}.keyring")
        out["KEYRING"] = keyring
    if raw.get("NAMESPACE"):
        namespace = str(raw["NAMESPACE"])
        if not NAME_RE.fullmatch(namespace):
            raise InvalidArgument(f"rbd driver: NAMESPACE {namespace!r} is not a plain name", HINT)
        out["NAMESPACE"] = namespace
    depth = str(raw.get("MAX_CLONE_DEPTH", DEFAULT_DEPTH)).strip()
    if not depth.isdigit() or int(depth) > 1000:
        raise InvalidArgument(f"rbd driver: MAX_CLONE_DEPTH {depth!r} is not a whole number 0-1000",
                              "clones deeper than this are flattened; 0 flattens every clone")
    out["MAX_CLONE_DEPTH"] = str(int(depth))
    timeout = str(raw.get("CONNECT_TIMEOUT", DEFAULT_TIMEOUT))
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 600:
        raise InvalidArgument(f"rbd driver: CONNECT_TIMEOUT {timeout!r} is not a number of seconds "
                              "in (0, 600]", HINT)
    out["CONNECT_TIMEOUT"] = f"{seconds:g}"
    return out


MON_RE = re.compile(r"(?:(v[12]):)?(\[[0-9A-Fa-f:.]+\]|[^\s,;\[\]/:]+)(?::(\d{1,5}))?(?:/\d+)?")


def monitors(mon_host: str) -> list[dict[str, Any]]:
    """`mon_host` as librados has it (`[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0],10.0.0.2`, names
    or addresses) as one entry per monitor host, its first address: host, port (None: librados's
    defaults), protocol (v1, v2, or None: librados decides from the port)."""
    out: dict[str, dict[str, Any]] = {}
    for m in MON_RE.finditer(mon_host):
        host = m.group(2).strip("[]")
        out.setdefault(host, {"host": host, "port": int(m.group(3)) if m.group(3) else None,
                              "protocol": m.group(1)})
    return list(out.values())


def connect(s: Settings) -> tuple[Any, Any]:
    """(cluster, ioctx) of the backend's pool and namespace; blocks up to about `s.timeout`.
    A failure is an OSError saying what is missing or refused, and how to fix it."""
    where = f"the Ceph cluster of {s.conf_file}"
    try:
        cluster = rados.Rados(conffile=s.conf_file, rados_id=s.client_id, conf=s.rados_conf())
    except rados.Error as e:
        raise OSError(errno.EINVAL, f"cannot use {s.conf_file}: {e}") from None
    try:
        try:
            cluster.connect(timeout=max(1, round(s.timeout)))
        except (rados.TimedOut, rados.InterruptedOrTimeoutError):
            raise OSError(errno.ETIMEDOUT, f"no monitor of {where} answered within {s.timeout:g}s "
                          "(check mon_host there)") from None
        except (rados.PermissionError, rados.PermissionDeniedError) as e:
            raise OSError(errno.EACCES, f"{where} refused client.{s.client_id}: {e} "
                          "(check CLIENT_ID and KEYRING)") from None
        except rados.Error as e:
            raise os_error(e, f"cannot connect to {where} as client.{s.client_id}") from None
        if not call("list pools", cluster.pool_exists, s.pool):
            raise OSError(errno.ENOENT, f"pool {s.pool!r} does not exist in {where} "
                          f"(ceph osd pool create {s.pool}; rbd pool init {s.pool})")
        ioctx = call(f"open pool {s.pool}", cluster.open_ioctx, s.pool)
        try:
            if s.namespace:
                if not call("list namespaces", rbd.RBD().namespace_exists, ioctx, s.namespace):
                    raise OSError(errno.ENOENT, f"namespace {s.namespace!r} does not exist in pool "
                                  f"{s.pool!r} (rbd namespace create {s.pool}/{s.namespace})")
                ioctx.set_namespace(s.namespace)
        except BaseException:
            ioctx.close()
            raise
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, ioctx
