"""HTTP/JSON beside gRPC, in the same process: a thin transport shell over the gRPC service.

Each HTTP request is parsed into the RPC's request message (proto3 JSON mapping; an unknown field or
bad JSON is 400 before anything runs) and sent to the gRPC server itself over an in-process channel
(a Unix socket in a private directory) with the caller's `authorization` / `x-api-key` header as
metadata. Authentication, scopes, validation, limits, metrics, logs and errors are therefore the
gRPC ones by construction; the gateway only maps the status code to an HTTP status
(service/http_api.py). The HTTP port uses the gRPC port's TLS settings (certificate, and client
certificates when `tls_client_ca_file` is set); the hop behind it never leaves the process's host
and needs no TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import ssl
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
import structlog
import uvicorn
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from semsearch.config import Settings
from service import openai_api
from service.console import console_routes
from service.http_api import ROUTES, HttpRoute, error_body, http_status
from service.openapi import packaged_document

log = structlog.get_logger(__name__)

# Headers passed on as gRPC metadata: the credentials and the request id the logs carry.
FORWARDED_HEADERS = ("authorization", "x-api-key", "x-request-id")
GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")  # the gRPC spec: at most 8 digits
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# Longer timeouts are clamped to this (~3.2 years), as grpc-go clamps: gRPC Python's deadline
# (nanoseconds since the epoch) overflows past ~7e9 s and fails the call at once.
MAX_TIMEOUT_S = 99_999_999.0
# JSON nested deeper than this is refused (400) before protobuf sees it: json.loads recurses and
# dies with RecursionError near 1,000 levels; no request message needs more than a few levels.
MAX_JSON_DEPTH = 64


class BadRequest(Exception):
    """Input the gateway refuses before calling the service (bad JSON, unknown field)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
                 http: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http = http


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status_code=status, headers=headers,
                    media_type="application/json")


def message_to_json(message: Message) -> dict[str, Any]:
    # Defaults included: `{"deletedCount": 0}` rather than `{}`, `"hits": []` rather than nothing.
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def parse_timeout(value: str | None) -> float | None:
    """The `grpc-timeout` header (as grpc-gateway reads it): `5S`, `200m`..."""
    if value is None:
        return None
    match = GRPC_TIMEOUT.match(value.strip())
    if match is None:
        raise BadRequest(f"grpc-timeout {value!r}: expected digits and a unit (H, M, S, m, u, n), e.g. 5S or 200m")
    return min(int(match.group(1)) * TIMEOUT_UNITS[match.group(2)], MAX_TIMEOUT_S)


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json_body(body: bytes) -> Any:
    too_deep = BadRequest(f"the body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels (the gateway's limit)")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError:
        raise too_deep from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    return data


def _field(message: Message, name: str) -> FieldDescriptor | None:
    descriptor: Any = message.DESCRIPTOR  # upb's and the pure-Python descriptor types differ in the stubs
    fields: list[FieldDescriptor] = list(descriptor.fields)
    return next((field for field in fields if name in (field.name, field.json_name)), None)


def _query_value(field: FieldDescriptor | None, value: str) -> Any:
    # Query strings are text; proto3 JSON wants true/false unquoted for bools.
    if field is not None and field.type == FieldDescriptor.TYPE_BOOL and value in ("true", "false"):
        return value == "true"
    return value


def build_request(route: HttpRoute, body: bytes, path_params: dict[str, str],
                  query: list[tuple[str, str]]) -> Message:
    """The request message from the JSON body, then query parameters, then path parameters (which win)."""
    request = route.request_class()()
    data: dict[str, Any] = {}
    if route.has_body and body.strip():
        data = parse_json_body(body)
        if not isinstance(data, dict):
            raise BadRequest(f"the body must be a JSON object (a {request.DESCRIPTOR.name} in the proto3 JSON "
                             f"mapping), not a {type(data).__name__}")
    for name, value in query:
        field = _field(request, name)
        if field is not None and field.is_repeated:
            data.setdefault(name, []).append(_query_value(field, value))
        elif name in data:
            raise BadRequest(f"{name!r} is given twice (query parameter and body, or a repeated query parameter)")
        else:
            data[name] = _query_value(field, value)
    data.update(path_params)
    try:
        json_format.ParseDict(data, request)
    except json_format.ParseError as exc:
        # ParseError's message names the field and the message type; the hint lists the fields.
        raise BadRequest(str(exc).replace("\n", " ").strip()) from exc
    return request


