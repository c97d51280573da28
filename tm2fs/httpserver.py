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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

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
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    groups: frozenset[int] = frozenset()
    with contextlib.suppress(KeyError, OSError):
        groups = frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    return Peer(pid, uid, gid, groups)


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


async def serve_unix(path: str, handler: Handler, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `path` (mode 0666: access is decided per request from the peer's uid)."""
    await claim_socket(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(128)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(partial(_connection, handler=handler), [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _connection(stream: trio.SocketStream, handler: Handler) -> None:
    peer = peer_of(stream.socket)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
    try:
        while True:
            event = await _next(conn, stream)
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            url = urlsplit(event.target.decode("latin-1"))
            request = Request(
                method=event.method.decode(), path=unquote(url.path),
                query=dict(parse_qsl(url.query, keep_blank_values=True)),
                headers={k.decode().lower(): v.decode("latin-1") for k, v in event.headers},
                peer=peer, body=_body(conn, stream))
            try:
                response = await handler(request)
            except Exception as e:
                malformed = _malformed(e)
                if malformed is not None:  # the body broke HTTP (short, bad chunk): the client's fault
                    response = Response.json({"error": "invalid_argument",
                                              "message": f"bad HTTP request body: {malformed}"}, 400)
                else:
                    log.exception("control API: %s %s failed", request.method, request.path)
                    response = Response.json({"error": "internal", "message": "internal error",
                                              "hint": "the daemon's log has the details"}, 500)
            await _send(conn, stream, response)
            async for _ in request.body:  # drain what the handler did not read
                pass
            if {conn.our_state, conn.their_state} & {h11.MUST_CLOSE, h11.ERROR}:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as e:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(Exception):
                await _send(conn, stream, Response.json(
                    {"error": "invalid_argument", "message": f"bad HTTP request: {e}"}, 400))
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        pass  # the client went away
    finally:
        with contextlib.suppress(Exception):
            await stream.aclose()


def _malformed(e: BaseException) -> h11.RemoteProtocolError | None:
    """The protocol error a handler failed with while reading the body, also from inside a
    nursery's group; None when anything else went wrong too."""
    if isinstance(e, h11.RemoteProtocolError):
        return e
    if isinstance(e, BaseExceptionGroup):
        errors, others = e.split(h11.RemoteProtocolError)
        if errors is not None and others is None:
            return _malformed(errors.exceptions[0])
    return None


async def _next(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECV))
            continue
        return event


async def _body(conn: h11.Connection, stream: trio.SocketStream) -> AsyncIterator[bytes]:
    while conn.their_state is h11.SEND_BODY:
        event = await _next(conn, stream)
        if isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return


async def _send(conn: h11.Connection, stream: trio.SocketStream, response: Response) -> None:
    headers = [("content-type", response.content_type), *response.headers]
    if isinstance(response.body, bytes):
        headers.append(("content-length", str(len(response.body))))
    elif response.length is not None:
        headers.append(("content-length", str(response.length)))
    else:
        headers.append(("transfer-encoding", "chunked"))
    await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
    if isinstance(response.body, bytes):
        if response.body:
            await stream.send_all(conn.send(h11.Data(data=response.body)))
    else:
        try:
            async for chunk in response.body:
                if chunk:
                    await stream.send_all(conn.send(h11.Data(data=chunk)))
        except Exception:
            # headers are gone already: the only honest signal left is a cut connection
            log.exception("control API: streaming a response failed")
            raise trio.BrokenResourceError from None
    await stream.send_all(conn.send(h11.EndOfMessage()))
