"""The control socket's listener: who may take the socket path."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest
import trio

from tm2fs.httpserver import Request, Response, serve_unix


def answering(name: str):
    async def handler(req: Request) -> Response:
        return Response.json({"server": name})

    return handler


async def ask(path: str) -> bytes:
    """One GET over the socket; the raw response."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(b"GET /who HTTP/1.1\r\nHost: tm2fs\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def test_a_second_server_does_not_take_a_live_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "tm2fs.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, path, answering("first"))
        with (pytest.raises(OSError, match=f"another tm2fs is serving {path}") as refused,
              trio.fail_after(5)):  # a server that took the socket would serve on forever
            await serve_unix(path, answering("second"))
        assert refused.value.errno == errno.EADDRINUSE
        assert b'"server": "first"' in await ask(path)  # still the first one's socket
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)  # the first one cleans up after itself


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "tm2fs.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)  # a crashed daemon's socket: the file stays, nobody accepts
    with pytest.raises(ConnectionRefusedError):
        await ask(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, path, answering("new"))
        assert b'"server": "new"' in await ask(path)
        nursery.cancel_scope.cancel()


async def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "tm2fs.sock"
    path.write_text("precious")
    with pytest.raises(OSError, match="exists and is not a socket") as refused, trio.fail_after(5):
        await serve_unix(str(path), answering("x"))
    assert refused.value.errno == errno.EEXIST
    assert path.read_text() == "precious"


async def reading(req: Request) -> Response:
    return Response.json({"read": len(await req.read())})


async def exchange(path: str, raw: bytes) -> bytes:
    """Send `raw`, end the request side, and return all the server answers."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(raw)
        await stream.send_eof()
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    return data


@pytest.mark.parametrize("raw", [
    b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly ten b",
    b"PUT /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
], ids=["body shorter than Content-Length", "bad chunk header"])
async def test_a_broken_body_is_a_bad_request(tmp_path: Path, raw: bytes) -> None:
    path = str(tmp_path / "tm2fs.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, path, reading)
        answer = await exchange(path, raw)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"bad HTTP request" in answer
        nursery.cancel_scope.cancel()
