"""GET /openapi.json declares, route by route, exactly the fields the handlers read.

Each handler runs against a real service with a request whose (already checked) body and query
remember which keys were looked at; the backend routes hand their whole body to the service, which takes
BACKEND_KEYS and custom attributes.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tm2fs import errors as err
from tm2fs.api import ROUTES, ApiRequest, Route, openapi_document
from tm2fs.core import Service
from tm2fs.core.backend_spec import BACKEND_KEYS
from tm2fs.httpserver import Peer
from tm2fs.store import PoolStore

BACKEND_ROUTES = {("POST", "/v1/backends"), ("PATCH", "/v1/backends/{ref}")}
# values that pass the checks a handler makes before it calls the service
VALUES = {"size": "1M", "mode": "write", "shrink": "false", "force": "false"}


class Reads(dict):
    """Request fields that remember which keys the handler looked at."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.seen: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.seen.add(str(key))
        return super().__contains__(key)


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Service]:
    store = PoolStore(f"sqlite:///{tmp_path}/pool.db")
    service = Service(store, tmp_path / "state", host="testhost", mountpoint=str(tmp_path / "mnt"))
    await service.start()
    yield service
    await service.stop()
    store.close()


async def call(svc: Service, r: Route, body: dict[str, Any], query: dict[str, Any],
               ) -> tuple[Reads, Reads, err.Tm2Error | None]:
    """Run the handler (on a backend that does not exist: nothing changes); what it read."""
    body_reads, query_reads = Reads(body), Reads(query)

    async def no_data() -> AsyncIterator[bytes]:
        return
        yield b""

    req = ApiRequest(r.method, r.pattern, query_reads, {}, Peer(1, 0, 0, frozenset()), no_data(),
                     data=body_reads)
    path = {n: "nosuch" for n in re.findall(r"\{(\w+)\}", r.pattern)}
    error = None
    try:
        await r.func(svc, req, **path)
    except err.Tm2Error as e:
        error = e
    return body_reads, query_reads, error


def sample(fields: dict[str, Any]) -> dict[str, Any]:
    return {n: VALUES.get(n, "nosuch:x") for n in fields}


@pytest.mark.parametrize("r", [r for r in ROUTES if (r.method, r.pattern) not in BACKEND_ROUTES],
                         ids=lambda r: f"{r.method} {r.pattern}")
async def test_each_route_declares_what_its_handler_reads(svc: Service, r: Route) -> None:
    body, query, _ = await call(svc, r, sample(r.body), sample(r.query))
    assert body.seen == set(r.body), "body fields read vs declared"
    assert query.seen == set(r.query), "query fields read vs declared"
    assert r.attributes is None
    for name in [*r.body, *r.query]:  # required means: refused without it
        body, query, error = await call(svc, r, sample({n: 1 for n in r.body if n != name}),
                                        sample({n: 1 for n in r.query if n != name}))
        missing = error is not None and f"{name!r} is missing" in error.message
        assert missing == (name in r.required), name


@pytest.mark.parametrize("key", sorted(BACKEND_ROUTES))
def test_backend_routes_declare_every_attribute_the_service_takes(key: tuple[str, str]) -> None:
    [r] = [r for r in ROUTES if (r.method, r.pattern) == key]
    assert set(r.body) == BACKEND_KEYS
    assert r.attributes is not None  # custom attributes
    assert set(r.required) == ({"NAME", "TM"} if r.method == "POST" else set())


def test_the_document_carries_the_declarations() -> None:
    paths = openapi_document()["paths"]
    for r in ROUTES:
        op = paths[r.pattern][r.method.lower()]
        query = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "query"}
        assert set(query) == set(r.query)
        assert {n for n, p in query.items() if p["required"]} == set(r.required) & set(r.query)
        content = op.get("requestBody", {}).get("content", {})
        if r.raw:
            assert set(content) == {"application/octet-stream"}
        elif r.body:
            schema = content["application/json"]["schema"]
            assert schema["properties"] == r.body
            assert set(schema.get("required", [])) == set(r.required) & set(r.body)
            assert schema["additionalProperties"] == (r.attributes or False)  # no unknown fields
        else:
            assert not content
    create = paths["/v1/backends"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"USER", "GROUP", "PERMISSIONS", "OVERCOMMIT", "RESERVED", "PRIORITY"} <= set(
        create["properties"])
