"""Drivers by name: the built-in ones, plus any registered under the `tm2fs.drivers` entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

from ..errors import InvalidArgument
from .base import Driver

BUILTIN = {
    "dir": "tm2fs.drivers.dir:DirDriver",
    "legacy": "tm2fs.drivers.legacy:LegacyDriver",
    "iscsi": "tm2fs.drivers.iscsi:IscsiDriver",
    "rbd": "tm2fs.drivers.rbd:RbdDriver",
    "memory": "tm2fs.drivers.memory:MemoryDriver",  # for tests and demos
}


def driver_class(tm: str) -> type[Driver]:
    """Resolve a TM name to its driver class; unknown names get the list of known ones."""
    target = BUILTIN.get(tm)
    if target is None:
        for ep in entry_points(group="tm2fs.drivers"):
            if ep.name == tm:
                return ep.load()
        known = sorted(set(BUILTIN) | {ep.name for ep in entry_points(group="tm2fs.drivers")})
        raise InvalidArgument(f"unknown TM {tm!r}", f"known drivers: {', '.join(known)}")
    module, _, cls = target.partition(":")
    return getattr(__import__(module, fromlist=[cls]), cls)
