"""libiscsi's event loop on the trio thread: many SCSI commands in flight on one session.

Why: a session that runs one blocking call at a time in a worker thread serves one request at a
time, so queue depth bought nothing (0.07 of qemu's own `iscsi://` client at QD32), and every
request paid a thread hop. Here a session logs in with libiscsi's blocking calls in a worker
thread (`libiscsi.Session`); from then on its context belongs to the trio thread. Commands are
queued with libiscsi's `*_task` calls and put on the wire at once; a system task waits until the
socket is readable and lets `iscsi_service` read the answers (and, once a second without traffic,
check libiscsi's own timeouts); another waits until it is writable when libiscsi holds more than
the socket took. The completion callback runs inside `iscsi_service`, on the trio thread: it only
records the status; the task is freed and its waiter woken after `iscsi_service` returns.

A command whose caller gave up (a timeout cancelled it) keeps its buffers until libiscsi answers
or cancels it. A TIMEOUT, a cancelled command or a dead socket breaks the session: its commands
fail with EIO or ETIMEDOUT and the handle logs in again on its next call.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

from .libiscsi import (
    COMMAND_CB,
    SENSE_UNIT_ATTENTION,
    STATUS_BUSY,
    STATUS_CANCELLED,
    STATUS_CHECK_CONDITION,
    STATUS_ERROR,
    STATUS_GOOD,
    STATUS_TASK_SET_FULL,
    STATUS_TIMEOUT,
    Session,
    _IoVec,
    errno_for,
)
from .settings import BLOCK, LUN

log = logging.getLogger(__name__)

POLLIN, POLLOUT = 1, 4
TICK = 1.0  # seconds between libiscsi's timeout checks on an idle socket
_BROKEN = (STATUS_CANCELLED, STATUS_ERROR, STATUS_TIMEOUT)


class _Command:
    """One SCSI command in flight: its libiscsi task, who waits, and what libiscsi still reads."""

    __slots__ = ("abandoned", "keep", "status", "task", "waiter")

    def __init__(self, task: Any, keep: object) -> None:
        self.task = task
        self.keep = keep  # buffers libiscsi reads or writes until the command ends
        self.waiter: Any = None  # the trio task sleeping until it ends
        self.status: int | None = None  # set when libiscsi is done with it
        self.abandoned = False  # its caller gave up: nobody frees the task but `_settle`


class Pipeline:
    """One logged-in session driven from the trio thread; `run` a command, many at once."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.lib, self.ctx = session.lib, session.ctx
        self.target = session.target
        self.capacity = 0  # bytes; read_capacity sets it
        self.fd = self.lib.iscsi_get_fd(self.ctx)
        self.commands: dict[int, _Command] = {}
        self.finished: list[tuple[int, int]] = []
        self.next_id = 1
        self.broken = False
        self.closed = False
        self._callback = COMMAND_CB(self._on_complete)  # kept alive as long as the context
        self._wants_write = trio.Event()
        self._scope = trio.CancelScope()
        self._exited = trio.Event()  # the event loop no longer touches the socket
        trio.lowlevel.spawn_system_task(self._serve, name=f"iscsi {self.target}")

    # ------------------------------------------------------------------ the event loop

    def _on_complete(self, _ctx: Any, status: int, _task: Any, private: int | None) -> None:
        """Inside iscsi_service: record only (freeing the task here would pull it from under
        libiscsi)."""
        self.finished.append((private or 0, status))

    def _service(self, revents: int) -> None:
        if self.closed:
            return
        if self.lib.iscsi_service(self.ctx, revents) < 0:
            self._break(f"connection lost ({self.session.error()})")
        self._settle()
        if not self.broken and self.lib.iscsi_which_events(self.ctx) & POLLOUT:
            self._wants_write.set()

    def _settle(self) -> None:
        """Hand finished commands to their waiters; free those nobody waits for any more."""
        while self.finished:
            cid, status = self.finished.pop()
            command = self.commands.pop(cid, None)
            if command is None:
                continue
            if status in _BROKEN:
                self._break("a command timed out" if status == STATUS_TIMEOUT else "connection lost")
            command.status = status
            if command.waiter is not None:
                trio.lowlevel.reschedule(command.waiter, outcome.Value(status))
            elif command.abandoned:
                self.lib.scsi_free_scsi_task(command.task)
            # else: it ended before its caller waited (a broken session); `_wait` sees the status

    def _break(self, why: str) -> None:
        if not self.broken:
            self.broken = self.session.broken = True  # no logout on a dead connection
            log.info("iscsi session to %s broken: %s", self.target, why)
            self._wants_write.set()  # the writer loop ends too
        if self.commands and not self.closed:
            self.lib.iscsi_scsi_cancel_all_tasks(self.ctx)  # their callbacks run now

    async def _serve(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    while not self.broken:
                        with trio.move_on_after(TICK) as tick:
                            await trio.lowlevel.wait_readable(self.fd)
                        self._service(0 if tick.cancelled_caught else POLLIN)
                    nursery.cancel_scope.cancel()
        except Exception:  # a system task must not raise: that would end the daemon
            log.exception("iscsi session to %s: event loop failed", self.target)
            self._break("event loop failed")
            self._settle()
        finally:
            self._exited.set()

    async def _write_loop(self) -> None:
        while not self.broken:
            await self._wants_write.wait()
            self._wants_write = trio.Event()
            if self.broken:
                return
            await trio.lowlevel.wait_writable(self.fd)
            self._service(POLLOUT)

    # ------------------------------------------------------------------ commands

    async def run(self, what: str, start: Callable[[Any, int], Any], keep: object = None) -> Any:
        """Run one SCSI command, retried on UNIT ATTENTION and BUSY; returns its task (GOOD), which
        the caller frees. `start(callback, private)` queues it with a libiscsi *_task call."""
        for _attempt in range(4):
            if self.broken or self.closed:
                raise OSError(errno.EIO, f"iscsi driver: the session to {self.target} is closed")
            cid, self.next_id = self.next_id, self.next_id + 1
            task = start(self._callback, cid)
            if not task:
                message = self.session.error()
                self._break(message)
                self._settle()
                raise OSError(errno_for(message), f"iscsi driver: {what} on {self.target}: {message}")
            command = self.commands[cid] = _Command(task, keep)
            self._service(POLLOUT)  # on the wire now, not on the next loop turn
            status = await self._wait(command)
            if status == STATUS_GOOD:
                return task
            key = task.contents.sense_key
            self.lib.scsi_free_scsi_task(task)
            if status == STATUS_CHECK_CONDITION and key == SENSE_UNIT_ATTENTION:
                continue
            if status in (STATUS_BUSY, STATUS_TASK_SET_FULL):
                continue
            if status == STATUS_TIMEOUT:
                raise OSError(errno.ETIMEDOUT, f"iscsi driver: {what} on {self.target} timed out")
            if status in _BROKEN:
                raise OSError(errno.EIO, f"iscsi driver: {what} on {self.target}: connection lost")
            raise OSError(errno.EIO, f"iscsi driver: {what} on {self.target} failed: "
                          f"{self.session.error()}")
        raise OSError(errno.EIO, f"iscsi driver: {what} on {self.target}: target stays busy")

    async def _wait(self, command: _Command) -> int:
        if command.status is not None:
            await trio.lowlevel.checkpoint()
            return command.status
        command.waiter = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            command.waiter = None
            command.abandoned = True  # the task is freed when libiscsi is done with it
            return trio.lowlevel.Abort.SUCCEEDED

        status: int = await trio.lowlevel.wait_task_rescheduled(abort)
        return status

    async def read(self, lba: int, length: int) -> bytes:
        buf = ctypes.create_string_buffer(length)
        iov = _IoVec(ctypes.addressof(buf), length)
        lib, ctx = self.lib, self.ctx
        task = await self.run("READ(16)", lambda cb, cid: lib.iscsi_read16_iov_task(
            ctx, LUN, lba, length, BLOCK, 0, 0, 0, 0, 0, cb, cid, ctypes.byref(iov), 1),
            keep=(buf, iov))
        lib.scsi_free_scsi_task(task)
        return buf.raw

    async def write(self, lba: int, data: bytes) -> None:
        lib, ctx = self.lib, self.ctx
        task = await self.run("WRITE(16)", lambda cb, cid: lib.iscsi_write16_task(
            ctx, LUN, lba, data, len(data), BLOCK, 0, 0, 0, 0, 0, cb, cid), keep=data)
        lib.scsi_free_scsi_task(task)

    async def sync(self) -> None:
        lib, ctx = self.lib, self.ctx
        task = await self.run("SYNCHRONIZE CACHE(10)", lambda cb, cid: lib.iscsi_synchronizecache10_task(
            ctx, LUN, 0, 0, 0, 0, cb, cid))
        lib.scsi_free_scsi_task(task)

    async def read_capacity(self) -> int:
        lib, ctx = self.lib, self.ctx
        task = await self.run("READ CAPACITY(16)",
                              lambda cb, cid: lib.iscsi_readcapacity16_task(ctx, LUN, cb, cid))
        try:
            data = lib.scsi_datain_unmarshall(task)
            if not data:
                raise OSError(errno.EIO, f"iscsi driver: READ CAPACITY(16) on {self.target}: bad answer")
            if data.contents.block_length != BLOCK:
                raise OSError(errno.EIO, f"iscsi driver: {self.target} has "
                              f"{data.contents.block_length}-byte blocks, not 512")
            self.capacity = ((data.contents.returned_lba + 1) & (2**64 - 1)) * BLOCK
        finally:
            lib.scsi_free_scsi_task(task)
        return self.capacity

    # ------------------------------------------------------------------ the end

    def _stop(self) -> None:
        """Fail what is in flight and stop the event loop; the context is then free for a thread."""
        if self.closed:
            return
        if self.commands:
            self.lib.iscsi_scsi_cancel_all_tasks(self.ctx)
            self._settle()
        self.closed = True
        self._scope.cancel()

    async def aclose(self, limiter: trio.CapacityLimiter) -> None:
        """Log out in a worker thread (a target that is gone cannot answer), once the event loop
        has let go of the socket (the logout closes it)."""
        self._stop()
        with trio.CancelScope(shield=True):
            await self._exited.wait()  # one scheduler turn
        await trio.to_thread.run_sync(self.session.close, limiter=limiter, abandon_on_cancel=True)

    def close(self) -> None:
        """aclose without waiting, from the trio thread: the logout runs in a thread of its own."""
        self._stop()

        async def logout() -> None:
            await self._exited.wait()
            threading.Thread(target=self.session.close, daemon=True).start()

        trio.lowlevel.spawn_system_task(logout, name=f"iscsi logout {self.target}")
