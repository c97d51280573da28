"""The core's one facade: what the filesystem, the control API and the daemon may call.

It holds no rules of its own: it builds the rooms (each a module of this package, owning one idea)
in dependency order and hands each call to the room that owns it. The frontends import this and
the value types of `model.py`, nothing else of the core.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import metrics
from ..drivers.base import Capacity, Progress
from ..model import DEFAULT_CLUSTER, ROOT, Attr, Caller
from ..store import PoolStore
from .actions import Actions, Upload
from .admin import Admin
from .allocation import Allocation
from .backends import Backends
from .images import Images
from .leases import Leases
from .namespace import Namespace
from .native import xattr_value
from .openfiles import OpenFile, OpenFiles
from .placing import Placing
from .pool import Listener, Pool
from .recovery import Recovery
from .views import Views


class Service:
    """The pool, its images and their namespace, as the rules allow them to change."""

    def __init__(self, store: PoolStore, state_dir: Path, host: str | None = None,
                 mountpoint: str | None = None, clusters: Iterable[str] = (DEFAULT_CLUSTER,),
                 ) -> None:
        self.store = store
        self.state_dir = Path(state_dir)
        self.host = host or socket.gethostname()
        self.mountpoint = os.path.abspath(mountpoint) if mountpoint else None
        self.pool = Pool(store, self.host, frozenset(clusters))
        self.backends = Backends(self.pool, self.state_dir)
        self.leases = Leases(self.pool, self.backends, self.mountpoint)
        self.namespace = Namespace(self.pool, self.backends, self.leases, self.mountpoint)
        self.placing = Placing(self.pool, self.backends)
        self.images = Images(self.pool, self.backends, self.namespace, self.leases, self.placing)
        self.allocation = Allocation(self.pool, self.backends)
        self.files = OpenFiles(self.pool, self.backends, self.namespace, self.leases, self.images,
                               self.allocation)
        # the data path's two hot calls, without a facade frame per request
        self.read = self.files.read
        self.write = self.files.write
        self.actions = Actions(self.pool, self.backends, self.namespace, self.leases,
                               self.placing, self.images, self.files)
        self.admin = Admin(self.pool, self.backends, self.state_dir, self.mountpoint)
        self.recovery = Recovery(self.pool, self.backends, self.admin)
        self.views = Views(self.pool, self.backends)

    async def start(self) -> Service:
        """Start the store worker and read the pool into memory (on the trio loop)."""
        await self.pool.start()
        return self

    async def stop(self, clean: bool = True) -> None:
        """Close every open image (making it durable), stop the drivers and the store worker.
        `clean`: this host goes OFFLINE and gives back the leases of its open files."""
        try:
            await self.files.stop()
            if clean:
                await self.leases.unregister()
            await self.backends.stop()
        finally:
            self.pool.close()

    # ------------------------------------------------------------------ shared state

    @property
    def listeners(self) -> list[Listener]:
        return self.pool.listeners

    @property
    def stale(self) -> set[int]:
        return self.pool.stale

    @stale.setter
    def stale(self, value: set[int]) -> None:
        self.pool.stale = value

    @property
    def host_timeout(self) -> float:
        return self.backends.host_timeout

    @host_timeout.setter
    def host_timeout(self, value: float) -> None:
        self.backends.host_timeout = value

    @property
    def transactions(self) -> int:
        """Pool-store transactions this daemon ran (benchmarks count them per action)."""
        return self.pool.db.transactions

    # ------------------------------------------------------------------ backends

    def find_backend(self, ref: str | int) -> Any:
        return self.backends.find(ref)

    async def list_backends(self) -> list[dict[str, Any]]:
        return await self.views.list()

    async def backend_info(self, ref: str | int, detail: bool = False,
                           caller: Caller = ROOT) -> dict[str, Any]:
        return await self.views.show(ref, detail, caller)

    async def create_backend(self, caller: Caller, spec: dict[str, Any]) -> dict[str, Any]:
        return await self.views.show(await self.admin.create(caller, spec))

    async def update_backend(self, caller: Caller, ref: str | int,
                             spec: dict[str, Any]) -> dict[str, Any]:
        return await self.views.show(await self.admin.update(caller, ref, spec))

    async def set_enabled(self, caller: Caller, ref: str | int, enabled: bool) -> dict[str, Any]:
        return await self.views.show(await self.admin.set_enabled(caller, ref, enabled))

    async def delete_backend(self, caller: Caller, ref: str | int, force: bool = False) -> None:
        await self.admin.delete(caller, ref, force)

    async def pool_figures(self) -> metrics.PoolFigures:
        """The pool's gauges for a Prometheus scrape (`metrics.exposition`)."""
        return await self.views.figures()

    async def monitor_backend(self, backend_id: int, prompt: bool = False) -> None:
        await self.backends.monitor(backend_id, prompt)

    async def monitor_all(self) -> None:
        await self.backends.monitor_all()
        self.allocation.sweep()

    async def measure_allocation(self) -> None:
        """The monitor's tick: images written or changed since last measured (st_blocks)."""
        await self.allocation.refresh()

    # ------------------------------------------------------------------ hosts and leases

    async def register_host(self) -> None:
        await self.leases.register()

    async def heartbeat(self) -> None:
        await self.leases.heartbeat()

    async def unregister_host(self) -> None:
        await self.leases.unregister()

    async def list_hosts(self) -> list[dict[str, Any]]:
        return await self.leases.list_hosts()

    async def remote_change(self, payload: str) -> None:
        await self.pool.remote_change(payload)

    async def break_lease(self, address: str, caller: Caller, force: bool = False,
                          ) -> dict[str, Any]:
        return await self.actions.break_lease(address, caller, force)

    # ------------------------------------------------------------------ the namespace (mount)

    def getattr(self, ino: int) -> Attr:
        return self.namespace.getattr(ino)

    def parent_of(self, ino: int) -> int:
        return self.namespace.parent_of(ino)

    def lookup(self, parent: int, name: str) -> Attr:
        return self.namespace.lookup(parent, name)

    def readdir(self, ino: int, after_ino: int = 0, limit: int = 1000) -> list[tuple[str, Attr]]:
        return self.namespace.readdir(ino, after_ino, limit)

    def readlink(self, ino: int) -> str:
        return self.namespace.readlink(ino)

    def statfs(self, ino: int) -> Capacity:
        return self.namespace.statfs(ino)

    async def mkdir(self, parent: int, name: str, mode: int, caller: Caller) -> Attr:
        return await self.namespace.mkdir(parent, name, mode, caller)

    async def rmdir(self, parent: int, name: str, caller: Caller) -> None:
        await self.namespace.rmdir(parent, name, caller)

    async def create(self, parent: int, name: str, mode: int, caller: Caller,
                     size: int = 0) -> Attr:
        return await self.images.create(parent, name, mode, caller, size=size)

    async def unlink(self, parent: int, name: str, caller: Caller) -> None:
        await self.namespace.unlink(parent, name, caller)

    async def rename(self, parent: int, name: str, new_parent: int, new_name: str,
                     caller: Caller, noreplace: bool = False, exchange: bool = False) -> None:
        await self.namespace.rename(parent, name, new_parent, new_name, caller, noreplace,
                                    exchange)

    async def symlink(self, parent: int, name: str, target: str, caller: Caller) -> Attr:
        return await self.namespace.symlink(parent, name, target, caller)

    async def setattr(self, ino: int, caller: Caller, *, mode: int | None = None,
                      uid: int | None = None, gid: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None) -> Attr:
        return await self.images.setattr(ino, caller, mode=mode, uid=uid, gid=gid, size=size,
                                         atime_ns=atime_ns, mtime_ns=mtime_ns)

    async def sync(self) -> None:
        """fsync of a directory: every metadata change so far is durable."""
        await self.pool.db.sync()

    # ------------------------------------------------------------------ the data path

    async def open(self, ino: int, caller: Caller, writable: bool, truncate: bool = False,
                   append: bool = False) -> OpenFile:
        return await self.files.open(ino, caller, writable, truncate, append)

    async def flush(self, of: OpenFile) -> None:
        await self.files.flush(of)

    async def fsync(self, of: OpenFile) -> None:
        await self.files.fsync(of)

    async def release(self, of: OpenFile) -> None:
        await self.files.release(of)

    # ------------------------------------------------------------------ TM2 actions

    def address_of(self, ino: int) -> str:
        return self.actions.address_of(ino)

    async def image_info(self, address: str, caller: Caller) -> dict[str, Any]:
        return await self.actions.image_info(address, caller)

    async def allocate(self, address: str, size: int | str, caller: Caller, mode: int = 0o600,
                       place: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.actions.allocate(address, size, caller, mode, place)

    async def explain(self, caller: Caller, size: int | str, **options: Any) -> list[dict[str, Any]]:
        return await self.placing.explain(caller, size, **options)

    def get_size(self, address: str, caller: Caller) -> int:
        return self.actions.get_size(address, caller)

    async def resize(self, address: str, size: int | str, caller: Caller,
                     shrink: bool = False) -> dict[str, Any]:
        return await self.actions.resize(address, size, caller, shrink)

    async def delete(self, address: str, caller: Caller) -> None:
        await self.actions.delete(address, caller)

    async def clone(self, src: str, dst: str, caller: Caller, progress: Progress | None = None,
                    place: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.actions.clone(src, dst, caller, progress, place)

    async def open_address(self, address: str, caller: Caller, writable: bool,
                           create: bool = False, exclusive: bool = False,
                           truncate: bool = False, size: int = 0,
                           place: dict[str, Any] | None = None) -> OpenFile:
        return await self.actions.open_address(address, caller, writable, create, exclusive,
                                               truncate, size, place)

    async def open_upload(self, address: str, caller: Caller, push: bool, size: int = 0,
                          place: dict[str, Any] | None = None) -> Upload:
        return await self.actions.open_upload(address, caller, push, size, place)

    async def finish_upload(self, up: Upload, size: int) -> str:
        return await self.actions.finish_upload(up, size)

    async def abort_upload(self, up: Upload) -> None:
        await self.actions.abort_upload(up)

    async def attach(self, address: str, path: str, caller: Caller, host: str | None = None,
                     native: bool = False, takeover: bool = False,
                     dev: str = "vda") -> dict[str, Any]:
        return await self.actions.attach(address, path, caller, host, native, takeover, dev)

    async def detach(self, address: str, path: str, caller: Caller,
                     host: str | None = None) -> None:
        await self.actions.detach(address, path, caller, host)

    def local_path(self, address: str, caller: Caller) -> str | None:
        return self.actions.local_path(address, caller)

    def source(self, address: str, caller: Caller, dev: str = "vda") -> dict[str, Any]:
        return self.actions.source(address, caller, dev)

    def source_xattr(self, ino: int, caller: Caller) -> bytes | None:
        """The mount's `user.tm2fs.source` of `ino`, or None where it has none."""
        src = self.actions.source_of(ino, caller)
        return None if src is None else xattr_value(src)

    # ------------------------------------------------------------------ recovery

    async def reconcile(self) -> dict[str, int]:
        return await self.recovery.reconcile()

    async def ensure_default_backend(self) -> None:
        await self.recovery.ensure_default_backend()
