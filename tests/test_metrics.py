"""Prometheus metrics of a real daemon, scraped through the control socket and over TCP
(--metrics-listen), parsed with prometheus_client's own parser."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import Daemon, public_dir
from tm2fs import errors as err
from tm2fs import metrics
from tm2fs.core import ROOT, Service
from tm2fs.daemon import host_port
from tm2fs.drivers.memory import heal, inject

NOBODY = 65534
MiB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def daemon(port: int) -> Any:
    """In a directory every user can reach: nobody scrapes."""
    with public_dir("tm2fs-metrics-") as top, \
            Daemon(top, extra=("--metrics-listen", f"127.0.0.1:{port}")) as d:
        yield d


@pytest.fixture
def http(daemon: Daemon) -> Any:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.sock)),
                      base_url="http://tm2fs", timeout=30) as client:
        yield client


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and every sample by (name, labels)."""
    types, samples = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return types, samples


def follows_the_naming_guide(text: str) -> None:
    """tm2fs_ families: counters' samples end in _total, histograms are durations in seconds."""
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("tm2fs_"):
            continue
        if family.type == "counter":
            assert all(s.name in (f"{family.name}_total", f"{family.name}_created")
                       for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(http: httpx.Client) -> tuple[dict[str, str], Samples]:
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    follows_the_naming_guide(r.text)
    return parse(r.text)


def ok(p: subprocess.CompletedProcess[bytes]) -> str:
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode()


@pytest.mark.mount
def test_pool_gauges_match_the_backend_list(daemon: Daemon, http: httpx.Client, port: int,
                                            tmp_path: Path) -> None:
    ok(daemon.tm2("allocate", "local:a.img", "3M"))
    ok(daemon.tm2("allocate", "local:b.img", "5M"))
    outside = tmp_path / "vm-7" / "disk.0"
    outside.parent.mkdir()
    ok(daemon.tm2("attach", "local:b.img", str(outside)))
    types, samples = scrape(http)
    row = daemon.backends()["local"]
    assert value(samples, "tm2fs_backend_state", backend="local", tm2fs_backend_state="READY") == 1
    assert value(samples, "tm2fs_backend_state", backend="local", tm2fs_backend_state="ERROR") == 0
    assert value(samples, "tm2fs_backend_images", backend="local") == row["NBIMAGE"] == 2
    assert value(samples, "tm2fs_backend_attachments", backend="local") == row["NBVM"] == 1
    assert value(samples, "tm2fs_backend_allocated_bytes", backend="local") == 8 * MiB
    assert value(samples, "tm2fs_backend_capacity_bytes", backend="local") == row["CAPACITY"] > 0
    assert value(samples, "tm2fs_backend_info", backend="local", id=str(row["ID"]), tm="dir",
                 role="SAN") == 1
    assert 0 <= value(samples, "tm2fs_host_heartbeat_age_seconds", host="testhost") < 60
    assert value(samples, "tm2fs_store_up") == 1
    assert ("tm2fs_leases_held", frozenset()) in samples
    assert types["tm2fs_backend_state"] == "gauge"  # a state set, as the text format has it
    assert types["tm2fs_driver_timeouts"] == "counter"
    # the same over TCP; nothing but GET /metrics is served there
    base = f"http://127.0.0.1:{port}"
    r = httpx.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST
    tcp_types, tcp_samples = parse(r.text)
    assert tcp_types == types
    assert value(tcp_samples, "tm2fs_backend_images", backend="local") == 2
    assert httpx.get(f"{base}/v1/backends", timeout=30).status_code == 404
    assert httpx.get(f"{base}/openapi.json", timeout=30).status_code == 404
    assert httpx.post(f"{base}/metrics", timeout=30).status_code == 405
    # OpenMetrics for a Prometheus that asks for it
    r = httpx.get(f"{base}/metrics", timeout=30,
                  headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    kinds = {f.name: f.type for f in openmetrics_families(r.text)}
    assert kinds["tm2fs_backend_state"] == "stateset"


def _driver(samples: Samples, action: str) -> float:
    return value(samples, "tm2fs_driver_call_duration_seconds_count", backend="local",
                 action=action)


def _fuse(samples: Samples, operation: str) -> float:
    return value(samples, "tm2fs_fuse_request_duration_seconds_count", operation=operation)


@pytest.mark.mount
def test_io_on_the_mount_moves_the_fuse_and_driver_histograms(daemon: Daemon,
                                                              http: httpx.Client) -> None:
    image = daemon.mnt / "local" / "fio.img"
    ok(daemon.tm2("allocate", "local:fio.img", "8M"))
    _, before = scrape(http)
    fio = shutil.which("fio")
    if fio is None:  # setup.sh installs fio; dd makes the same requests, fewer of them
        subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=4k", "count=512",
                        "oflag=direct", "conv=notrunc"], check=True, capture_output=True)
        subprocess.run(["dd", f"if={image}", "of=/dev/null", "bs=4k", "iflag=direct"],
                       check=True, capture_output=True)
        _, after = scrape(http)
    else:  # scraped while fio runs: the histograms move during the run
        job = subprocess.Popen(
            [fio, "--name=rw", f"--filename={image}", "--rw=randrw", "--bs=4k", "--direct=1",
             "--ioengine=psync", "--size=8M", "--time_based", "--runtime=120",
             "--output=/dev/null"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 100
            while True:
                _, after = scrape(http)
                moved = min(_fuse(after, op) - _fuse(before, op) for op in ("read", "write"))
                if moved >= 100 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert job.poll() is None, "fio ended before the scrape saw it"
        finally:
            job.terminate()
            job.wait(60)
    for op in ("read", "write"):
        assert _fuse(after, op) - _fuse(before, op) >= 100, op
        assert _driver(after, op) - _driver(before, op) >= 100, op
        inf = value(after, "tm2fs_fuse_request_duration_seconds_bucket", operation=op, le="+Inf")
        assert inf == _fuse(after, op)
        assert (value(after, "tm2fs_fuse_request_duration_seconds_sum", operation=op)
                > value(before, "tm2fs_fuse_request_duration_seconds_sum", operation=op))
    assert _driver(after, "open") > _driver(before, "open")
    assert _fuse(after, "open") > _fuse(before, "open")
    # every pool-store transaction is timed too (the allocate, the sizes at close)
    assert value(after, "tm2fs_store_transaction_duration_seconds_count", kind="write") > 0


@pytest.mark.mount
def test_api_requests_by_route_template_and_status(daemon: Daemon, http: httpx.Client) -> None:
    def count(samples: Samples, method: str, route: str, status: int) -> float:
        return value(samples, "tm2fs_api_requests_total", method=method, route=route,
                     status=str(status))

    _, before = scrape(http)
    assert http.get("/v1/backends/local").status_code == 200
    assert http.get("/v1/backends/local").status_code == 200
    assert http.get("/v1/backends/nosuch").status_code == 404
    assert http.get("/v1/nowhere/at/all").status_code == 404
    assert http.request("BREW", "/v1/backends").status_code == 405
    _, after = scrape(http)
    route = "/v1/backends/{ref}"
    assert count(after, "GET", route, 200) - count(before, "GET", route, 200) == 2
    assert count(after, "GET", route, 404) - count(before, "GET", route, 404) == 1
    assert (count(after, "GET", "(unmatched)", 404) - count(before, "GET", "(unmatched)", 404)
            == 1)
    assert (count(after, "other", "(unmatched)", 405)
            - count(before, "other", "(unmatched)", 405) == 1)
    # a template, never the raw path: no label names a backend or a path asked for
    routes = {dict(labels).get("route") for name, labels in after
              if name == "tm2fs_api_requests_total"}
    assert not any(r and ("local" in r or "nosuch" in r or "nowhere" in r) for r in routes)
    assert (value(after, "tm2fs_api_request_duration_seconds_count", method="GET", route=route)
            - value(before, "tm2fs_api_request_duration_seconds_count", method="GET",
                    route=route)) == 3


SCRAPE = """
import sys, httpx
with httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1])) as c:
    r = c.get("http://tm2fs/metrics")
    print(r.status_code)
    sys.stdout.write(r.text)
"""


@pytest.mark.mount
def test_any_local_user_may_scrape_what_the_backend_list_shows_everyone(
        daemon: Daemon, http: httpx.Client) -> None:
    """The rule (README, Metrics): /metrics holds only pool-level figures that
    `onestoragebackend list` and `tm2 hosts` show every user, so every user may read it; no image,
    path, user or key is ever a label."""
    secret = daemon.mnt / "local" / "private-dir"
    secret.mkdir(mode=0o700)
    (secret / "hidden-name.img").write_bytes(b"x" * 4096)
    out = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
         "-c", SCRAPE, str(daemon.sock)],
        capture_output=True, check=False, timeout=60, env={**os.environ, "HOME": "/"})
    assert out.returncode == 0, out.stderr.decode()
    status, _, text = out.stdout.decode().partition("\n")
    assert status == "200"
    types, samples = parse(text)
    root_text = http.get("/metrics").text
    assert types == parse(root_text)[0]
    listed = {b["NAME"] for b in ok_json(daemon.backend_cli("list", "--json", user=NOBODY))}
    shown = {dict(labels)["backend"] for name, labels in samples
             if name == "tm2fs_backend_state"}
    assert shown == listed == {"local"}
    for body in (text, root_text):
        assert "private-dir" not in body and "hidden-name" not in body


