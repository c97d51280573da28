"""The monitor loop: every backend's capacity and state, refreshed under each backend's timeout.

A full pass runs every `interval` seconds; backends whose usage just changed (`service.stale`) are
re-read within a second, so FREE and USED follow what users just did. The loop is also what brings
a backend back from ERROR.
"""

from __future__ import annotations

import logging

import trio

from .errors import NotFound
from .service import Service

log = logging.getLogger(__name__)


async def run(service: Service, interval: float = 30.0, prompt: float = 1.0) -> None:
    next_full = trio.current_time()
    while True:
        now = trio.current_time()
        if now >= next_full:
            service.stale.clear()
            await service.monitor_all()
            next_full = now + interval
        elif service.stale:
            stale, service.stale = service.stale, set()
            async with trio.open_nursery() as nursery:
                for backend_id in stale:
                    nursery.start_soon(_quiet_monitor, service, backend_id)
        await trio.sleep(prompt)


async def _quiet_monitor(service: Service, backend_id: int) -> None:
    try:
        await service.monitor_backend(backend_id)
    except NotFound:
        pass  # deleted meanwhile
    except Exception:  # a deleted backend, a driver bug: the next pass tries again
        log.exception("monitoring backend %d failed", backend_id)
