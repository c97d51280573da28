"""schemathesis against the real daemon's /openapi.json, over its Unix socket: zero 5xx, every
answer as documented (status, content type, body schema), every request the schema calls
invalid refused with a 4xx.

schemathesis speaks TCP; a relay on 127.0.0.1 carries each connection to the control socket.
The relay runs as `nobody`, so the generated requests reach the daemon as an unprivileged
local user would (root-only routes still check every body first, then answer 403): nothing
they make can touch the host outside the test's directory.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon

pytestmark = [pytest.mark.mount, pytest.mark.slow]

NOBODY = 65534
RELAY = r"""
import socket, sys, threading

def pipe(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (a, b):
            s.close()

server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
while True:
    client, _ = server.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls
    unix = socket.socket(socket.AF_UNIX)
    unix.connect(sys.argv[1])
    threading.Thread(target=pipe, args=(client, unix), daemon=True).start()
    threading.Thread(target=pipe, args=(unix, client), daemon=True).start()
"""
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
          "unsupported_method"]


@pytest.fixture
def relay(public_daemon: Daemon) -> Iterator[str]:
    """http://127.0.0.1:PORT, served by the daemon's control socket as `nobody`."""
    proc = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                             "/usr/bin/python3", "-c", RELAY, str(public_daemon.sock)],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def test_schemathesis_finds_no_5xx_and_no_undocumented_answer(public_daemon: Daemon, relay: str,
                                                             tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--no-color", "run", f"{relay}/openapi.json",
         "--checks", ",".join(CHECKS), "--max-examples", "10", "--seed", "13", "--workers", "2",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "20",
         "--suppress-health-check", "all"],
        capture_output=True, timeout=300, check=False, cwd=tmp_path)
    output = run.stdout.decode(errors="replace") + run.stderr.decode(errors="replace")
    assert run.returncode == 0, output[-20000:]  # 1: a check failed; 2: nothing was tested
    assert "internal error" not in public_daemon.logs()