def ok_json(p: subprocess.CompletedProcess[bytes]) -> list[dict[str, Any]]:
    data = json.loads(ok(p))
    return data if isinstance(data, list) else data.get("STORAGEBACKEND_POOL", data)


@pytest.mark.logs_ok
async def test_a_driver_timeout_is_counted_and_the_scrape_shows_the_error(service: Service) -> None:
    """In-process: a hung driver call (the memory driver's injected fault) past TIMEOUT."""
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    await service.create_backend(ROOT, {"NAME": "m", "TM": "memory", "TIMEOUT": "0.5",
                                        "TM_RAW": f"NAME={name} CAPACITY=64M"})
    of = await service.open_address("m:disk", ROOT, writable=True, create=True)
    await service.write(of, 0, b"kept")
    _, before = parse(metrics.exposition(await service.pool_figures())[0].decode())
    inject(name, "hang", calls=["read"])
    try:
        with pytest.raises(err.BackendUnavailable, match="timed out"):
            await service.read(of, 0, 4)
    finally:
        heal(name)
    body, content_type = metrics.exposition(await service.pool_figures())
    assert content_type == CONTENT_TYPE_LATEST
    follows_the_naming_guide(body.decode())
    _, after = parse(body.decode())
    timeouts = "tm2fs_driver_timeouts_total"
    assert (value(after, timeouts, backend="m", action="read")
            - value(before, timeouts, backend="m", action="read")) == 1
    assert value(before, "tm2fs_backend_state", backend="m", tm2fs_backend_state="READY") == 1
    assert value(after, "tm2fs_backend_state", backend="m", tm2fs_backend_state="ERROR") == 1
    assert value(after, "tm2fs_backend_state", backend="m", tm2fs_backend_state="READY") == 0
    assert value(after, "tm2fs_backend_capacity_bytes", backend="m") == 64 * MiB
    assert (value(after, "tm2fs_driver_call_duration_seconds_count", backend="m", action="write")
            >= 1)
    await service.release(of)


def test_metrics_listen_takes_an_address_and_a_port() -> None:
    assert host_port("127.0.0.1:9810") == ("127.0.0.1", 9810)
    assert host_port("[::]:9810") == ("::", 9810)
    assert host_port("hv-01.example:9810") == ("hv-01.example", 9810)
    for bad in ("9810", ":9810", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "h:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            host_port(bad)
