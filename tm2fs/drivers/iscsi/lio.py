"""`LioTargets`: the kernel's LIO target through rtslib-fb, behind the same `Targets` interface as tgt.

NOT RUN: the development and CI machines have no LIO (see the class); only its refusal is tested.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import trio

from ..threads import in_thread
from .settings import LUN, Settings, round_up


class LioTargets:
    """The kernel's LIO target through rtslib-fb (on the target host itself: no SSH).

    NOT RUN: LIO needs configfs (/sys/kernel/config/target) and the target_core_mod and
    iscsi_target_mod kernel modules, which the development and CI machines do not have. Written
    against rtslib-fb 2.x: one fileio storage object per image (named by its key), one target
    `IQN_PREFIX:KEY` with TPG 1 listening on PORTAL, LUN 1, and either demo-mode access for ALL
    initiators or one NodeACL (with mapped LUN 1) per INITIATORS name. Resize re-creates the
    storage object and the LUN, since fileio reads the size at creation. rtslib calls block
    (configfs writes), so each runs in a worker thread.
    """

    def __init__(self, settings: Settings, limiter: trio.CapacityLimiter) -> None:
        self.s = settings
        self.limiter = limiter
        self._rtslib: Any = None

    def _lib(self) -> Any:
        """rtslib_fb, imported on first use, with a clear OSError if it or configfs is missing."""
        if self._rtslib is None:
            try:
                import rtslib_fb
            except ImportError:
                raise OSError(errno.ENODEV, "iscsi driver: TARGET_MANAGER=lio needs rtslib-fb (Debian's "
                              "python3-rtslib-fb or `pip install rtslib-fb`)") from None
            self._rtslib = rtslib_fb
        if not os.path.isdir("/sys/kernel/config/target"):
            raise OSError(errno.ENODEV, "iscsi driver: TARGET_MANAGER=lio needs the kernel's LIO target: "
                          "configfs is not mounted at /sys/kernel/config or target_core_mod and "
                          "iscsi_target_mod are not loaded (modprobe them), or use TARGET_MANAGER=tgt")
        return self._rtslib

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        def call() -> Any:
            lib = self._lib()
            try:
                return fn(lib, *args)
            except lib.RTSLibError as e:
                raise OSError(errno.EIO, f"iscsi driver: LIO: {e}") from None

        return await in_thread(self.limiter, call)

    def _target(self, lib: Any, key: str) -> Any | None:
        wwn = self.s.iqn(key)
        return next((t for t in lib.RTSRoot().targets if t.wwn == wwn), None)

    def _storage(self, lib: Any, key: str) -> Any | None:
        return next((so for so in lib.RTSRoot().storage_objects
                     if so.plugin == "fileio" and so.name == key), None)

    async def check(self) -> None:
        await self._thread(lambda lib: list(lib.RTSRoot().targets))

    async def luns(self) -> dict[str, str]:
        def _luns(lib: Any) -> dict[str, str]:
            found = {}
            for t in lib.RTSRoot().targets:
                key = self.s.key_of(t.wwn)
                if key is None:
                    continue
                found[key] = ""
                for tpg in t.tpgs:
                    for lun in tpg.luns:
                        if lun.lun == LUN:
                            found[key] = lun.storage_object.udev_path
            return found

        return await self._thread(_luns)

    def _map(self, lib: Any, tpg: Any, lun: Any) -> None:
        """Let INITIATORS in: demo mode for ALL, else a NodeACL each."""
        if not self.s.initiators:
            tpg.set_attribute("generate_node_acls", "1")
            tpg.set_attribute("demo_mode_write_protect", "0")
            tpg.set_attribute("cache_dynamic_acls", "1")
            tpg.set_attribute("authentication", "0")
            return
        self._allow(lib, tpg, lun, self.s.initiators)

    @staticmethod
    def _allow(lib: Any, tpg: Any, lun: Any, initiators: tuple[str, ...]) -> None:
        """A NodeACL with LUN 1 mapped for each initiator name (those already there are kept)."""
        for name in initiators:
            acl = next((a for a in tpg.node_acls if a.node_wwn == name), None) or lib.NodeACL(tpg, name)
            if not any(m.mapped_lun == LUN for m in acl.mapped_luns):
                lib.MappedLUN(acl, LUN, lun)

    async def create_lun(self, key: str, path: str, size: int) -> None:
        def _create(lib: Any) -> None:
            if self._target(lib, key) is not None:
                raise FileExistsError(errno.EEXIST, f"iscsi driver: target {self.s.iqn(key)} exists")
            so = lib.FileIOStorageObject(key, dev=path, size=round_up(size), write_back=False)
            try:
                target = lib.Target(lib.FabricModule("iscsi"), self.s.iqn(key))
                tpg = lib.TPG(target, 1)
                lib.NetworkPortal(tpg, self.s.host, self.s.port)
                lun = lib.LUN(tpg, LUN, so)
                self._map(lib, tpg, lun)
                tpg.enable = True
            except BaseException:
                t = self._target(lib, key)
                if t is not None:
                    t.delete()
                so.delete()
                raise

        await self._thread(_create)

    async def delete_lun(self, key: str) -> None:
        def _delete(lib: Any) -> None:
            target = self._target(lib, key)
            if target is not None:
                target.delete()
            so = self._storage(lib, key)
            if so is not None:
                so.delete()

        await self._thread(_delete)

    async def resize_lun(self, key: str, path: str, size: int) -> None:
        def _resize(lib: Any) -> None:
            target = self._target(lib, key)
            if target is None:
                return
            tpg = next(iter(target.tpgs))
            for lun in list(tpg.luns):
                if lun.lun == LUN:
                    lun.delete()
            so = self._storage(lib, key)
            if so is not None:
                so.delete()
            so = lib.FileIOStorageObject(key, dev=path, size=round_up(size), write_back=False)
            self._map(lib, tpg, lib.LUN(tpg, LUN, so))

        if key not in await self.luns():
            await self.create_lun(key, path, size)
            return
        await self._thread(_resize)

    async def bind(self, key: str, initiators: tuple[str, ...]) -> None:
        def _bind(lib: Any) -> None:
            target = self._target(lib, key)
            if target is None:
                raise FileNotFoundError(errno.ENOENT, f"iscsi driver: no target {self.s.iqn(key)}")
            tpg = next(iter(target.tpgs))
            lun = next(lun for lun in tpg.luns if lun.lun == LUN)
            self._allow(lib, tpg, lun, initiators)

        await self._thread(_bind)

    async def ensure(self, key: str, path: str, size: int) -> bool:
        luns = await self.luns()
        if luns.get(key):
            return False
        if key in luns:
            await self.delete_lun(key)
        await self.create_lun(key, path, size)
        return True
