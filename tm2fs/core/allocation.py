"""What each image really holds on its backend (st_blocks), kept in memory and measured off the
data path, so `du` is right and `cp --sparse=always` and `qemu-img convert` keep holes.

getattr answers from `Pool.allocated` and never calls a driver. A figure is measured again (the
driver's `allocated`, in its worker threads, under the backend's timeout):
- at close(2) after writes, awaited: `du` right after a copy is right;
- about a second after writes to an image held open (not at fsync: a guest's flushes must not
  wait for it), and after the last close of a writable open (a staging driver pushes its copy
  back only then): the monitor's tick;
- when the pool tells the kernel an image changed (another host, the API, a resize): forgotten,
  then measured after its next lookup or getattr here (hosts that never look cost nothing);
- for an image not measured on this host yet, after its first lookup or getattr: queued. Until
  then st_blocks says the size: an unmeasured thin image looks full, never emptier than it is;
- a slice of every image per full monitor pass, for writes that bypass the mount (a VM attached
  to the native device).
A failed measurement is logged and keeps the old figure: st_blocks is a hint, not a backend fault.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..errors import Tm2Error
from .backends import Backends
from .pool import Pool

if TYPE_CHECKING:
    from .openfiles import OpenImage

log = logging.getLogger(__name__)

CONCURRENCY = 8  # measurements in flight per tick: the drivers' own limiters bound them too
SWEEP = 1000  # images measured again per full monitor pass


class Allocation:
    def __init__(self, pool: Pool, backends: Backends) -> None:
        self.pool = pool
        self.backends = backends
        self._swept = 0  # the last image id the sweep measured
        pool.listeners.append(self._changed)

    def _changed(self, ino: int | None, parent: int | None, name: str | None) -> None:
        """Forgotten, not queued: the next lookup or getattr here queues it. Every host hears
        every change, and most never look at most images."""
        n = self.pool.nodes.get(ino) if ino is not None else None
        if n is not None and n.image_id is not None:
            self.pool.allocated.pop(n.image_id, None)

    async def after_writes(self, oi: OpenImage) -> None:
        """close(2): the image measured now if it was written since last measured."""
        if oi.unmeasured:
            oi.unmeasured = False
            await self.measure(oi.image_id)

    async def measure(self, image_id: int) -> None:
        im = self.pool.images.get(image_id)
        b = self.backends.by_id.get(im.backend_id) if im is not None else None
        if im is None or b is None or b.state not in ("READY", "DISABLED"):
            return
        rt = self.backends.runtimes.get(b.id)
        if rt is None or not rt.started:
            return  # the driver is not connected (yet): the next getattr asks again
        try:
            with trio.fail_after(b.timeout):
                figure = await rt.driver.allocated(im.key)
        except (trio.TooSlowError, OSError, Tm2Error) as e:
            log.info("backend %s: measuring image %d failed: %s", b.name, image_id, e)
            return
        if image_id in self.pool.images:  # not deleted meanwhile
            self.pool.allocated[image_id] = figure  # None: the driver cannot say

    def sweep(self) -> None:
        """A full monitor pass: the next slice of every image measured again."""
        ids = sorted(i for i in self.pool.allocated if i > self._swept)[:SWEEP]
        self._swept = ids[-1] if len(ids) == SWEEP else 0
        self.pool.unmeasured.update(ids)

    async def refresh(self) -> None:
        """The monitor's tick: open images written since last measured, and every queued one."""
        for oi in self.pool.open.values():
            if oi.unmeasured:
                oi.unmeasured = False
                self.pool.unmeasured.add(oi.image_id)
        if not self.pool.unmeasured:
            return
        ids, self.pool.unmeasured = self.pool.unmeasured, set()
        limiter = trio.CapacityLimiter(CONCURRENCY)

        async def one(image_id: int) -> None:
            async with limiter:
                await self.measure(image_id)

        async with trio.open_nursery() as nursery:
            for image_id in ids:
                nursery.start_soon(one, image_id)
