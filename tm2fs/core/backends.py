"""Backends at run time: their drivers, their state machine, and every driver call's rules.

States: INIT (not yet checked), READY, DISABLED (read-only), ERROR (its files answer EIO), and
REMOTE here for a host-local backend of another host. Every driver call runs under the backend's
TIMEOUT; a timeout or an I/O fault turns the backend ERROR on this host (and for the pool unless
another live host still reaches it). The only way out of ERROR is a monitor pass that succeeds.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .. import errors as err
from .. import metrics
from ..drivers import driver_class
from ..drivers.base import Capacity, Driver
from ..model import Backend
from ..store import Tx
from .pool import Pool

log = logging.getLogger(__name__)

HOST_TIMEOUT = 10.0  # a host silent this long is presumed dead
VIEW_FRESH = 90.0  # seconds a host's monitor view of a backend counts (3 default monitor passes)
# errnos that mean the backend itself is in trouble (not the request)
MINOR = 4 * 2**20  # bytes: a FREE/USED change a prompt monitor pass does not record
BACKEND_FAULTS = {errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                  errno.ECONNREFUSED, errno.ECONNRESET, errno.ENETUNREACH, errno.ENODEV}


@dataclass
class Runtime:
    driver: Driver
    started: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    seen: Capacity | None = None  # what the driver last reported here, before CAPACITY caps


class Backends:
    def __init__(self, pool: Pool, state_dir: Path) -> None:
        self.pool = pool
        self.host = pool.host
        self.state_dir = state_dir
        self.host_timeout = HOST_TIMEOUT
        self.runtimes: dict[int, Runtime] = {}
        self.by_id: dict[int, Backend] = {}  # as this host sees them
        self.local_error: dict[int, str] = {}  # backends this host cannot reach, and why
        self.local_readonly: dict[int, str] = {}  # backends this host reaches read-only, and why
        self._seen: dict[int, tuple[Backend, Backend]] = {}
        self.retired: list[Driver] = []  # replaced or deleted drivers, stopped by the next monitor
        pool.backend_hooks.append(self.refresh)

    def refresh(self) -> None:
        """Recompute this host's view after backend rows or local errors changed."""
        self.by_id = {b.id: self._as_seen_here(b) for b in self.pool.backend_rows.values()}
        for bid in list(self.runtimes):
            if bid not in self.by_id:
                self.retired.append(self.runtimes.pop(bid).driver)

    def _as_seen_here(self, b: Backend) -> Backend:
        """A host-local backend of another host is REMOTE here; one this host cannot reach is
        ERROR here, whatever other hosts see."""
        owner = b.tm_raw.get("HOST") if b.tm == "dir" else None
        if owner and owner != self.host:
            state, error = "REMOTE", f"local to host {owner}"
        elif b.id in self.local_error and b.state != "DISABLED":
            state, error = "ERROR", self.local_error[b.id]
        elif b.id in self.local_readonly and b.state == "READY":
            state, error = "DISABLED", self.local_readonly[b.id]  # DISABLED's rules: read-only
        else:
            return b
        seen = self._seen.get(b.id)
        if seen is None or seen[0] is not b or seen[1].error != error:
            seen = (b, dataclasses.replace(b, state=state, error=error))
            self._seen[b.id] = seen
        return seen[1]

    def runtime(self, b: Backend) -> Runtime:
        rt = self.runtimes.get(b.id)
        if rt is None or rt.driver.tm_raw != b.tm_raw:
            if rt is not None:
                self.retired.append(rt.driver)  # TM_RAW changed: the old one is stopped later
            rt = Runtime(driver_class(b.tm)(b.tm_raw, self.state_dir))
            self.runtimes[b.id] = rt
        return rt

    def get(self, backend_id: int) -> Backend:
        b = self.by_id.get(backend_id)
        if b is None:
            raise err.NotFound(f"backend {backend_id} does not exist")
        return b

    def find(self, ref: str | int) -> Backend:
        """A backend by name or ID, as every command accepts them alike."""
        text = str(ref)
        if text.isdigit():
            b = self.by_id.get(int(text))
        else:
            b = next((b for b in self.by_id.values() if b.name == text), None)
        if b is None:
            raise err.NotFound(f"no backend {text!r}", "`onestoragebackend list` shows the backends")
        return b

    @staticmethod
    def usable(b: Backend, write: bool) -> None:
        """State rules: ERROR answers EIO, DISABLED is read-only, INIT is not yet checked."""
        if b.state == "READY":
            return
        if b.state == "DISABLED":
            if write:
                raise err.ReadOnly(f"backend {b.name} is DISABLED (read-only)",
                                   f"`onestoragebackend enable {b.name}` allows changes again")
            return
        if b.state == "ERROR":
            raise err.BackendUnavailable(f"backend {b.name} is in ERROR: {b.error}",
                                         "the monitor retries; `onestoragebackend show` has details")
        if b.state == "REMOTE":
            raise err.Remote(f"backend {b.name} is {b.error}", "use that host's mount or API")
        raise err.BackendUnavailable(f"backend {b.name} is {b.state}, not yet checked")

    @asynccontextmanager
    async def call(self, b: Backend, what: str, timeout: float | None = None,
                   ) -> AsyncIterator[Driver]:
        """A driver call under the backend's timeout (or a longer one for whole-image work);
        trouble turns the backend ERROR. Timed (metrics.DRIVER_SECONDS) as `what`."""
        rt = self.runtime(b)
        limit = b.timeout if timeout is None else timeout
        start = time.perf_counter()
        try:
            with trio.fail_after(limit):
                if not rt.started:
                    await rt.driver.start()
                    rt.started = True
                yield rt.driver
            metrics.DRIVER_SECONDS.labels(b.name, what).observe(time.perf_counter() - start)
        except trio.TooSlowError:
            metrics.DRIVER_TIMEOUTS.labels(b.name, what).inc()
            await self.set_error(b, f"{what} timed out after {limit:g}s")
            raise err.BackendUnavailable(
                f"backend {b.name}: {what} timed out after {limit:g}s") from None
        except OSError as e:
            raise await self.os_error(b, what, e) from None

    @asynccontextmanager
    async def data(self, backend_id: int, what: str) -> AsyncIterator[None]:
        """A data-path call on an open handle: bounded by the backend's timeout (which only a
        handle whose calls can be abandoned, e.g. through a worker thread, needs), errors mapped.
        read and write do the same without a context manager (`OpenFiles.read`)."""
        b = self.get(backend_id)
        start = time.perf_counter()
        try:
            with trio.fail_after(b.timeout):
                yield
            metrics.DRIVER_SECONDS.labels(b.name, what).observe(time.perf_counter() - start)
        except (trio.TooSlowError, OSError) as e:
            raise await self.data_error(b, what, e) from None

    async def data_error(self, b: Backend, what: str, e: trio.TooSlowError | OSError,
                         ) -> err.Tm2Error:
        """What a failed data-path call means: a timeout turns the backend ERROR, an OSError is
        mapped by `os_error`."""
        if isinstance(e, trio.TooSlowError):
            metrics.DRIVER_TIMEOUTS.labels(b.name, what).inc()
            await self.set_error(b, f"{what} timed out after {b.timeout:g}s")
            return err.BackendUnavailable(f"backend {b.name}: {what} timed out after {b.timeout:g}s")
        return await self.os_error(b, what, e)

    async def os_error(self, b: Backend, what: str, e: OSError) -> err.Tm2Error:
        if e.errno == errno.EROFS:
            self.pool.stale.add(b.id)  # the monitor confirms and makes it read-only here
            return err.ReadOnly(f"backend {b.name}: {what}: its storage is read-only")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return err.NoSpace(f"backend {b.name} is full", "free space or grow the backend")
        if e.errno == errno.EFBIG:
            return err.FileTooBig(f"backend {b.name}: {what}: file too large")
        if e.errno in BACKEND_FAULTS or e.errno is None:
            await self.set_error(b, f"{what}: {e.strerror or e}")
            return err.BackendUnavailable(f"backend {b.name}: {what} failed: {e.strerror or e}")
        log.warning("backend %s: %s failed: %s", b.name, what, e.strerror or e)
        return err.Tm2Error(f"backend {b.name}: {what} failed: {e.strerror or e}")

    async def set_error(self, b: Backend, message: str) -> None:
        """This host cannot use the backend: ERROR here at once (memory first: this host's own
        view needs no commit); ERROR for the pool too unless another live host reaches it."""
        log.error("backend %s (%d) -> ERROR: %s", b.name, b.id, message)
        self.local_error[b.id] = message
        rt = self.runtimes.get(b.id)
        if rt:
            rt.started = False
        self.refresh()

        def work(tx: Tx) -> None:
            tx.set_host_backend(self.host, b.id, "ERROR", message)
            current = tx.lock_backend(b.id)  # a concurrent disable is not overwritten
            if current and current.state != "DISABLED" and not self._reached_elsewhere(tx, b.id):
                tx.update_backend(b.id, state="ERROR", error=message)
            elif current:
                tx.update_backend(b.id, error=message)

        try:
            await self.pool.write(work)
        except err.Tm2Error as e:
            log.error("backend %s: recording ERROR in the pool store failed: %s", b.name, e.message)

    def _reached_elsewhere(self, tx: Tx, backend_id: int) -> bool:
        """Whether another live host's monitor found the backend READY lately (worker thread)."""
        now = time.time()
        alive = {h["name"] for h in tx.hosts() if now - h["heartbeat"] < self.host_timeout}
        return any(v["backend_id"] == backend_id and v["host"] != self.host and v["host"] in alive
                   and v["state"] == "READY" and now - v["checked"] < VIEW_FRESH
                   for v in tx.host_backends())

    async def monitor(self, backend_id: int, prompt: bool = False) -> None:
        """Refresh capacity and state; the only way out of ERROR is a monitor that succeeds.
        `prompt`: a pass right after this host changed the backend's usage; it records FREE and
        USED only if they moved by more than `MINOR` (every row change is heard by every
        host: a shared filesystem's FREE moves all the time), the full pass records any change."""
        b = self.get(backend_id)
        if b.state == "REMOTE":
            await self.pool.write(lambda tx: tx.set_host_backend(self.host, b.id, "REMOTE", b.error))
            return
        rt = self.runtime(b)
        async with rt.lock:
            start = time.perf_counter()
            try:
                with trio.fail_after(b.timeout):
                    if not rt.started:
                        await rt.driver.start()
                        rt.started = True
                    cap = await rt.driver.monitor()
                    rt.seen = cap
                metrics.DRIVER_SECONDS.labels(b.name, "monitor").observe(time.perf_counter() - start)
            except (OSError, trio.TooSlowError, err.Tm2Error) as e:
                if isinstance(e, trio.TooSlowError):
                    metrics.DRIVER_TIMEOUTS.labels(b.name, "monitor").inc()
                if isinstance(e, OSError) and e.errno == errno.EROFS:
                    await self._read_only(b, e.strerror or "read-only")
                    return
                reason = (f"monitor timed out after {b.timeout:g}s"
                          if isinstance(e, trio.TooSlowError) else f"monitor: {e}")
                if b.state != "ERROR" or b.error != reason:
                    await self.set_error(b, reason)
                else:
                    await self.pool.write(
                        lambda tx: tx.set_host_backend(self.host, b.id, "ERROR", reason))
                return
        total, free, used = capped(cap, b.capacity)
        if prompt and b.state == "READY" and b.total == total and not (
                _moved(b.free, free, total) or _moved(b.used, used, total)):
            return

        def work(tx: Tx) -> None:
            current = tx.lock_backend(b.id)  # a concurrent disable is not overwritten
            if current is None:
                return
            state = "DISABLED" if current.state == "DISABLED" else "READY"
            values = dict(state=state, error=None, total=total, free=free, used=used)
            if any(getattr(current, k) != v for k, v in values.items()):
                tx.update_backend(b.id, monitored=time.time(), updated=current.updated, **values)
            tx.set_host_backend(self.host, b.id, "READY", None)

        await self.pool.write(work)
        if b.state == "ERROR":
            log.info("backend %s (%d) is READY again", b.name, b.id)
        if (self.local_error.pop(b.id, None) is not None
                or self.local_readonly.pop(b.id, None) is not None):
            self.refresh()

    async def _read_only(self, b: Backend, why: str) -> None:
        """The storage answers reads but not writes here (a filesystem remounted read-only):
        this host treats the backend as DISABLED (reads work, changes answer EROFS) until a
        monitor pass finds it writable again."""
        reason = f"read-only on this host: {why}"
        if self.local_readonly.get(b.id) != reason:
            log.error("backend %s (%d) is %s", b.name, b.id, reason)
            self.local_readonly[b.id] = reason
            self.refresh()
        await self.pool.write(lambda tx: tx.set_host_backend(self.host, b.id, "READONLY", reason))

    def pooled(self) -> Capacity:
        """The pool's space, for `df` on the mount: backends on one storage (a filesystem, a
        Ceph pool, as this host's monitor found) count it once, each within its CAPACITY."""
        shared: dict[str, tuple[Capacity, list[Backend]]] = {}
        total = free = used = 0
        for b in self.by_id.values():
            if b.total is None:
                continue
            rt = self.runtimes.get(b.id)
            seen = rt.seen if rt else None
            if seen is None or seen.storage is None:
                total, free, used = total + b.total, free + (b.free or 0), used + (b.used or 0)
            else:
                shared.setdefault(seen.storage, (seen, []))[1].append(b)
        for seen, members in shared.values():
            size = sum(b.total or 0 for b in members)
            room = sum(b.free or 0 for b in members)
            total += size if seen.total is None else min(seen.total, size)
            free += room if seen.free is None else min(seen.free, room)
            used += sum(b.used or 0 for b in members)
        return Capacity(total, free, used)

    async def monitor_all(self) -> None:
        await self.stop_retired()
        async with trio.open_nursery() as nursery:
            for bid in list(self.by_id):
                nursery.start_soon(self.monitor, bid)

    async def delete_data(self, b: Backend, key: str) -> None:
        """After the rows are gone: a failure here leaves a key that reconcile() sweeps."""
        self.pool.stale.add(b.id)
        try:
            async with self.call(b, "delete") as driver:
                await driver.delete(key)
        except err.Tm2Error as e:
            log.error("backend %s: image data %s left behind (%s); reconcile removes it",
                      b.name, key, e.message)

    async def stop_retired(self) -> None:
        retired, self.retired = self.retired, []
        for driver in retired:
            await quietly(driver.stop())

    async def stop(self) -> None:
        for rt in self.runtimes.values():
            await quietly(rt.driver.stop())
        await self.stop_retired()


def _moved(before: int | None, now: int | None, total: int | None) -> bool:
    if before is None or now is None:
        return before != now
    return abs(now - before) >= max(MINOR, (total or 0) // 100_000)


def capped(cap: Capacity, limit: int | None) -> tuple[int | None, int | None, int | None]:
    """The admin's CAPACITY caps what the driver reports."""
    total, free, used = cap.total, cap.free, cap.used
    if limit is not None:
        total = limit if total is None else min(total, limit)
        room = max(0, limit - (used or 0))
        free = room if free is None else min(free, room)
    return total, free, used


async def quietly(coro: Awaitable[Any]) -> None:
    """A cleanup step after a failure: the first error is the one to report."""
    try:
        await coro
    except Exception as e:
        log.debug("cleanup step failed: %s", e)
