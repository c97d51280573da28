"""A hostile local user's client, for tests: hold many half-open connections to a Unix socket.

    python -m tests.socket_hog SOCKET N [--partial]

opens N connections (with --partial every other one sends the start of a request head and never
finishes it; the rest send nothing) and prints one JSON line: {"opened", "failed"}. Then it
answers commands read from stdin, one JSON line each:

    count        {"open", "closed", "statuses"}: what the server has closed or answered so far
    watch SECS   waits until the server closed every connection, at most SECS; also
                 "closed_after": each closed connection's lifetime in seconds
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field

HEAD = b"GET /v1/backends HTTP/1.1\r\nHost: tm2fs\r\n"


@dataclass
class Conn:
    sock: socket.socket
    opened: float
    received: bytes = b""
    closed: float | None = None
    status: str | None = field(default=None)


def poll(conns: list[Conn], timeout: float) -> None:
    """Read what the server sent; note when it closed. Waits at most `timeout`."""
    open_ = [c for c in conns if c.closed is None]
    if not open_:
        return
    with selectors.DefaultSelector() as sel:
        for c in open_:
            sel.register(c.sock, selectors.EVENT_READ, c)
        for key, _ in sel.select(timeout):
            c = key.data
            try:
                data = c.sock.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if data:
                c.received += data
                continue
            c.closed = time.monotonic()
            c.sock.close()
            if c.received:
                c.status = c.received.split(b"\r\n", 1)[0].decode("latin-1")


def connect(s: socket.socket, path: str) -> None:
    """connect(), waiting up to 30 s while the listener's backlog is full (AF_UNIX says EAGAIN
    then, rather than waiting, when the socket has a timeout)."""
    deadline = time.monotonic() + 30  # a loaded machine accepts slowly
    while True:
        try:
            s.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def report(data: dict[str, object]) -> None:
    print(json.dumps(data), flush=True)


def main() -> None:
    path, n, partial = sys.argv[1], int(sys.argv[2]), "--partial" in sys.argv[3:]
    conns: list[Conn] = []
    failed = 0
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            connect(s, path)
        except OSError:
            failed += 1
            s.close()
            continue
        if partial and i % 2:
            # past its share the server answers 503 and closes at once, perhaps before this:
            # the answer waits in the socket all the same
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(HEAD)
        s.setblocking(False)
        conns.append(Conn(s, time.monotonic()))
    report({"opened": len(conns), "failed": failed})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "count":
            poll(conns, 0.5)
            poll(conns, 0.1)
        elif cmd[0] == "watch":
            deadline = time.monotonic() + float(cmd[1])
            while any(c.closed is None for c in conns) and time.monotonic() < deadline:
                poll(conns, min(0.5, max(0.0, deadline - time.monotonic())))
        statuses: dict[str, int] = {}
        for c in conns:
            if c.closed is not None:
                statuses[c.status or ""] = statuses.get(c.status or "", 0) + 1
        report({"open": sum(c.closed is None for c in conns),
                "closed": sum(c.closed is not None for c in conns), "statuses": statuses,
                "closed_after": [round(c.closed - c.opened, 2) for c in conns
                                 if c.closed is not None]})


if __name__ == "__main__":
    main()