def retry_details(trailing: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, list[dict[str, Any]]]:
    """Retry-After (seconds) and a google.rpc.RetryInfo detail from the `retry-after` / `retry-after-ms`
    trailing metadata the service sends with RESOURCE_EXHAUSTED."""
    values = {key: value for key, value in (trailing or ()) if isinstance(value, str)}
    seconds = values.get("retry-after")
    millis = values.get("retry-after-ms")
    delay_s: float | None = None
    with contextlib.suppress(ValueError):
        delay_s = int(millis) / 1000 if millis is not None else (float(seconds) if seconds is not None else None)
    if delay_s is None:
        return seconds, []
    header = seconds if seconds is not None else str(max(1, math.ceil(delay_s)))
    return header, [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay_s:.3f}s"}]


def error_response(code: grpc.StatusCode, message: str, trailing: Iterable[tuple[str, str | bytes]] | None = None,
                   http: int | None = None, headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    details: list[dict[str, Any]] = []
    if code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="semsearch"'
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        retry_after, details = retry_details(trailing)
        if retry_after is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry_after = "1"  # a queue or limit is full: tell clients to back off rather than hammer
        if retry_after is not None:
            headers["Retry-After"] = retry_after
    status = http or http_status(code)
    return json_response(error_body(code, message, details, status), status, headers)


def cors_middleware(origins: Sequence[str]) -> list[Middleware]:
    """Browsers may call the API from `origins` only (none by default: no CORS headers at all). The
    credentials are the API key headers, never cookies, so no Allow-Credentials."""
    if not origins:
        return []
    return [Middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                       allow_headers=[*FORWARDED_HEADERS, "content-type", "grpc-timeout"],
                       expose_headers=["retry-after", "www-authenticate"], max_age=600)]


