"""A small HTTP/1.1 server (h11) on a trio Unix-socket listener, knowing who is calling.

Why not an ASGI server: the control API needs the peer's credentials (SO_PEERCRED) on every
request — USER and GROUP of new objects and every permission check come from them — and ASGI
servers do not expose the socket. h11 does the protocol; this module only moves bytes, streams
bodies both ways (an image upload of many GiB is never held in memory) and keeps connections
alive.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from . import httplimits
from .httplimits import Gate, Limits

log = logging.getLogger(__name__)

MAX_HEADERS = 64 * 1024
RECV = 256 * 1024


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    peer: Peer
    body: AsyncIterator[bytes]

    async def read(self, limit: int = 16 * 2**20) -> bytes:
        chunks, size = [], 0
        async for chunk in self.body:
            size += len(chunk)
            if size > limit:
                raise ValueError(f"request body larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json(self) -> Any:
        data = await self.read()
        return json.loads(data) if data else {}


@dataclass
class Response:
    status: int = 200
    body: bytes | AsyncIterator[bytes] = b""
    content_type: str = "application/json"
    length: int | None = None  # for streamed bodies; None -> chunked
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(data, default=str).encode() + b"\n")


Handler = Callable[[Request], Awaitable[Response]]


def peer_of(sock: trio.socket.SocketType) -> Peer:
    """Who is at the other end (the kernel says); the supplementary groups come later, off the
    loop (`_with_groups`)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return Peer(pid, uid, gid, frozenset())


_groups: dict[tuple[int, int], tuple[float, frozenset[int]]] = {}
GROUPS_TTL = 30.0  # seconds a user's looked-up groups are reused


def _lookup_groups(uid: int, gid: int) -> frozenset[int]:
    """The user's supplementary groups (passwd, group: perhaps LDAP over the network)."""
    with contextlib.suppress(KeyError, OSError):
        return frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    return frozenset()


async def _with_groups(peer: Peer) -> Peer:
    """The peer with its groups, looked up in a worker thread (a passwd or group look-up may
    go to an LDAP server: never on the loop), and reused for GROUPS_TTL."""
    if peer.uid < 0:  # no credentials (TCP)
        return peer
    key, now = (peer.uid, peer.gid), time.monotonic()
    cached = _groups.get(key)
    if cached is None or now - cached[0] > GROUPS_TTL:
        groups = await trio.to_thread.run_sync(_lookup_groups, peer.uid, peer.gid,
                                               abandon_on_cancel=True)
        if len(_groups) > 10_000:
            _groups.clear()
        cached = _groups[key] = (now, groups)
    return Peer(peer.pid, peer.uid, peer.gid, cached[1])


