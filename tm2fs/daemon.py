"""`tm2fs MOUNTPOINT`: the daemon. Mounts the pool, serves the control socket, monitors backends.

One process, one trio loop. One AsyncExitStack owns every resource in the order it was started.
On SIGTERM/SIGINT the FUSE loop finishes the requests in flight, open images are made durable and
the filesystem is unmounted. After a crash the mount is deliberately left in place (it answers
ENOTCONN): an empty-looking mountpoint is worse, as rsync or a script might mirror it. A restart
clears such a stale mount and mounts again.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyfuse3
import trio

from . import __version__, httplimits
from .model import DEFAULT_CLUSTER
from .store import PoolStore, sqlite_url

log = logging.getLogger("tm2fs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tm2fs",
        description="Mount the storage pool: one directory per backend, one file per image.",
        epilog="Example: tm2fs --state-dir /var/lib/tm2fs /var/lib/tm2fs/mnt   "
               "(then: onestoragebackend list; tm2 allocate local:disk.img 10G)",
    )
    p.add_argument("mountpoint", help="where the pool appears (created if missing)")
    p.add_argument("--state-dir", default="/var/lib/tm2fs",
                   help="pool database and the default `local` backend live here "
                        "(default: %(default)s)")
    p.add_argument("--db", metavar="URL",
                   help="pool store: sqlite:///path or postgresql+psycopg://user@host/db "
                        "(default: sqlite under the state dir)")
    p.add_argument("--listen-db", metavar="URL",
                   help="PostgreSQL reached directly for change notifications (LISTEN), when "
                        "--db goes through PgBouncer in transaction mode (default: --db)")
    p.add_argument("--socket", default=os.environ.get("TM2FS_SOCKET", "/run/tm2fs/tm2fs.sock"),
                   help="control socket for the CLIs (default: $TM2FS_SOCKET or %(default)s)")
    p.add_argument("--host", default=socket.gethostname(),
                   help="this hypervisor's name in the pool (default: the hostname)")
    p.add_argument("--cluster", action="append", metavar="NAME", dest="clusters",
                   help="a cluster this host belongs to (repeat for several; default: default): "
                        "`auto:` placement uses the backends of its clusters only")
    p.add_argument("--monitor-interval", type=float, default=30.0, metavar="SECONDS",
                   help="how often every backend's capacity and state is refreshed")
    p.add_argument("--host-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a host without a heartbeat this long is presumed dead: its write leases "
                        "may be broken (default: %(default)s; heartbeats every 2 s)")
    p.add_argument("--no-default-backend", action="store_true",
                   help="do not create the `local` directory backend in an empty pool")
    p.add_argument("-f", "--foreground", action="store_true", default=True,
                   help="stay in the foreground (the default; systemd runs it so)")
    p.add_argument("--background", dest="foreground", action="store_false",
                   help="detach once the mount is ready")
    p.add_argument("--metrics-listen", type=host_port, metavar="ADDR:PORT",
                   help="also serve Prometheus metrics (GET /metrics, nothing else) on TCP, e.g. "
                        "127.0.0.1:9810 or [::]:9810; the control socket always serves them")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    httplimits.add_arguments(p)
    p.add_argument("--version", action="version", version=f"tm2fs {__version__}")
    return p.parse_args(argv)


def host_port(text: str) -> tuple[str, int]:
    """ADDR:PORT (an IPv6 address in brackets) for --metrics-listen."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDR:PORT (e.g. 127.0.0.1:9810)")
    return host, int(port)


def setup_logging(debug: bool) -> None:
    """Logs go to stderr; under systemd (JOURNAL_STREAM set) journald adds the timestamps."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=fmt,
                        stream=sys.stderr)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.sendto(message.encode(), path)


def prepare_mountpoint(path: Path) -> None:
    """Create the mountpoint; clear a stale mount left by a crashed daemon (ENOTCONN).

    The stat of a stale mount's root can still succeed from the kernel's attribute cache, so
    staleness is judged by listing it.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.EEXIST):
            raise
    if not is_mounted(path):
        return
    try:
        os.listdir(path)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("%s is a stale mount of a crashed daemon: unmounting it", path)
        subprocess.run(["fusermount3", "-u", "-z", "--", str(path)], check=True)
        return
    raise SystemExit(f"tm2fs: {path} is already mounted (is another tm2fs running?)")


