"""The pool store off the trio loop: one worker thread runs every transaction, in order.

The pool store is slow and far away (a commit, a round trip to PostgreSQL); the loop serves the
kernel and must never wait on it. Every transaction is a plain function of a `Tx`, queued to one
thread that owns the store's connection. After a write commits, its `Delta` (the rows it touched,
as they now are) is handed back to the loop with `TrioToken.run_sync_soon`, whose callbacks run in
the order they were sent: the in-memory view changes in commit order, only after the commit, and
before the caller resumes.

A caller waits a bounded time. A job that has not started when the wait ends is withdrawn (nothing
changed, the caller gets `StoreUnavailable`); one already running cannot be taken back: if it
commits later its delta is still applied in order, and the caller was told the outcome is unknown.
On PostgreSQL the change notification (NOTIFY) goes inside the same transaction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
import trio

from . import errors as err
from . import metrics
from .store import Delta, PoolStore, Tx

log = logging.getLogger(__name__)

T = TypeVar("T")
BATCH = 64  # writes that may share one commit
STORE_TIMEOUT = 10.0  # seconds a metadata change waits for the pool store before failing
SYNC_INTERVAL = 1.0  # SQLite: committed changes reach stable storage within this (power loss)
NOTIFY_MAX = 7000  # bytes; PostgreSQL's payload limit is 8000: larger changes say "everything"
OBSERVE_READ = metrics.STORE_SECONDS.labels("read").observe
OBSERVE_WRITE = metrics.STORE_SECONDS.labels("write").observe


@dataclass(eq=False)
class Job(Generic[T]):
    work: Callable[[Tx], T]
    write: bool
    origin: Any = None  # handed to the apply hook with the delta (who made the change)
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    started: bool = False
    withdrawn: bool = False
    unwatched: bool = False  # queued without a waiter, or its waiter gave up: failures are logged
    refresh: bool = False  # a read whose result is a Delta to apply
    delta: Delta | None = None  # what it changed, once committed


class StoreWorker:
    """Runs transactions on one thread; `apply(delta, origin)` is called on the loop after each
    write commits, in commit order."""

    def __init__(self, store: PoolStore, host: str,
                 apply: Callable[[Delta, Any], None] | None = None) -> None:
        self.store = store
        self.host = host
        self.apply = apply
        self.timeout = STORE_TIMEOUT
        self._queue: queue.SimpleQueue[Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # started vs withdrawn
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._unsynced = False
        self._last_sync = time.monotonic()
        self._conn: sa.Connection | None = None
        self.transactions = 0  # for benchmarks and tests: how many this daemon ran
        # Group commit only where this daemon is the one writer (SQLite). On PostgreSQL a batch
        # holds the row locks of all its jobs (backend rows, parent folders) and two hosts'
        # batches would deadlock; the server groups concurrent commits' WAL flushes itself.
        self.batch = 1 if store.shared else BATCH

    def start(self) -> None:
        """On the trio thread: results come back to this loop."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._run, name="tm2fs-store", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Finish the queued jobs, sync, and stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def write(self, work: Callable[[Tx], T], origin: Any = None,
                    timeout: float | None = None) -> T:
        """Run `work(tx)` in a write transaction; its delta is applied before this returns."""
        return await self._submit(Job(work, True, origin), timeout)

    async def read(self, work: Callable[[Tx], T], timeout: float | None = None) -> T:
        return await self._submit(Job(work, False), timeout)

    async def refresh(self, work: Callable[[Tx], Delta], origin: Any = None,
                      timeout: float | None = None) -> None:
        """Re-read rows (another host changed them) and apply them in order with the commits."""
        await self._submit(Job(work, False, origin, refresh=True), timeout)

    async def _submit(self, job: Job[T], timeout: float | None) -> T:
        self._put(job)
        limit = self.timeout if timeout is None else timeout
        try:
            with trio.move_on_after(limit):
                await job.done.wait()
        finally:
            if not job.done.is_set():
                with self._lock:
                    job.withdrawn = not job.started
                    job.unwatched = True
        if not job.done.is_set():
            if job.withdrawn:
                raise err.StoreUnavailable(
                    f"the pool store did not answer within {limit:g}s; nothing was changed",
                    "check the pool store (PostgreSQL) and retry")
            e = err.StoreUnavailable(
                f"the pool store did not answer within {limit:g}s; the change may still be made",
                "look again once the pool store answers")
            e.maybe_done = True  # its transaction is running: cleanup must not assume it failed
            raise e
        if job.error is not None:
            raise job.error
        return job.result

    def _put(self, job: Job[Any]) -> None:
        if self._thread is None:
            raise RuntimeError("store worker not started")
        self._queue.put(job)

    # ------------------------------------------------------------------ the worker thread

    def _run(self) -> None:
        carry: list[Job[Any] | None] = []  # what ended a batch, to run next
        while True:
            if carry:
                job = carry.pop()
            else:
                try:
                    job = self._queue.get(timeout=SYNC_INTERVAL)
                except queue.Empty:
                    self._sync()
                    continue
            if job is None:
                self._sync()
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.close()
                return
            if not self._start(job):
                continue
            batch = [job]
            if job.write:  # group commit: writes queued meanwhile share one commit
                while len(batch) < self.batch:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None or not more.write:
                        carry.append(more)
                        break
                    if self._start(more):
                        batch.append(more)
                self._writes(batch)
            else:
                self._read(job)
            if time.monotonic() - self._last_sync >= SYNC_INTERVAL:
                self._sync()
            try:
                assert self._token is not None
                for done in batch:
                    self._token.run_sync_soon(self._finish, done, done.delta)
            except trio.RunFinishedError:
                return

    def _start(self, job: Job[Any]) -> bool:
        with self._lock:
            if job.withdrawn:
                return False
            job.started = True
            return True

    def _connection(self) -> sa.Connection:
        """The worker's own connection, held across transactions (a pool check-out per
        transaction costs more than the transaction); a broken one is replaced."""
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = self._conn = self.store.engine.connect()
        return conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()
            self._conn = None

    def _read(self, job: Job[Any]) -> None:
        self.transactions += 1
        conn = self._connection()
        conn.execution_options(tm2fs_read=True)  # SQLite: BEGIN, not BEGIN IMMEDIATE
        start = time.perf_counter()
        try:
            with conn.begin():
                job.result = job.work(Tx(conn))
            OBSERVE_READ(time.perf_counter() - start)
            job.delta = job.result if job.refresh else None
        except sa.exc.DBAPIError as e:
            self._drop_connection()
            job.error = e
        except BaseException as e:  # handed to the caller, in the loop
            job.error = e

    def _writes(self, batch: list[Job[Any]], retries: int = 1) -> None:
        """One transaction for the batch, each job in its own savepoint when there are several
        (a job that fails rolls back alone); one NOTIFY naming every row; one commit. If the
        batch as a whole fails (PostgreSQL found a deadlock between two hosts' batches, which
        lock rows in different orders), nothing of it happened: each job runs again alone."""
        failure = self._commit(batch)
        if failure is None:
            self._unsynced = True
            return
        if isinstance(failure, sa.exc.DBAPIError) and not isinstance(failure, sa.exc.IntegrityError):
            if len(batch) > 1:
                for job in batch:
                    job.result = job.delta = job.error = None
                for job in batch:
                    self._writes([job])
                return
            if retries and _transient(failure):
                batch[0].result = batch[0].delta = batch[0].error = None
                self._writes(batch, retries - 1)
                return
        error = _exists(failure) if isinstance(failure, sa.exc.IntegrityError) else failure
        for job in batch:
            job.delta = None
            if job.error is None:
                job.error = error

    def _commit(self, batch: list[Job[Any]]) -> BaseException | None:
        """Run and commit the batch; the failure that undid all of it, if any."""
        self.transactions += 1
        conn = self._connection()
        conn.execution_options(tm2fs_read=False)  # SQLite: BEGIN IMMEDIATE
        changed = Delta()
        start = time.perf_counter()
        try:
            with conn.begin():
                for job in batch:
                    if len(batch) == 1:
                        self._write(conn, job)
                    else:
                        try:
                            with conn.begin_nested():
                                self._write(conn, job)
                        except sa.exc.IntegrityError as e:
                            job.error = _exists(e)
                        except sa.exc.DBAPIError:
                            raise  # the transaction itself is lost: the whole batch fails
                        except Exception as e:
                            job.error = e
                    if job.delta:
                        changed.merge(job.delta)
                if changed and self.store.shared:
                    Tx(conn).notify(self._payload(changed))
            OBSERVE_WRITE(time.perf_counter() - start)
        except BaseException as e:
            if isinstance(e, sa.exc.DBAPIError) and not _transient(e) and not isinstance(
                    e, sa.exc.IntegrityError):
                self._drop_connection()  # perhaps broken (PostgreSQL restarted)
            return e
        return None

    def _payload(self, changed: Delta) -> str:
        """What other hosts hear: the rows themselves if they fit one notification (nothing to
        re-read), else their ids, else "everything". The rows come with their ids, which a
        daemon from before schema v5 re-reads (hosts upgraded one by one keep hearing)."""
        for body in (lambda: {**changed.ids(), **changed.rows()}, changed.ids):
            payload = json.dumps({"h": self.host, **body()}, separators=(",", ":"))
            if len(payload) <= NOTIFY_MAX:
                return payload
        return json.dumps({"h": self.host, "all": True})

    @staticmethod
    def _write(conn: sa.Connection, job: Job[Any]) -> None:
        tx = Tx(conn)
        job.result = job.work(tx)
        job.delta = tx.delta()

    def _sync(self, force: bool = False) -> None:
        if not (self._unsynced or force):
            return
        self._unsynced = False
        self._last_sync = time.monotonic()
        try:
            self.store.sync()
        except Exception as e:  # the next sync tries again; fsync callers hear of it
            self._unsynced = True
            log.error("syncing the pool store failed: %s", e)
            if force:
                raise

    def _finish(self, job: Job[Any], delta: Delta | None) -> None:
        """On the loop, in commit order: memory follows the store, then the caller resumes."""
        if delta and self.apply is not None:
            try:
                self.apply(delta, job.origin)
            except Exception:
                log.exception("applying a committed change to memory failed")
        if job.error is not None and job.unwatched:
            log.error("a pool-store change nobody waited for failed: %s", job.error)
        job.done.set()

    async def sync(self) -> None:
        """fsync(2) of a directory or image: every commit so far reaches stable storage."""
        await self.read(lambda tx: self._sync(force=True))


def _exists(e: BaseException) -> err.Tm2Error:
    """A uniqueness violation: two hosts made the same name at once."""
    out = err.Exists("it exists (made concurrently elsewhere)",
                     "look again: another host made it meanwhile")
    out.__cause__ = e
    return out


def _transient(e: BaseException) -> bool:
    """A deadlock or serialization failure: the same transaction may well pass again."""
    code = getattr(getattr(e, "orig", None), "sqlstate", None)
    return code in ("40P01", "40001")
