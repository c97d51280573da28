"""The daemon's background loops (monitor, heartbeat, applying other hosts' changes), all under
one failure policy: a failing step is logged and tried again at the next tick, with the pause
growing up to MAX_BACKOFF while it keeps failing; the same error is logged once, not every tick.
No background failure ends the daemon: the mount and the data path do not depend on them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


async def every(name: str, interval: float, step: Callable[[], Awaitable[None]]) -> None:
    """Run `step` every `interval` seconds for as long as the daemon runs."""
    pause = interval
    last_error = ""
    while True:
        await trio.sleep(pause)
        try:
            await step()
        except Exception as e:
            text = f"{type(e).__name__}: {e}"
            if text != last_error:
                log.error("%s failed: %s (retrying)", name, text, exc_info=not _expected(e))
                last_error = text
            pause = min(MAX_BACKOFF, max(interval, pause * 2))
            continue
        if last_error:
            log.info("%s works again", name)
            last_error = ""
        pause = interval


def _expected(e: Exception) -> bool:
    """Errors that say what is wrong without a traceback (the store or a backend is away)."""
    from .errors import Tm2Error

    return isinstance(e, Tm2Error | OSError)
