"""The control API: HTTP + JSON on a Unix socket, served inside the daemon's trio loop.

Routes only translate: arguments -> one service call, `Tm2Error` -> its HTTP status and JSON body.
The route table types every input (apischema): each request is checked against it before its
handler runs, and it is the source of `GET /openapi.json`, so the description cannot drift from
what is served or checked. Image data streams both ways in chunks; nothing holds a whole image in memory.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

import trio

from . import __version__, metrics
from . import errors as err
from .apischema import MAX_BODY, Schema, check, parse_json
from .core import COPY_CHUNK, STREAM_DEPTH, Caller, Service, read_chunks, write_chunks
from .httpserver import Request, Response, serve_tcp, serve_unix
from .sizes import MAX_SIZE, parse_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """One operation. `body` and `query` name every field the handler reads, with its schema;
    `required` are those it refuses to go without; `attributes` is the schema of free-form body
    keys (custom backend attributes, keys in any case), None when there are none; `raw` bodies
    are image bytes; `ok` the statuses of success. The schemas are checked before the handler
    runs (apischema.check) and are what /openapi.json publishes."""

    method: str
    pattern: str
    summary: str
    func: Callable[..., Awaitable[Any]]
    body: dict[str, Schema] = field(default_factory=dict)
    query: dict[str, Schema] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    attributes: Schema | None = None
    raw: bool = False
    ok: tuple[int, ...] = (200,)

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")

    @property
    def body_schema(self) -> Schema | None:
        """The JSON body's schema; None when the route takes none (or takes raw bytes)."""
        if self.raw or not (self.body or self.attributes):
            return None
        schema: Schema = {"type": "object", "properties": self.body,
                          "additionalProperties": self.attributes or False}
        if self.attributes:
            schema["propertyNames"] = ATTRIBUTE_NAME
        required = [n for n in self.required if n in self.body]
        if required:
            schema["required"] = required
        return schema

    @property
    def query_schema(self) -> Schema:
        return {"type": "object", "properties": self.query, "additionalProperties": False,
                "required": [n for n in self.required if n in self.query]}


ROUTES: list[Route] = []