async def claim_socket(path: str) -> None:
    """Make `path` free for a new listener: a stale socket left by a crashed daemon (nobody
    accepts: ECONNREFUSED) is removed; a socket someone serves, or anything that is not a socket,
    is refused (OSError EADDRINUSE / EEXIST), so a second daemon never steals a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket: refusing to replace it")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            await probe.connect(path)
        except ConnectionRefusedError:
            log.info("removing the stale control socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except FileNotFoundError:
            return  # gone meanwhile
        except BlockingIOError:
            pass  # its backlog is full: someone listens
    raise OSError(errno.EADDRINUSE, f"another tm2fs is serving {path} "
                  "(stop it, or give this daemon another --socket)")


async def serve_unix(path: str, handler: Handler, *, limits: Limits | None = None,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `path` (mode 0666: access is decided per request from the peer's uid), under
    `limits` (default: the daemon's, httplimits.configured())."""
    limits = (limits or httplimits.configured()).sized()
    log.info("control socket: at most %d connections per uid, %d of all users but root, %d of "
             "root; heads within %g s, bodies stalled %g s and idle connections %g s dropped",
             limits.max_per_uid, limits.max_connections, limits.max_connections,
             limits.header_timeout, limits.body_timeout, limits.idle_timeout)
    await claim_socket(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(128)
        task_status.started()
        async with trio.open_nursery() as nursery:
            await _accept(sock, handler, limits, nursery, peer_of)
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


ACCEPT_SHORT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
REASONS = {408: "Request Timeout", 503: "Service Unavailable"}


ANONYMOUS = Peer(0, -1, -1, frozenset())  # a TCP client: no credentials, one shared share


async def serve_tcp(host: str, port: int, handler: Handler, *, limits: Limits | None = None,
                    task_status: trio.TaskStatus[tuple[Any, ...]] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
    """Listen on TCP `host`:`port` (0: any free port; `started` gets the address bound), for a
    handler that needs no caller (its peers are all ANONYMOUS, so together they get one uid's
    share of connections), with the same deadlines as the control socket."""
    limits = (limits or httplimits.configured()).sized()
    family, kind, proto, _, address = (await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(address)
        sock.listen(128)
        task_status.started(sock.getsockname())
        async with trio.open_nursery() as nursery:
            await _accept(sock, handler, limits, nursery, lambda _: ANONYMOUS)
    finally:
        sock.close()


async def _accept(sock: trio.socket.SocketType, handler: Handler, limits: Limits,
                  nursery: trio.Nursery,
                  identify: Callable[[trio.socket.SocketType], Peer]) -> None:
    """Accept for ever. Out of descriptors, wait and retry (logged once per episode); a caller
    beyond its share gets 503 at once, and nothing of it is kept."""
    gate = Gate(limits)
    short_since: float | None = None
    while True:
        try:
            conn, _ = await sock.accept()
        except OSError as e:
            if e.errno not in ACCEPT_SHORT:
                raise
            if short_since is None:
                short_since = trio.current_time()
                log.warning("control socket: cannot accept: %s; retrying", os.strerror(e.errno))
            await trio.sleep(0.1)
            continue
        if short_since is not None:
            log.info("control socket: accepting again after %.1f s",
                     trio.current_time() - short_since)
            short_since = None
        try:
            peer = identify(conn)
        except OSError:
            conn.close()
            continue
        refused = gate.enter(peer.uid)
        if refused is not None:
            _refuse(conn, refused)
            continue
        nursery.start_soon(_admitted, trio.SocketStream(conn), peer, handler, limits, gate)


def _raw(status: int, error: str, message: str, hint: str) -> bytes:
    """A whole response for a connection about to be closed (no request may have been read)."""
    body = json.dumps({"error": error, "message": message, "hint": hint}).encode() + b"\n"
    return (f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _refuse(conn: trio.socket.SocketType, why: str) -> None:
    """503 and close, without waiting: the answer fits the empty socket buffer, and a client
    that already wrote its request still reads it (AF_UNIX hands over queued bytes first)."""
    with contextlib.suppress(OSError):
        os.write(conn.fileno(), _raw(503, "too_many_connections", why,
                                     "close some of them, or wait for them to finish, and "
                                     "retry"))
    conn.close()


async def _admitted(stream: trio.SocketStream, peer: Peer, handler: Handler, limits: Limits,
                    gate: Gate) -> None:
    try:
        with trio.move_on_after(limits.header_timeout):  # a hung directory service
            peer = await _with_groups(peer)
        await _connection(stream, peer, handler, limits)
    finally:
        gate.leave(peer.uid)


class Stalled(Exception):
    """The client let a deadline pass: a head not whole in time, a body that stopped moving."""

    def __init__(self, message: str, status: int | None = 408) -> None:
        super().__init__(message)
        self.status = status  # what to answer, if anything can still be answered


class _Wire:
    """One connection's bytes both ways, every wait under its deadline."""

    def __init__(self, stream: trio.SocketStream, limits: Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        self.body_failed: BaseException | None = None

    async def receive(self, deadline: float, why: str) -> None:
        with trio.move_on_at(deadline):
            self.conn.receive_data(await self.stream.receive_some(RECV))
            return
        raise Stalled(why)

    async def head(self, since: float | None) -> Any:
        """The next request's head (or ConnectionClosed): whole within header_timeout of
        `since` (the connection's start), or, on a kept-alive connection (since=None), of its
        first byte, which may take idle_timeout. None: idle too long, closed quietly."""
        event = self.conn.next_event()
        if event is h11.NEED_DATA and since is None and not self.conn.trailing_data[0]:
            try:
                await self.receive(trio.current_time() + self.limits.idle_timeout, "idle")
            except Stalled:
                return None
            event = self.conn.next_event()
        deadline = (since or trio.current_time()) + self.limits.header_timeout
        while event is h11.NEED_DATA:
            await self.receive(deadline, "the request's head did not arrive within "
                               f"{self.limits.header_timeout:g} s")
            event = self.conn.next_event()
        return event

    async def body(self) -> AsyncIterator[bytes]:
        """The request body; fails (and says so in body_failed) if it stops moving for
        body_timeout, breaks HTTP, or the client goes away."""
        while self.conn.their_state is h11.SEND_BODY:
            try:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    await self.receive(trio.current_time() + self.limits.body_timeout,
                                       "the request body stalled for "
                                       f"{self.limits.body_timeout:g} s")
                    continue
            except (Stalled, h11.RemoteProtocolError, trio.BrokenResourceError,
                    ConnectionError) as e:
                self.body_failed = e
                raise
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def send_bytes(self, data: bytes) -> None:
        """Send all of `data`; the client must take some of it every body_timeout (a slow
        reader that keeps reading is never cut)."""
        view = memoryview(data)
        while view:
            with trio.move_on_after(self.limits.body_timeout):
                view = view[await self.stream.socket.send(view):]
                continue
            raise Stalled(f"the client read nothing for {self.limits.body_timeout:g} s", None)

    async def send(self, event: Any) -> None:
        await self.send_bytes(self.conn.send(event) or b"")

    async def answer_and_close(self, raw: bytes) -> None:
        with trio.move_on_after(1), contextlib.suppress(OSError, trio.BrokenResourceError):
            await self.stream.send_all(raw)


async def _connection(stream: trio.SocketStream, peer: Peer, handler: Handler,
                      limits: Limits) -> None:
    wire = _Wire(stream, limits)
    conn = wire.conn
    since: float | None = trio.current_time()
    request: Request | None = None
    try:
        while True:
            event = await wire.head(since)
            since = None
            if not isinstance(event, h11.Request):
                return  # closed, idle, or not a request
            url = urlsplit(event.target.decode("latin-1"))
            request = Request(
                method=event.method.decode(), path=unquote(url.path),
                query=dict(parse_qsl(url.query, keep_blank_values=True)),
                headers={k.decode().lower(): v.decode("latin-1") for k, v in event.headers},
                peer=peer, body=wire.body())
            try:
                response = await handler(request)
            except Exception:
                if wire.body_failed is not None:
                    raise wire.body_failed from None
                log.exception("control API: %s %s failed", request.method, request.path)
                response = Response.json({"error": "internal", "message": "internal error",
                                          "hint": "the daemon's log has the details"}, 500)
            if wire.body_failed is not None:  # the handler swallowed it: the stream is broken
                raise wire.body_failed
            await _send(wire, response)
            async for _ in request.body:  # drain what the handler did not read
                pass
            if {conn.our_state, conn.their_state} & {h11.MUST_CLOSE, h11.ERROR}:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as e:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(Exception):
                await _send(wire, Response.json(
                    {"error": "invalid_argument", "message": f"bad HTTP request: {e}"}, 400))
    except Stalled as e:
        what = f"{request.method} {request.path}" if request else "a connection"
        log.info("control API: %s of uid %d dropped: %s", what, peer.uid, e)
        if e.status is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await wire.answer_and_close(_raw(e.status, "timeout", str(e),
                                             "send the whole request without pausing"))
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        pass  # the client went away
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()


async def _send(wire: _Wire, response: Response) -> None:
    headers = [("content-type", response.content_type), *response.headers]
    if isinstance(response.body, bytes):
        headers.append(("content-length", str(len(response.body))))
    elif response.length is not None:
        headers.append(("content-length", str(response.length)))
    else:
        headers.append(("transfer-encoding", "chunked"))
    await wire.send(h11.Response(status_code=response.status, headers=headers))
    if isinstance(response.body, bytes):
        if response.body:
            await wire.send(h11.Data(data=response.body))
    else:
        body = response.body
        try:
            async for chunk in body:
                if chunk:
                    await wire.send(h11.Data(data=chunk))
        except (Stalled, trio.BrokenResourceError, ConnectionError):
            raise
        except Exception:
            # headers are gone already: the only honest signal left is a cut connection
            log.exception("control API: streaming a response failed")
            raise trio.BrokenResourceError from None
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
    await wire.send(h11.EndOfMessage())
