"""Blocking driver calls in abandonable worker threads (tm2fs.drivers.threads): a caller that gives
up is not held, and what a call opens for a caller who is gone is closed, not leaked."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from tm2fs.drivers.threads import in_thread, open_in_thread


async def test_a_cancelled_caller_is_not_held_by_a_hung_call() -> None:
    release = threading.Event()
    start = time.monotonic()
    with trio.move_on_after(0.1) as scope:
        await in_thread(trio.CapacityLimiter(1), release.wait, 30)
    assert scope.cancelled_caught and time.monotonic() - start < 5
    release.set()


async def test_a_thing_made_in_time_is_the_callers_and_stays_open() -> None:
    closed: list[str] = []
    thing = await open_in_thread(trio.CapacityLimiter(1), lambda: "conn", closed.append)
    assert thing == "conn"
    await trio.sleep(0.1)
    assert closed == []


async def test_a_thing_made_after_the_caller_gave_up_is_closed_once() -> None:
    release = threading.Event()
    closed: list[str] = []
    done = threading.Event()

    def make() -> str:
        release.wait(30)
        return "conn"

    def close(thing: str) -> None:
        closed.append(thing)
        done.set()

    with trio.move_on_after(0.1) as scope:
        await open_in_thread(trio.CapacityLimiter(1), make, close)
    assert scope.cancelled_caught and closed == []
    release.set()  # the hung call finishes late: nobody takes what it made
    assert await trio.to_thread.run_sync(done.wait, 10)
    await trio.sleep(0.1)
    assert closed == ["conn"]


async def test_a_caller_that_gives_up_waiting_for_the_limiter_makes_nothing() -> None:
    limiter = trio.CapacityLimiter(1)
    made: list[int] = []
    async with limiter:  # every thread of the backend is busy
        with trio.move_on_after(0.1) as scope:
            await open_in_thread(limiter, lambda: made.append(1), print)
    assert scope.cancelled_caught
    await trio.sleep(0.1)
    assert made == []


async def test_a_failure_to_make_reaches_the_caller_and_closes_nothing() -> None:
    closed: list[object] = []

    def make() -> object:
        raise OSError(110, "no monitor answered")

    with pytest.raises(OSError, match="no monitor answered"):
        await open_in_thread(trio.CapacityLimiter(1), make, closed.append)
    assert closed == []
