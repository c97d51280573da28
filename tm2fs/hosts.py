"""Many hosts on one pool store: each daemon's heartbeat, and hearing the other daemons' changes.

A daemon writes a heartbeat every HEARTBEAT seconds; a host silent for HOST_TIMEOUT is presumed
dead, and only then may its write leases be broken. On PostgreSQL every change is NOTIFYed on one
channel; each daemon LISTENs on a connection of its own, in a thread (psycopg's async API is
asyncio's), and hands each notification to the trio loop, which drops the caches concerned: the
kernel's entries and attributes (pyfuse3 invalidation), open images' sizes, the backend list.
Each notification carries the rows a transaction changed (or, when they do not fit, their ids,
re-read); the receiving daemon applies them to its memory (`core/pool.py`), where row versions
sort out notifications, its own commits and re-reads that arrive in different orders. When
notifications may have been lost (the LISTEN connection dropped, a flood overflowed the queue)
the daemon re-reads everything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any

import trio

from .background import every
from .core import HEARTBEAT, Service

log = logging.getLogger(__name__)


async def heartbeat(service: Service) -> None:
    await every("heartbeat", HEARTBEAT, service.heartbeat)


async def listen(service: Service, conn: Any = None, *,
                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Apply the other hosts' change notifications, for as long as the daemon runs. `conn`: a
    LISTENing connection made before the service read the pool (what was heard since waits in
    it), else one is made here."""
    if not service.store.shared:
        task_status.started()
        return
    inbox = _Inbox()
    token = trio.lowlevel.current_trio_token()
    stop = threading.Event()
    if conn is None:  # here, so a store that cannot LISTEN fails the start
        conn = await trio.to_thread.run_sync(service.store.listen)

    def pump() -> None:
        nonlocal conn
        while not stop.is_set():
            try:
                for note in conn.notifies(timeout=0.5):  # handed over without waiting, in order
                    token.run_sync_soon(inbox.offer, note.payload)
            except trio.RunFinishedError:
                break
            except Exception as e:
                if stop.wait(1.0):
                    break
                log.error("change notifications lost (%s); reconnecting", e)
                try:
                    conn.close()
                    conn = service.store.listen()
                except Exception as again:  # PostgreSQL still away: keep trying
                    log.error("cannot listen for changes yet: %s", again)
                    continue
                # notifications may have been missed meanwhile: re-read everything
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(inbox.offer, EVERYTHING, trio_token=token)
        conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbox.apply, service)
        task_status.started()
        try:
            await trio.to_thread.run_sync(pump, abandon_on_cancel=True)
        finally:
            stop.set()


EVERYTHING = '{"all": true}'
RETRY = 2.0  # seconds before a failed re-read is tried again


class _Inbox:
    """Notifications waiting to be applied. A flood that overflows it is not lost: it turns into
    one full re-read, since memory serves lookups and must not stay behind."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[str](1000)
        self.overflowed = False

    def offer(self, payload: str) -> None:
        try:
            self.send.send_nowait(payload)
        except trio.WouldBlock:
            self.overflowed = True

    async def apply(self, service: Service) -> None:
        while True:
            payloads: list[str] = []
            # after a failure, re-read everything within RETRY even if no other change comes
            with trio.move_on_after(RETRY if self.overflowed else math.inf):
                payloads.append(await self.receive.receive())
            while True:  # what queued up meanwhile
                try:
                    payloads.append(self.receive.receive_nowait())
                except trio.WouldBlock:
                    break
            if not payloads and not self.overflowed:
                continue
            if self.overflowed:
                payloads = [EVERYTHING]
            self.overflowed = False
            try:
                for payload in payloads:  # in commit order: rows carried apply at once
                    await service.remote_change(payload)
            except Exception as e:  # the store is away: a full re-read once it answers
                log.error("applying a change notification failed: %s", e)
                self.overflowed = True