def is_mounted(path: Path) -> bool:
    from . import mounts

    return mounts.is_mounted(path)


async def run(args: argparse.Namespace, ready_fd: int | None = None) -> None:
    from . import api, fs, fuseconn, hosts, httpserver, monitor
    from .core import Service

    state_dir = Path(args.state_dir).absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    # headroom for the data path: the API's connections are capped at a share of this
    log.info("open-file limit: %d", httplimits.raise_open_file_limit())
    httplimits.configure(httplimits.from_arguments(args))
    try:  # before anything is mounted: a second daemon on a live socket changes nothing
        await httpserver.claim_socket(args.socket)
    except OSError as e:
        raise SystemExit(f"tm2fs: {e.strerror}") from None
    mountpoint = Path(args.mountpoint).absolute()
    prepare_mountpoint(mountpoint)
    clean = False
    async with contextlib.AsyncExitStack() as stack:
        store = PoolStore(args.db or sqlite_url(str(state_dir / "pool.db")), args.listen_db)
        stack.callback(store.close)
        service = Service(store, state_dir, host=args.host, mountpoint=str(mountpoint),
                          clusters=args.clusters or (DEFAULT_CLUSTER,))
        service.host_timeout = args.host_timeout
        # LISTEN before the first read: a change another host makes meanwhile is heard
        listener = await trio.to_thread.run_sync(store.listen) if store.shared else None
        await service.start()
        # a crash: the heartbeat stops and leases stay until broken; a clean stop gives them back
        stack.push_async_callback(lambda: service.stop(clean))
        await service.register_host()
        await service.monitor_all()
        log.info("reconcile at start: %s", await service.reconcile())
        if not args.no_default_backend:
            await service.ensure_default_backend()
        pyfuse3.init(fs.Operations(service), str(mountpoint), fs.mount_options())
        await trio.to_thread.run_sync(fuseconn.widen, mountpoint)
        # Unmount only on a clean stop; after a crash the mount stays (ENOTCONN).
        stack.callback(lambda: pyfuse3.close(unmount=clean))
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(api.serve, service, args.socket)
        if args.metrics_listen:
            bound = await nursery.start(api.serve_metrics, service, *args.metrics_listen)
            host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            log.info("Prometheus metrics on http://%s:%d/metrics", host, bound[1])
        nursery.start_soon(monitor.run, service, args.monitor_interval)
        nursery.start_soon(hosts.heartbeat, service)
        await nursery.start(hosts.listen, service, listener)
        nursery.start_soon(_stop_on_signals)
        log.info("tm2fs %s: pool mounted at %s, control socket %s, host %s", __version__,
                 mountpoint, args.socket, args.host)
        sd_notify("READY=1\nSTATUS=serving")
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        await pyfuse3.main()
        sd_notify("STOPPING=1")
        log.info("stopping: requests finished, closing images and unmounting")
        nursery.cancel_scope.cancel()
        clean = True


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got %s", signal.Signals(signum).name)
            pyfuse3.terminate()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.debug)
    ready_fd = None
    if not args.foreground:
        ready_fd = _detach()
    try:
        trio.run(run, args, ready_fd)
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("tm2fs crashed; the mount is left in place (restart tm2fs to remount)")
        sys.exit(1)


def _detach() -> int:
    """Fork before trio starts; the parent exits 0 once the child reports the mount ready."""
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        ok = os.read(read_fd, 1)
        sys.exit(0 if ok == b"1" else 1)
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    return write_fd


if __name__ == "__main__":
    main()