class Gateway:
    """The ASGI app: routes → RPCs over `channel` (the in-process hop to the gRPC server)."""

    def __init__(self, channel: grpc.aio.Channel, *, max_body_bytes: int, cors_origins: Sequence[str] = (),
                 console: bool = True, body_timeout_s: float = 60.0) -> None:
        self.channel = channel
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.openapi = packaged_document()
        self.health = health_pb2_grpc.HealthStub(channel)
        routes = [Route(route.path, self._endpoint(route), methods=[route.http_method],
                        name=route.operation_id) for route in ROUTES]
        routes += [Route("/healthz", self.healthz, methods=["GET"]),
                   Route("/openapi.json", self.openapi_json, methods=["GET"])]
        routes += openai_api.routes(self)  # POST /v1/embeddings (OpenAI shape), POST /v1/rerank (TEI/Cohere)
        routes += console_routes() if console else []  # last: API routes match first
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self.http_error},
                             middleware=cors_middleware(cors_origins))

    async def read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BadRequest(f"the body is {declared} bytes, over max_message_bytes ({self.max_body_bytes})",
                             grpc.StatusCode.RESOURCE_EXHAUSTED, http=413)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):  # a trickling client holds a connection
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise BadRequest(f"the body is over max_message_bytes ({self.max_body_bytes})",
                                         grpc.StatusCode.RESOURCE_EXHAUSTED, http=413)
                    chunks.append(chunk)
        except TimeoutError:
            raise BadRequest(f"the body did not arrive within http_body_timeout_s ({self.body_timeout_s:g} s)",
                             grpc.StatusCode.DEADLINE_EXCEEDED, http=408) from None
        return b"".join(chunks)

    def _endpoint(self, route: HttpRoute) -> Any:
        call = self.channel.unary_unary(
            route.grpc_path, request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=route.response_class().FromString,
        )

        async def endpoint(request: Request) -> Response:
            try:
                body = await self.read_body(request) if route.has_body else b""
                message = build_request(route, body, dict(request.path_params),
                                        list(request.query_params.multi_items()))
                timeout = parse_timeout(request.headers.get("grpc-timeout"))
            except BadRequest as exc:
                # A body left unread (too big, too slow) ends the connection: it cannot carry another request.
                close = {"connection": "close"} if exc.http in (408, 413) else None
                return error_response(exc.code, str(exc), http=exc.http, headers=close)
            metadata = grpc.aio.Metadata(*((name, request.headers[name]) for name in FORWARDED_HEADERS
                                           if name in request.headers))
            try:
                response = await call(message, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                trailing: Any = exc.trailing_metadata()  # grpc.aio.Metadata: (key, value) pairs
                return error_response(exc.code(), exc.details() or exc.code().name, trailing)
            return json_response(message_to_json(response))

        return endpoint

    async def healthz(self, request: Request) -> Response:
        try:
            answer = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return json_response({"status": "NOT_SERVING", "message": exc.details() or exc.code().name}, 503)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        serving = answer.status == health_pb2.HealthCheckResponse.SERVING
        return json_response({"status": status}, 200 if serving else 503)

    async def openapi_json(self, request: Request) -> Response:
        return Response(self.openapi, media_type="application/json")

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_response(grpc.StatusCode.NOT_FOUND, f"no route {request.url.path}", http=404)
        if exc.status_code == 405:
            # RFC 9110: a 405 lists the methods the resource supports (starlette puts them in `Allow`).
            return error_response(grpc.StatusCode.UNIMPLEMENTED, f"{request.method} is not allowed on "
                                  f"{request.url.path}", http=405, headers=dict(exc.headers or {}))
        return error_response(grpc.StatusCode.UNKNOWN, str(exc.detail), http=exc.status_code)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the service's event loop: the service owns SIGTERM/SIGINT and the drain order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def raw_error(status: int, code: grpc.StatusCode, message: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for the protocol layer (no ASGI app)."""
    body = json.dumps(error_body(code, message, http=status), ensure_ascii=False).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    response = error_response(grpc.StatusCode.UNAVAILABLE, "too many open HTTP connections "
                              "(http_max_connections); retry later",
                              headers={"connection": "close", "retry-after": "1"})
    await response(scope, receive, send)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with what it lacks against hostile clients: a deadline for each
    request's head (uvicorn waits forever for the first one, and any byte restarts its keep-alive
    wait), and a cap on open connections (uvicorn's limit_concurrency answers in plain text)."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            if len(self.connections) > max_connections:
                self.app = _too_many_connections  # read the request's head, answer 503, close
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()  # the next request's head, on a kept-alive connection

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being served: its body has http_body_timeout_s, the RPC its deadline
            if not self.transport.is_closing():
                self.transport.write(raw_error(408, grpc.StatusCode.DEADLINE_EXCEEDED, "no request head within "
                                               f"http_header_timeout_s ({header_timeout_s:g} s)"))
                self.transport.close()

    return GuardedH11Protocol


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """The gateway on `settings.host:settings.http_port`, served by uvicorn on the running loop."""

    def __init__(self, settings: Settings, grpc_target: str) -> None:
        self.settings = settings
        options = [("grpc.max_receive_message_length", settings.max_message_bytes),
                   ("grpc.max_send_message_length", settings.max_message_bytes)]
        self.channel = grpc.aio.insecure_channel(grpc_target, options=options)
        self.gateway = Gateway(self.channel, max_body_bytes=settings.max_message_bytes,
                               cors_origins=settings.http_cors_origins, console=settings.http_console,
                               body_timeout_s=settings.http_body_timeout_s)
        self.port = 0
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        settings = self.settings
        assert settings.http_port
        try:
            sock = bind(settings.host, settings.http_port)
        except OSError as exc:  # the CLI prints it after the gRPC address: say which port failed
            raise OSError(f"HTTP port {settings.http_port}: {exc.strerror or exc}") from exc
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.gateway.app, lifespan="off", log_config=None, access_log=False, ws="none",
            http=guarded_protocol(settings.http_header_timeout_s, settings.http_max_connections),
            timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)),
            ssl_certfile=settings.tls_cert_file, ssl_keyfile=settings.tls_key_file,
            ssl_ca_certs=settings.tls_client_ca_file,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_client_ca_file else ssl.CERT_NONE,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-gateway")
        while not self._server.started:
            if self._task.done():  # a bad certificate file, say: raise it here
                self._task.result()
                raise OSError(f"the HTTP server on {settings.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)
        scheme = "https" if settings.tls_cert_file else "http"
        log.info("http_listening", address=f"{scheme}://{settings.host}:{self.port}")
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to shutdown_grace_s), close the hop.
        Runs before the gRPC server stops, so the requests it drains can still reach it."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        await self.channel.close(None)