def route(method: str, pattern: str, summary: str, **fields: Any,
          ) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
    def register(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        ROUTES.append(Route(method, pattern, summary, func, **fields))
        return func

    return register


PATH_MAX = 4096
STRING: Schema = {"type": "string", "maxLength": 255}
ADDRESS: Schema = {"type": "string", "maxLength": PATH_MAX, "pattern": "^[^:]+:[^/]",
                   "description": "BACKEND:PATH, the backend by name or ID"}
SIZE: Schema = {"type": ["integer", "string"], "minimum": 0, "maximum": MAX_SIZE, "maxLength": 32,
                "description": "bytes, or with a binary unit like `truncate -s`: 512M, 10G"}
FLAG: Schema = {"type": ["boolean", "string"], "maxLength": 8,
                "description": "true: true, 1, yes or on"}
LINK: Schema = {"type": "string", "minLength": 1, "maxLength": PATH_MAX,
                "description": "where the image is in use (a VM's disk link)"}
HOST: Schema = {"type": "string", "maxLength": 255,
                "description": "the host (default: this daemon's)"}
ACCOUNT: Schema = {"type": ["string", "integer"], "minimum": 0, "maximum": 2**32 - 2, "maxLength": 64,
                   "pattern": r"^(\d{1,9}|(?!\d+$).{1,64})$",
                   "description": "a name or number on this host"}
NUMBER: Schema = {"type": ["number", "string"], "maxLength": 32}
DEV: Schema = {"type": "string", "maxLength": 8, "pattern": "^(vd|sd|hd|xvd)[a-z]{1,3}$",
               "description": "the guest disk name of a libvirt <disk> (default vda)"}
SCALAR: Schema = {"type": ["string", "number", "null"], "maxLength": PATH_MAX,
                  "minimum": -(2**63), "maximum": 2**63 - 1}
ATTRIBUTE_NAME: Schema = {"type": "string", "pattern": r"^[A-Za-z0-9_]{1,64}$"}
# the template attributes of a backend (keys in any case); others are custom attributes
BACKEND: dict[str, Schema] = {
    "NAME": STRING,
    "TM": {"type": "string", "maxLength": 64,
           "description": "the driver: dir, rbd, iscsi, legacy, ..."},
    "TM_RAW": {"type": ["string", "object"], "maxLength": PATH_MAX, "maxProperties": 64,
               "propertyNames": ATTRIBUTE_NAME, "additionalProperties": SCALAR,
               "description": "the driver's arguments: KEY=VALUE pairs or an object"},
    "CAPACITY": {**SIZE, "type": ["integer", "string", "null"],
                 "description": "a cap on what the driver reports (a size); empty or unlimited: none"},
    "COST": {"type": ["integer", "string"], "minimum": 0, "maximum": 2**31 - 1,
             "pattern": r"^\s*\d{1,9}\s*$", "description": "a whole number, 0 or more"},
    "ROLE": {"type": "string", "maxLength": 32, "description": "SAN or REPOSITORY"},
    "TAGS": {"type": ["string", "array"], "items": STRING, "maxItems": 256, "maxLength": PATH_MAX,
             "description": "comma-separated words, or a list"},
    "CLUSTER": STRING,
    "TIMEOUT": {**NUMBER, "description": "seconds (0-3600) for every driver call"},
    "USER": ACCOUNT,
    "GROUP": ACCOUNT,
    "PERMISSIONS": {"type": ["string", "integer"], "maxLength": 16, "minimum": 0, "maximum": 0o7777,
                    "description": "octal (0755) or `um- u-- ---`"},
    "OVERCOMMIT": {**NUMBER, "description": "1-100"},
    "RESERVED": {**NUMBER, "description": "a share kept free: 0.1 or 10%"},
    "PRIORITY": {**NUMBER, "type": ["integer", "string"]},
}
ATTRIBUTE: Schema = {**SCALAR, "description": "any other key is a custom attribute (letters, "
                     "digits, _; keys in any case); an empty value removes it"}


@dataclass
class ApiRequest(Request):
    """A request whose query and JSON body fit its route's schemas; `data` is the body."""

    data: dict[str, Any] = field(default_factory=dict)


async def checked(r: Route, req: Request) -> ApiRequest:
    """`req` once its query and JSON body fit `r`'s schemas (else InvalidArgument: 400)."""
    check(req.query, r.query_schema, "")
    data: Any = {}
    schema = r.body_schema
    if schema is not None:
        try:
            raw = await req.read(limit=MAX_BODY)
        except ValueError as e:  # beyond the limit
            raise err.InvalidArgument(str(e)) from None
        data = parse_json(raw)
        if not isinstance(data, dict):
            raise err.InvalidArgument("request body must be a JSON object")
        if r.attributes is not None:  # template keys in any case
            upper = {str(k).upper(): v for k, v in data.items()}
            if len(upper) != len(data):
                raise err.InvalidArgument("request body names a field twice (keys in any case)")
            data = upper
        check(data, schema, "")
    return ApiRequest(**{f.name: getattr(req, f.name) for f in fields(Request)}, data=data)


def caller_of(request: Request) -> Caller:
    p = request.peer
    return Caller(p.uid, p.gid, p.groups, origin="api")


def _arg(data: dict[str, Any], name: str) -> Any:
    if name not in data or data[name] in (None, ""):
        raise err.InvalidArgument(f"{name!r} is missing from the request")
    return data[name]


def _flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------- backends


@route("GET", "/v1/backends", "List the storage backends of the pool")
async def list_backends(svc: Service, req: Request) -> Any:
    return await svc.list_backends()


@route("POST", "/v1/backends", "Create a backend from template attributes (NAME, TM, TM_RAW, ...)",
       body=BACKEND, required=("NAME", "TM"), attributes=ATTRIBUTE, ok=(201,))
async def create_backend(svc: Service, req: ApiRequest) -> Any:
    return Response.json(await svc.create_backend(caller_of(req), req.data), 201)


@route("GET", "/v1/backends/{ref}", "Show one backend (by name or ID) with its images")
async def show_backend(svc: Service, req: Request, ref: str) -> Any:
    return await svc.backend_info(ref, detail=True, caller=caller_of(req))


@route("PATCH", "/v1/backends/{ref}", "Update a backend's attributes (merge; empty removes)",
       body=BACKEND, attributes=ATTRIBUTE)
async def update_backend(svc: Service, req: ApiRequest, ref: str) -> Any:
    return await svc.update_backend(caller_of(req), ref, req.data)


@route("DELETE", "/v1/backends/{ref}", "Delete a backend (refused while it holds images)",
       query={"force": FLAG}, ok=(204,))
async def delete_backend(svc: Service, req: Request, ref: str) -> Any:
    await svc.delete_backend(caller_of(req), ref, force=_flag(req.query.get("force", "")))
    return Response(204)


@route("POST", "/v1/backends/{ref}/enable", "Enable a backend (re-checks it at once)")
async def enable_backend(svc: Service, req: Request, ref: str) -> Any:
    return await svc.set_enabled(caller_of(req), ref, True)


@route("POST", "/v1/backends/{ref}/disable", "Disable a backend: read-only until enabled")
async def disable_backend(svc: Service, req: Request, ref: str) -> Any:
    return await svc.set_enabled(caller_of(req), ref, False)


# ---------------------------------------------------------------------- TM2 actions


PLACE: dict[str, Schema] = {  # placement options for `auto:` addresses
    "requirements": {"type": "string", "maxLength": PATH_MAX,
                     "description": "an expression every candidate must meet"},
    "rank": {"type": "string", "maxLength": PATH_MAX,
             "description": "an expression; the highest value wins"},
    "policy": {"type": "string", "maxLength": 32, "description": "cost, packing, striping or fixed"},
    "role": {"type": "string", "maxLength": 32, "description": "SAN (default), REPOSITORY or ANY"},
    "cluster": {"type": "string", "maxLength": 1024,
                "description": "place in these clusters (a,b; * for any), not this host's own"},
}


def _place(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in PLACE if data.get(k) not in (None, "")}


@route("POST", "/v1/images/allocate", "allocate: a new (sparse) image; address auto:PATH places it",
       body={"address": ADDRESS, "size": SIZE, **PLACE}, required=("address", "size"), ok=(201,))
async def allocate(svc: Service, req: ApiRequest) -> Any:
    data = req.data
    info = await svc.allocate(_arg(data, "address"), _arg(data, "size"), caller_of(req),
                              place=_place(data))
    return Response.json(info, 201)


@route("POST", "/v1/placement", "Every backend's verdict for a new image of `size` (a dry run)",
       body={"size": SIZE, **PLACE}, required=("size",))
async def place(svc: Service, req: ApiRequest) -> Any:
    data = req.data
    return await svc.explain(caller_of(req), _arg(data, "size"), **_place(data))


@route("POST", "/v1/images/resize", "resize: grow (or shrink with shrink=true)",
       body={"address": ADDRESS, "size": SIZE, "shrink": FLAG}, required=("address", "size"))
async def resize(svc: Service, req: ApiRequest) -> Any:
    data = req.data
    return await svc.resize(_arg(data, "address"), _arg(data, "size"), caller_of(req),
                            shrink=_flag(data.get("shrink", False)))


@route("POST", "/v1/images/delete", "delete: remove an image (refused while attached)",
       body={"address": ADDRESS}, required=("address",), ok=(204,))
async def delete(svc: Service, req: ApiRequest) -> Any:
    await svc.delete(_arg(req.data, "address"), caller_of(req))
    return Response(204)


@route("GET", "/v1/images/size", "get-size: the image's size in bytes",
       query={"address": ADDRESS}, required=("address",))
async def get_size(svc: Service, req: Request) -> Any:
    return {"size": svc.get_size(_arg(req.query, "address"), caller_of(req))}


@route("GET", "/v1/images/info", "An image's attributes and attachments",
       query={"address": ADDRESS}, required=("address",))
async def info(svc: Service, req: Request) -> Any:
    return await svc.image_info(_arg(req.query, "address"), caller_of(req))


@route("POST", "/v1/images/clone", "clone: COW/reflink inside a backend, a copy across; dst "
       "auto:PATH places it", body={"src": ADDRESS, "dst": ADDRESS, **PLACE}, required=("src", "dst"),
       ok=(201,))
async def clone(svc: Service, req: ApiRequest) -> Any:
    data = req.data
    return Response.json(await svc.clone(_arg(data, "src"), _arg(data, "dst"), caller_of(req),
                                         place=_place(data)), 201)


@route("POST", "/v1/images/attach", "attach: record an image in use at a path on a host; "
       "native: the hypervisor uses the image's own path (the answer carries it, as /source)",
       body={"address": ADDRESS, "path": LINK, "host": HOST, "native": FLAG, "takeover": FLAG,
             "dev": DEV}, required=("address", "path"), ok=(201,))
async def attach(svc: Service, req: ApiRequest) -> Any:
    data = req.data
    return Response.json(await svc.attach(
        _arg(data, "address"), _arg(data, "path"), caller_of(req), data.get("host"),
        native=_flag(data.get("native")), takeover=_flag(data.get("takeover")),
        dev=data.get("dev") or "vda"), 201)


@route("POST", "/v1/images/detach", "detach: forget an attachment",
       body={"address": ADDRESS, "path": LINK, "host": HOST}, required=("address", "path"), ok=(204,))
async def detach(svc: Service, req: ApiRequest) -> Any:
    data = req.data
    await svc.detach(_arg(data, "address"), _arg(data, "path"), caller_of(req), data.get("host"))
    return Response(204)


@route("GET", "/v1/images/data", "read / get: stream the image's bytes",
       query={"address": ADDRESS}, required=("address",))
async def read(svc: Service, req: Request) -> Any:
    of = await svc.open_address(_arg(req.query, "address"), caller_of(req), writable=False)
    size = of.image.size

    async def chunks() -> AsyncIterator[bytes]:
        try:
            done = 0
            while done < size:
                for chunk in await read_chunks(svc, of, done, size - done):
                    if not chunk:
                        raise err.Tm2Error("image ended before its size")
                    done += len(chunk)
                    yield chunk
        finally:
            with trio.CancelScope(shield=True):
                await svc.release(of)

    return Response(200, chunks(), "application/octet-stream", length=size)


@route("PUT", "/v1/images/data", "write (replace, creating if missing) / push (new image only)",
       query={"address": ADDRESS, "mode": {"type": "string", "enum": ["write", "push"]},
              "size": {**SIZE, "description": "what placement reserves for a new image"}, **PLACE},
       required=("address",), raw=True, ok=(200, 201))
async def write(svc: Service, req: Request) -> Any:
    address = _arg(req.query, "address")
    mode = req.query.get("mode", "write")
    if mode not in ("write", "push"):
        raise err.InvalidArgument(f"mode {mode!r} is not write or push")
    caller = caller_of(req)
    push = mode == "push"
    size = parse_size(req.query.get("size") or 0)  # what placement reserves for a new image
    # the bytes go to a hidden image, named (or swapped in) only once complete and synced
    up = await svc.open_upload(address, caller, push, size, _place(req.query))
    done = 0
    try:
        buf = bytearray()
        batch: list[bytes] = []  # the bounded queue: STREAM_DEPTH chunks, then written at once
        async for chunk in req.body:
            buf += chunk
            if len(buf) >= COPY_CHUNK:
                batch.append(bytes(buf))
                buf.clear()
                if len(batch) == STREAM_DEPTH:
                    done = await write_chunks(svc, up.file, done, batch)
                    batch.clear()
        done = await write_chunks(svc, up.file, done, [*batch, bytes(buf)])
    except BaseException:
        with trio.CancelScope(shield=True):
            await svc.abort_upload(up)
        raise
    address = await svc.finish_upload(up, done)
    return Response.json(await svc.image_info(address, caller), 201 if push else 200)


@route("POST", "/v1/images/break-lease", "Break the write lease of a host that died holding it",
       body={"address": ADDRESS, "force": FLAG}, required=("address",))
async def break_lease(svc: Service, req: ApiRequest) -> Any:
    data = req.data
    return await svc.break_lease(_arg(data, "address"), caller_of(req), force=_flag(data.get("force")))


@route("GET", "/v1/hosts", "The hosts sharing the pool: heartbeat, leases, each one's view of "
       "the backends")
async def list_hosts(svc: Service, req: Request) -> Any:
    return await svc.list_hosts()


@route("GET", "/v1/images/localpath", "Where the image's bytes are on this host, if anywhere",
       query={"address": ADDRESS}, required=("address",))
async def local_path(svc: Service, req: Request) -> Any:
    return {"path": svc.local_path(_arg(req.query, "address"), caller_of(req))}


@route("GET", "/v1/images/source", "How a hypervisor on this host reaches the image natively: "
       "SOURCE (JSON), QEMU (a -blockdev argument), LIBVIRT (a <disk> element)",
       query={"address": ADDRESS, "dev": DEV}, required=("address",))
async def source(svc: Service, req: Request) -> Any:
    return svc.source(_arg(req.query, "address"), caller_of(req), req.query.get("dev") or "vda")


@route("GET", "/v1/health", "The daemon: host, version, mountpoint")
async def health(svc: Service, req: Request) -> Any:
    return {"host": svc.host, "version": __version__, "mountpoint": svc.mountpoint}


@route("GET", "/metrics", "Prometheus metrics: text exposition format (OpenMetrics if the Accept "
       "header asks for it); pool-level figures only, as `onestoragebackend list` shows everyone")
async def scrape(svc: Service, req: Request) -> Any:
    body, content_type = metrics.exposition(await svc.pool_figures(), req.headers.get("accept", ""))
    return Response(200, body, content_type)


@route("GET", "/openapi.json", "This description")
async def openapi(svc: Service, req: Request) -> Any:
    return openapi_document()


ERROR: Schema = {"type": "object", "required": ["error", "message"],
                 "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                                "hint": {"type": ["string", "null"]}}}
JSON_ANSWER = {"application/json": {"schema": {"type": ["object", "array"]}}}
RAW = {"application/octet-stream": {"schema": {"type": "string",
                                               "contentMediaType": "application/octet-stream"}}}
TEXT = {"text/plain": {"schema": {"type": "string"}},
        "application/openmetrics-text": {"schema": {"type": "string"}}}


def openapi_document() -> dict[str, Any]:
    failed = {"description": "refused or failed: {error, message, hint}",
              "content": {"application/json": {"schema": ERROR}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        responses: dict[str, Any] = {}
        for status in r.ok:
            responses[str(status)] = {"description": "success"}
            if status != 204:
                responses[str(status)]["content"] = (RAW if r.func is read else TEXT
                                                     if r.func is scrape else JSON_ANSWER)
        responses["4XX"] = responses["5XX"] = failed
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.func.__name__,
                              "responses": responses}
        params = [{"name": n, "in": "path", "required": True, "schema": STRING}
                  for n in re.findall(r"\{(\w+)\}", r.pattern)]
        params += [{"name": n, "in": "query", "required": n in r.required, "schema": schema}
                   for n, schema in r.query.items()]
        if params:
            op["parameters"] = params
        schema = r.body_schema
        if r.raw:
            op["requestBody"] = {"required": True, "content": RAW}
        elif schema is not None:
            op["requestBody"] = {"required": bool(schema.get("required")),
                                 "content": {"application/json": {"schema": schema}}}
        paths.setdefault(r.pattern, {})[r.method.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": "tm2fs control API", "version": __version__},
            "paths": paths}


def tm2_error(e: BaseException) -> err.Tm2Error | None:
    """The Tm2Error a request failed with, if it failed with one. Trio nurseries (the parallel
    chunk reads and writes of a stream) wrap errors in ExceptionGroups: a group whose every leaf
    is a Tm2Error answers as its first leaf (e.g. NoSpace: 507); any other group is a bug."""
    if isinstance(e, err.Tm2Error):
        return e
    if isinstance(e, BaseExceptionGroup):
        errors, others = e.split(err.Tm2Error)
        if errors is not None and others is None:
            leaf: BaseException = errors
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, err.Tm2Error) else None
    return None


def error_response(req: Request, e: Exception) -> Response | None:
    """The answer to a request that failed with `e`: the Tm2Error's status and JSON body, or
    None when `e` is no Tm2Error (nor a group of them)."""
    error = tm2_error(e)
    if error is None:
        return None
    if error.status >= 500:
        log.error("%s %s: %s", req.method, req.path, error.message)
    return Response.json(error.to_dict(), error.status)


METHODS = frozenset(r.method for r in ROUTES) | {"HEAD", "OPTIONS"}  # the metrics' method labels


def counted(method: str, route: str, start: float, status: int) -> None:
    """One answered request in the metrics; any other method is `other` (a bounded label)."""
    method = method if method in METHODS else "other"
    metrics.API_REQUESTS.labels(method, route, str(status)).inc()
    metrics.API_SECONDS.labels(method, route).observe(time.perf_counter() - start)


def make_handler(svc: Service) -> Callable[[Request], Awaitable[Response]]:
    compiled = [(r, r.regex) for r in ROUTES]

    async def handle(req: Request) -> Response:
        start = time.perf_counter()
        allowed = []
        for r, regex in compiled:
            m = regex.match(req.path)
            if m is None:
                continue
            if r.method != req.method:
                allowed.append(r.method)
                continue
            response: Response | None
            try:
                result = await r.func(svc, await checked(r, req), **m.groupdict())
                response = result if isinstance(result, Response) else Response.json(result)
            except Exception as e:
                response = error_response(req, e)
                if response is None:  # a bug: the server logs it and answers 500
                    counted(req.method, r.pattern, start, 500)
                    raise
            counted(req.method, r.pattern, start, response.status)
            return response
        response = unrouted(req, allowed)
        counted(req.method, metrics.UNMATCHED, start, response.status)
        return response

    return handle


def unrouted(req: Request, allowed: list[str]) -> Response:
    """405 if another method has the path, else 404."""
    if allowed:
        response = Response.json({"error": "invalid_argument",
                                  "message": f"{req.method} not allowed on {req.path}"}, 405)
        response.headers.append(("allow", ", ".join(allowed)))
        return response
    return Response.json({"error": "not_found", "message": f"no route {req.path}",
                          "hint": "GET /openapi.json lists the routes"}, 404)


async def serve(svc: Service, socket_path: str, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The daemon's entry point: serve until cancelled."""
    await serve_unix(socket_path, make_handler(svc), task_status=task_status)


async def serve_metrics(svc: Service, host: str, port: int, *,
                        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """`--metrics-listen`: GET /metrics on TCP, for a Prometheus server elsewhere, and nothing
    else. On the trio loop, like the socket: a scrape reads the in-memory pool, which only the
    loop may touch (prometheus_client's own server would collect in its thread)."""

    async def handle(req: Request) -> Response:
        if req.path != "/metrics":
            return Response.json({"error": "not_found", "message": "only /metrics is served "
                                  "here"}, 404)
        if req.method != "GET":
            return unrouted(req, ["GET"])
        return await scrape(svc, req)

    await serve_tcp(host, port, handle, task_status=task_status)
