"""`TgtTargets`: Linux's userspace target tgtd, driven with `tgtadm -C N --lld iscsi` (here or over ssh).

tgtd reads a LUN's size only when the LUN is added and `--op update` does not refresh it, so a
resize deletes the logical unit and adds it again (open sessions keep working and READ CAPACITY
answers the new size). tgtd keeps its configuration in memory: a restart loses every target.
"""

from __future__ import annotations

import contextlib
import errno
import re
from dataclasses import dataclass, field

import trio

from .runner import CommandError, Runner
from .settings import LUN, Settings


@dataclass
class TgtTarget:
    tid: int
    name: str
    luns: dict[int, str] = field(default_factory=dict)
    acl: list[str] = field(default_factory=list)
    nexus: int = 0


def parse_tgt_show(text: str) -> list[TgtTarget]:
    """Parse `tgtadm --mode target --op show`."""
    targets: list[TgtTarget] = []
    current: TgtTarget | None = None
    section = ""
    lun: int | None = None
    for line in text.splitlines():
        m = re.match(r"Target (\d+): (\S+)\s*$", line)
        if m:
            current = TgtTarget(int(m.group(1)), m.group(2))
            targets.append(current)
            section, lun = "", None
            continue
        if current is None:
            continue
        s = line.strip()
        if s.endswith("information:"):
            section = s
        elif section == "LUN information:":
            if s.startswith("LUN: "):
                lun = int(s[5:])
                current.luns[lun] = ""
            elif s.startswith("Backing store path: ") and lun is not None:
                path = s[len("Backing store path: "):]
                current.luns[lun] = "" if path == "None" else path
        elif section == "I_T nexus information:" and s.startswith("I_T nexus: "):
            current.nexus += 1
        elif section == "ACL information:" and s:
            current.acl.append(s)
    return targets


class TgtTargets:
    """Linux's userspace target tgtd, through `tgtadm -C N --lld iscsi` (locally or over ssh)."""

    def __init__(self, settings: Settings, runner: Runner) -> None:
        self.s = settings
        self.runner = runner
        self.lock = trio.Lock()  # target ids are picked from a listing: one create at a time

    async def tgtadm(self, *args: str) -> str:
        return await self.runner.run(["tgtadm", "-C", str(self.s.control), *args])

    async def _iscsi(self, mode: str, op: str, *args: str) -> str:
        """`tgtadm --lld iscsi --mode MODE --op OP ARGS...`."""
        return await self.tgtadm("--lld", "iscsi", "--mode", mode, "--op", op, *args)

    async def targets(self) -> list[TgtTarget]:
        return parse_tgt_show(await self._iscsi("target", "show"))

    async def _find(self, key: str) -> TgtTarget | None:
        name = self.s.iqn(key)
        return next((t for t in await self.targets() if t.name == name), None)

    async def check(self) -> None:
        text = await self.tgtadm("--mode", "sys", "--op", "show")
        if not re.search(r"^\s*iscsi: ready", text, re.M):
            raise OSError(errno.EIO,
                          f"iscsi driver: tgtd (control {self.s.control}) has no iSCSI driver ready")

    async def luns(self) -> dict[str, str]:
        return {key: t.luns.get(LUN, "") for t in await self.targets()
                if (key := self.s.key_of(t.name)) is not None}

    async def _add_lun(self, tid: int, path: str) -> None:
        await self._iscsi("logicalunit", "new", "--tid", str(tid), "--lun", str(LUN), "--backing-store", path,
                          "--bstype", "rdwr")

    async def create_lun(self, key: str, path: str, size: int) -> None:
        name = self.s.iqn(key)
        async with self.lock:
            for _attempt in range(5):
                targets = await self.targets()
                if any(t.name == name for t in targets):
                    raise FileExistsError(errno.EEXIST, f"iscsi driver: target {name} exists")
                tid = max((t.tid for t in targets), default=0) + 1
                try:
                    await self._iscsi("target", "new", "--tid", str(tid), "--targetname", name)
                    break
                except CommandError as e:
                    if "already exists" not in e.stderr:
                        raise
                    # another manager of this tgtd took the id (or the name) meanwhile: look again
            else:
                raise OSError(errno.EIO, f"iscsi driver: no free target id for {name}")
            try:
                await self._add_lun(tid, path)
                await self._bind(tid, self.s.initiators)
            except BaseException:
                with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await self._delete_tid(tid)
                raise

    async def _delete_tid(self, tid: int) -> None:
        try:
            await self._iscsi("target", "delete", "--force", "--tid", str(tid))
        except CommandError as e:
            if "can't find the target" not in e.stderr:
                raise

    async def delete_lun(self, key: str) -> None:
        async with self.lock:
            target = await self._find(key)
            if target is not None:
                await self._delete_tid(target.tid)

    async def resize_lun(self, key: str, path: str, size: int) -> None:
        """tgtd reads a LUN's size when the LUN is added (`--op update` does not refresh it): the
        logical unit is deleted and added again; sessions on the target stay logged in."""
        async with self.lock:
            target = await self._find(key)
            if target is not None:
                if LUN in target.luns:
                    await self._iscsi("logicalunit", "delete", "--tid", str(target.tid), "--lun", str(LUN))
                await self._add_lun(target.tid, path)
                return
        await self.create_lun(key, path, size)

    async def _bind(self, tid: int, initiators: tuple[str, ...]) -> None:
        if not initiators:
            await self._iscsi("target", "bind", "--tid", str(tid), "--initiator-address", "ALL")
        for name in initiators:
            await self._iscsi("target", "bind", "--tid", str(tid), "--initiator-name", name)

    async def bind(self, key: str, initiators: tuple[str, ...]) -> None:
        target = await self._find(key)
        if target is None:
            raise FileNotFoundError(errno.ENOENT, f"iscsi driver: no target {self.s.iqn(key)}")
        if not initiators:
            if "ALL" not in target.acl:
                await self._bind(target.tid, ())
            return
        missing = tuple(n for n in initiators if n not in target.acl)
        if missing:
            await self._bind(target.tid, missing)

    async def ensure(self, key: str, path: str, size: int) -> bool:
        target = await self._find(key)
        if target is None:
            try:
                await self.create_lun(key, path, size)
            except FileExistsError:  # made meanwhile (by start() or another host): check it below
                target = await self._find(key)
                if target is None:
                    raise
            else:
                return True
        have = target.luns.get(LUN)
        if have == path:
            return False
        if have:
            raise FileExistsError(errno.EEXIST,
                                  f"iscsi driver: target {target.name} serves {have}, not {path}")
        async with self.lock:
            await self._add_lun(target.tid, path)
        return True
