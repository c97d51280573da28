"""The control API over its real Unix socket: routes, streaming, status codes, callers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from urllib.parse import quote

import httpx
import pytest

from tests.daemon import Daemon
from tm2fs.api import ROUTES

pytestmark = pytest.mark.mount
MiB = 2**20


@pytest.fixture
def http(daemon: Daemon):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.sock)),
                      base_url="http://tm2fs", timeout=60) as client:
        yield client


def test_openapi_lists_every_route(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    served = {(r.pattern, r.method.lower()) for r in ROUTES}
    described = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert described == served
    assert len(served) >= 18


def test_streaming_both_ways(http: httpx.Client, daemon: Daemon) -> None:
    data = os.urandom(64 * MiB)
    r = http.put("/v1/images/data", params={"address": "local:big", "mode": "push"},
                 content=iter([data[i:i + MiB] for i in range(0, len(data), MiB)]))
    assert r.status_code == 201, r.text
    assert r.json()["SIZE"] == len(data)
    digest = hashlib.sha256()
    with http.stream("GET", "/v1/images/data", params={"address": "local:big"}) as r:
        assert int(r.headers["content-length"]) == len(data)
        for chunk in r.iter_bytes():
            digest.update(chunk)
    assert digest.digest() == hashlib.sha256(data).digest()
    assert (daemon.mnt / "local" / "big").read_bytes() == data
    r = http.put("/v1/images/data", params={"address": "local:big", "mode": "push"}, content=b"x")
    assert r.status_code == 409 and r.json()["error"] == "exists"
    r = http.put("/v1/images/data", params={"address": "local:big", "mode": "write"},
                 content=b"short")
    assert r.status_code == 200 and r.json()["SIZE"] == 5


def test_push_of_zeros_stays_thin(http: httpx.Client, daemon: Daemon) -> None:
    r = http.put("/v1/images/data", params={"address": "local:zeros", "mode": "push"},
                 content=bytes(32 * MiB))
    assert r.status_code == 201 and r.json()["SIZE"] == 32 * MiB
    backing = daemon.state / "backends" / "local" / r.json()["KEY"]
    assert backing.stat().st_blocks * 512 < MiB


def pool(http: httpx.Client) -> list[dict]:
    return [{k: v for k, v in b.items() if k not in ("MONITORED", "FREE", "USED")}
            for b in http.get("/v1/backends").json()]


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/images/allocate", {"address": "local:..", "size": 1}, 400),
    ("POST", "/v1/images/allocate", {"address": "local:a\0b", "size": 1}, 400),
    ("POST", "/v1/images/allocate", {"address": "local:", "size": 1}, 400),
    ("POST", "/v1/images/allocate", {"address": "local:" + "x" * 256, "size": 1}, 400),
    ("POST", "/v1/images/allocate", {"address": "local:x", "size": "-1"}, 400),
    ("POST", "/v1/images/allocate", {"address": "local:x", "size": "10Q"}, 400),
    ("POST", "/v1/images/allocate", {"address": "nosuch:x", "size": 1}, 404),
    ("POST", "/v1/images/allocate", {"address": "local:x"}, 400),
    ("POST", "/v1/backends", {"NAME": "local", "TM": "dir"}, 409),
    ("POST", "/v1/backends", {"NAME": "a/b", "TM": "dir"}, 400),
    ("POST", "/v1/backends", {"NAME": "x", "TM": "dir", "TM_RAW": {"PATH": "rel"}}, 400),
    ("POST", "/v1/backends", {"NAME": "x", "TM": "nosuch"}, 400),
    ("POST", "/v1/backends", [1, 2], 400),
    ("GET", "/v1/nosuchroute", None, 404),
    ("DELETE", "/v1/images/allocate", None, 405),
])
def test_bad_requests_get_4xx_and_change_nothing(http: httpx.Client, method: str, path: str,
                                                  body: object, status: int) -> None:
    http.post("/v1/images/allocate", json={"address": "local:keep", "size": 1})
    before = pool(http)
    r = http.request(method, path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) >= {"error", "message"}
    assert pool(http) == before


def test_nul_in_a_query_string(http: httpx.Client) -> None:
    r = http.get("/v1/images/size?address=" + quote("local:a\0b"))
    assert r.status_code == 400


def test_deleting_a_backend_that_holds_images(http: httpx.Client, tmp_path) -> None:
    assert http.post("/v1/backends", json={"NAME": "b2", "TM": "dir",
                                           "TM_RAW": {"PATH": f"{tmp_path}/b2"}}).status_code == 201
    http.post("/v1/images/allocate", json={"address": "b2:x", "size": 1})
    r = http.delete("/v1/backends/b2")
    assert r.status_code == 409 and "holds 1 image" in r.json()["message"]
    assert "--force" in r.json()["hint"]
    assert http.delete("/v1/backends/b2", params={"force": "1"}).status_code == 204
    assert [b["NAME"] for b in http.get("/v1/backends").json()] == ["local"]


def test_non_root_callers_are_who_they_are(daemon: Daemon) -> None:
    code = ("import httpx,sys,json; c=httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1]),"
            "base_url='http://x'); r=c.post('/v1/backends', json={'NAME':'mine','TM':'dir'});"
            "print(r.status_code, r.json()['error'])")
    daemon.sock.parent.chmod(0o755)
    for p in list(daemon.sock.parents)[:-1]:
        os.chmod(p, os.stat(p).st_mode | 0o005)
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", code, str(daemon.sock)],
                         capture_output=True, timeout=30, check=False)
    assert out.stdout.decode().split() == ["403", "permission_denied"], out.stderr.decode()
    made = daemon.tm2("allocate", "local:nobodys", "1M", user=65534)
    assert made.returncode == 0, made.stderr.decode()
    info = json.loads(daemon.tm2("info", "local:nobodys", "--json").stdout)
    st = (daemon.mnt / "local" / "nobodys").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534), info


def test_keep_alive_and_malformed_http(daemon: Daemon) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(daemon.sock))
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            data += s.recv(65536)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(daemon.sock))
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 400")
