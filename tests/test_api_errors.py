"""The control API's error mapping: Tm2Errors, also when a trio nursery wrapped them in a group."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tm2fs import errors as err
from tm2fs.api import error_response, make_handler, tm2_error
from tm2fs.core import COPY_CHUNK, ROOT, Service
from tm2fs.httpserver import Peer, Request

MiB = 2**20


def request(method: str = "PUT", path: str = "/v1/images/data", query: dict | None = None,
            chunks: tuple[bytes, ...] = ()) -> Request:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return Request(method, path, query or {}, {}, Peer(1, 0, 0, frozenset()), body())


@pytest.mark.logs_ok  # a 5xx answer is logged
def test_a_group_of_tm2_errors_answers_as_its_first() -> None:
    full = err.NoSpace("backend tiny is full")
    group = ExceptionGroup("from a nursery", [full, err.NoSpace("again")])
    response = error_response(request(), group)
    assert response is not None and response.status == 507
    assert isinstance(response.body, bytes)
    assert json.loads(response.body)["error"] == "no_space"
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [full]), err.Busy("busy")])
    assert tm2_error(nested) is full
    assert tm2_error(full) is full


def test_anything_else_stays_a_bug() -> None:
    assert tm2_error(ValueError("bug")) is None
    assert tm2_error(ExceptionGroup("mixed", [err.NoSpace("full"), ValueError("bug")])) is None
    assert tm2_error(BaseExceptionGroup("mixed", [err.NoSpace("full"), KeyboardInterrupt()])) is None
    assert error_response(request(), ValueError("bug")) is None


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB filesystem (tmpfs) with 1 MiB free: writes within its size fail with ENOSPC."""
    point = tmp_path / "small"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tm2fs-test", str(point)], check=True)
    try:
        (point / "filler").write_bytes(b"f" * 7 * MiB)
        (point / "backend").mkdir()
        yield point / "backend"
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


@pytest.mark.logs_ok  # a 5xx answer is logged
async def test_a_full_backend_answers_507_to_a_streamed_write(service: Service, small_fs: Path) -> None:
    """write_chunks writes in a nursery, so the ENOSPC (NoSpace) arrives inside an ExceptionGroup."""
    await service.create_backend(ROOT, {"NAME": "tiny", "TM": "dir", "TM_RAW": f"PATH={small_fs}"})
    handle = make_handler(service)
    chunks = (b"x" * COPY_CHUNK, b"x" * COPY_CHUNK)  # 8 MiB: within the size, beyond what is free
    response = await handle(request(query={"address": "tiny:big", "mode": "write"}, chunks=chunks))
    assert response.status == 507
    assert isinstance(response.body, bytes)
    assert json.loads(response.body)["error"] == "no_space"
