"""Many hosts on one pool store: each daemon's heartbeat, and hearing the other daemons' changes.

A daemon writes a heartbeat every HEARTBEAT seconds; a host silent for HOST_TIMEOUT is presumed
dead, and only then may its write leases be broken. On PostgreSQL every change is NOTIFYed on one
channel; each daemon LISTENs on a connection of its own, in a thread (psycopg's async API is
asyncio's), and hands each notification to the trio loop, which drops the caches concerned: the
kernel's entries and attributes (pyfuse3 invalidation), open images' sizes, the backend list.
The kernel's caches expire after fs.CACHE_TIMEOUT (1 s) anyway, so a notification lost (say
while PostgreSQL restarts) delays a change by at most that.
"""

from __future__ import annotations

import logging
import threading

import trio

from .service import HEARTBEAT, Service

log = logging.getLogger(__name__)


async def heartbeat(service: Service) -> None:
    while True:
        await trio.sleep(HEARTBEAT)
        try:
            service.heartbeat()
        except Exception as e:  # the store is away: the next beat tries again
            log.error("heartbeat failed: %s", e)


async def listen(service: Service, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                 ) -> None:
    """Apply the other hosts' change notifications, for as long as the daemon runs."""
    if not service.store.shared:
        task_status.started()
        return
    send, receive = trio.open_memory_channel[str](1000)
    token = trio.lowlevel.current_trio_token()
    stop = threading.Event()
    conn = service.store.listen()  # here, so a store that cannot LISTEN fails the start

    def pump() -> None:
        nonlocal conn
        while not stop.is_set():
            try:
                for note in conn.notifies(timeout=0.5):
                    trio.from_thread.run_sync(_offer, send, note.payload, trio_token=token)
            except trio.RunFinishedError:
                break
            except Exception as e:
                log.error("change notifications lost (%s); reconnecting", e)
                stop.wait(1.0)
                try:
                    conn.close()
                    conn = service.store.listen()
                except Exception as again:  # PostgreSQL still away: keep trying
                    log.error("cannot listen for changes yet: %s", again)
        conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_apply, service, receive)
        task_status.started()
        try:
            await trio.to_thread.run_sync(pump, abandon_on_cancel=True)
        finally:
            stop.set()


def _offer(send: trio.MemorySendChannel[str], payload: str) -> None:
    try:
        send.send_nowait(payload)
    except trio.WouldBlock:  # a flood: dropped; the 1 s cache timeouts still bound the delay
        log.debug("change notification queue full; dropped one")


async def _apply(service: Service, receive: trio.MemoryReceiveChannel[str]) -> None:
    async for payload in receive:
        try:
            service.remote_change(payload)
        except Exception:
            log.exception("applying a change notification failed")
