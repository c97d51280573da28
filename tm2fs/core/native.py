"""Native sources: how a hypervisor reaches an image with no tm2fs in its data path, in the forms
a deployment uses (JSON, a qemu `-blockdev` argument, a libvirt `<disk>` element).

Why: the mount serves management, copies and scripts; a running VM should not send every 4 KiB
request through one Python loop. Drivers say where an image really is (`Driver.source`); tm2fs
keeps only the bookkeeping (attachments, write leases, NBVM). The rules (who may ask, which
backends) are in `actions.py`; this module only renders. The XML is built with xml.etree, so no
value (a path, a pool or image name) can break out of its attribute.

Ceph monitors: librados takes `host:port` as msgr1 unless the port is 3300 (or none: both), so a
monitor known only by a msgr2 address on another port cannot be written as `<host>` or qemu
`server`; then no monitor is written and the cluster's config file (`conf`, which names them all)
is what qemu reads. The keyring is not put in the element: libvirt reads cephx keys from a libvirt
secret, here the one of usage `ceph client.ID` (define it from the backend's KEYRING); qemu reads
it from `conf` (its `keyring` setting). Without a KEYRING the element has no `<auth>`, and
libvirt then tells qemu to connect without cephx (auth none).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import Any

from .. import errors as err

FORMATS = ("json", "qemu", "libvirt")
XATTR = "user.tm2fs.source"  # the same JSON, on the mount
DEV_RE = re.compile(r"(?:vd|sd|hd|xvd)[a-z]{1,3}")


def _servers(source: dict[str, Any], need_port: bool) -> list[tuple[str, int | None]]:
    """The monitors as plain host[:port] a client can pass on, or none (see the docstring)."""
    out: list[tuple[str, int | None]] = []
    for m in source.get("monitors") or []:
        port, protocol = m.get("port"), m.get("protocol")
        if protocol == "v2" and port in (None, 3300):
            port = 3300
        elif protocol == "v2" or (protocol == "v1" and port == 3300):
            return []  # librados would take host:port for the other protocol
        if port is None and need_port:
            port = 6789 if protocol == "v1" else 3300
        out.append((m["host"], port))
    return out


def _rbd_name(source: dict[str, Any]) -> str:
    parts = [source["pool"], source.get("namespace") or "", source["image"]]
    return "/".join(p for p in parts if p)


def qemu_blockdev(source: dict[str, Any], node: str) -> dict[str, Any]:
    """A `-blockdev` (QAPI BlockdevOptions) of a raw image over the native protocol."""
    kind = source["type"]
    if kind == "file":
        proto: dict[str, Any] = {"driver": "file", "filename": source["path"]}
    elif kind == "rbd":
        proto = {"driver": "rbd", "pool": source["pool"], "image": source["image"],
                 "user": source["client_id"], "conf": source["conf"]}
        if source.get("namespace"):
            proto["namespace"] = source["namespace"]
        servers = _servers(source, need_port=True)
        if servers:
            proto["server"] = [{"host": h, "port": str(p)} for h, p in servers]
    elif kind == "iscsi":
        proto = {"driver": "iscsi", "transport": "tcp", "portal": source["portal"],
                 "target": source["iqn"], "lun": source["lun"],
                 "initiator-name": source["initiator"]}
    else:
        raise ValueError(f"unknown source type {kind!r}")
    return {"driver": "raw", "node-name": node, "file": proto}


def libvirt_disk(source: dict[str, Any], dev: str = "vda", bus: str = "virtio") -> str:
    """A libvirt domain's `<disk>` element for the image (raw, over its native protocol)."""
    kind = source["type"]
    disk = ET.Element("disk", type="file" if kind == "file" else "network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    if kind == "file":
        ET.SubElement(disk, "source", file=source["path"])
    elif kind == "rbd":
        src = ET.SubElement(disk, "source", protocol="rbd", name=_rbd_name(source))
        for host, port in _servers(source, need_port=False):
            ET.SubElement(src, "host", {"name": host} | ({"port": str(port)} if port else {}))
        if source.get("keyring"):
            auth = ET.SubElement(src, "auth", username=source["client_id"])
            ET.SubElement(auth, "secret", type="ceph", usage=f"ceph client.{source['client_id']}")
        ET.SubElement(src, "config", file=source["conf"])
    elif kind == "iscsi":
        src = ET.SubElement(disk, "source", protocol="iscsi", name=f"{source['iqn']}/{source['lun']}")
        ET.SubElement(src, "host", name=source["host"], port=str(source["port"]))
        ET.SubElement(ET.SubElement(src, "initiator"), "iqn", name=source["initiator"])
    else:
        raise ValueError(f"unknown source type {kind!r}")
    ET.SubElement(disk, "target", dev=dev, bus=bus)
    ET.indent(disk)
    return ET.tostring(disk, encoding="unicode") + "\n"


def forms(source: dict[str, Any], image_id: int, dev: str = "vda") -> dict[str, Any]:
    """Every form at once: the API answers with all, the CLI prints the one asked for."""
    if not DEV_RE.fullmatch(dev):
        raise err.InvalidArgument(f"disk target {dev!r} is not a guest disk name", "e.g. vda, sdb")
    return {"SOURCE": source,
            "QEMU": json.dumps(qemu_blockdev(source, f"tm2fs-{image_id}"), separators=(",", ":")),
            "LIBVIRT": libvirt_disk(source, dev)}


def xattr_value(source: dict[str, Any]) -> bytes:
    return json.dumps(source, sort_keys=True, separators=(",", ":")).encode()
