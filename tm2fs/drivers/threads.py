"""Blocking driver calls in worker threads that a timeout can abandon.

Network storage can hang (a dead Ceph cluster, a target host gone); such a call must not stall
the trio thread, and a cancelled caller must not wait for it. Each backend runs its calls under a
limiter of its own, so its hung threads cannot starve the other backends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


async def in_thread(limiter: trio.CapacityLimiter, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread; a cancelled caller abandons it (the thread runs on)."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=limiter)


async def open_in_thread(limiter: trio.CapacityLimiter, make: Callable[[], T],
                         close: Callable[[T], object]) -> T:
    """`make()` in an abandonable worker thread, for a thing that must be closed (a connection, an
    open image, a session): if the caller gives up meanwhile, what `make` still returns is closed,
    in a thread of its own, instead of leaking."""
    lock = threading.Lock()
    abandoned = False
    made: list[T] = []

    def work() -> T:
        thing = make()
        with lock:
            if not abandoned:
                made.append(thing)
                return thing
        threading.Thread(target=close, args=(thing,), daemon=True).start()
        return thing  # to nobody: the caller is gone

    try:
        return await in_thread(limiter, work)
    except trio.Cancelled:
        with lock:
            abandoned = True
        for thing in made:  # made, but cancelled before the caller had it
            threading.Thread(target=close, args=(thing,), daemon=True).start()
        raise
