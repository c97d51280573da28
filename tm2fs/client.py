"""The CLIs' side of the control socket: httpx over a Unix socket, errors rebuilt as raised."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from .errors import Tm2Error, from_dict

DEFAULT_SOCKET = "/run/tm2fs/tm2fs.sock"


def socket_path(option: str | None = None) -> str:
    return option or os.environ.get("TM2FS_SOCKET") or DEFAULT_SOCKET


class Client:
    def __init__(self, path: str | None = None, timeout: float = 300.0) -> None:
        self.path = socket_path(path)
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=self.path),
                                 base_url="http://tm2fs", timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _unreachable(self, e: Exception) -> Tm2Error:
        return Tm2Error(f"cannot reach the tm2fs daemon at {self.path}: {e.__class__.__name__}",
                        "is it running? (systemctl status tm2fs) or set TM2FS_SOCKET / --socket")

    def _cut(self, e: Exception, what: str) -> Tm2Error:
        """The connection went after the request began: the daemon died or was restarted."""
        if isinstance(e, httpx.TimeoutException):
            return Tm2Error(f"the daemon did not answer {what} in time ({e.__class__.__name__})",
                            "check the daemon's log; `tm2 info` shows what is there")
        return Tm2Error(f"the daemon closed the connection during the transfer of {what} "
                        f"({e.__class__.__name__}); a push, write or copy cut short leaves the "
                        "image as it was (nothing was changed)",
                        "check the daemon (systemctl status tm2fs) and run the command again")

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            response.read()
            try:
                raise from_dict(response.json())
            except ValueError:
                raise Tm2Error(f"HTTP {response.status_code}: {response.text[:200]}") from None
        return response

    def call(self, method: str, path: str, json: Any = None,
             params: dict[str, Any] | None = None) -> Any:
        try:
            response = self.http.request(method, path, json=json, params=params)
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError) as e:
            raise self._unreachable(e) from None
        except httpx.TransportError as e:
            raise self._cut(e, f"{method} {path}") from None
        self._check(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def download(self, address: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of an image's bytes."""
        try:
            stream = self.http.stream("GET", "/v1/images/data", params={"address": address})
            response = stream.__enter__()
        except (httpx.ConnectError, FileNotFoundError) as e:
            raise self._unreachable(e) from None
        try:
            self._check(response)
        except BaseException:
            stream.__exit__(None, None, None)
            raise
        size = int(response.headers.get("content-length", "0"))

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.iter_bytes(4 * 2**20)
            except httpx.HTTPError as e:
                raise Tm2Error(f"transfer of {address} was cut: {e}") from None
            finally:
                stream.__exit__(None, None, None)

        return size, chunks()

    def upload(self, address: str, chunks: Iterable[bytes], mode: str,
               params: dict[str, Any] | None = None) -> Any:
        try:
            response = self.http.put("/v1/images/data",
                                     params={"address": address, "mode": mode, **(params or {})},
                                     content=chunks)
        except (httpx.ConnectError, FileNotFoundError) as e:
            raise self._unreachable(e) from None
        except httpx.TransportError as e:
            raise self._cut(e, address) from None
        return self._check(response).json()
