"""The monitor loop: every backend's capacity and state, refreshed under each backend's timeout.

A full pass runs every `interval` seconds; backends whose usage just changed (`service.stale`) are
re-read within a second, so FREE and USED follow what users just did. The loop is also what brings
a backend back from ERROR, and what measures images' allocation again (core/allocation.py).
"""

from __future__ import annotations

import contextlib
import logging

import trio

from .background import every
from .core import Service
from .errors import NotFound

log = logging.getLogger(__name__)


async def run(service: Service, interval: float = 30.0, prompt: float = 1.0) -> None:
    next_full = trio.current_time()

    async def step() -> None:
        nonlocal next_full
        now = trio.current_time()
        if now >= next_full:
            service.stale = set()
            next_full = now + interval
            await service.monitor_all()
        elif service.stale:
            stale, service.stale = service.stale, set()
            async with trio.open_nursery() as nursery:
                for backend_id in stale:
                    nursery.start_soon(_one, service, backend_id, True)
        await service.measure_allocation()

    await every("monitor", prompt, step)


async def _one(service: Service, backend_id: int, prompt: bool) -> None:
    with contextlib.suppress(NotFound):  # deleted meanwhile
        await service.monitor_backend(backend_id, prompt)
