"""Authentication (API keys with scopes, constant-time comparison) and TLS for the gRPC port."""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog

from semsearch.config import SCOPE_ORDER, ApiKey, Settings
from semsearch.errors import InvalidInputError, SemsearchError
from semsearch.filters import check_tenant

log = structlog.get_logger(__name__)

# The scope each method needs; methods not listed (health, reflection) need no key.
REQUIRED_SCOPE: dict[str, str] = {
    "/semsearch.v1.SearchService/SearchDocuments": "search",
    "/semsearch.v1.SearchService/BatchSearchDocuments": "search",
    "/semsearch.v1.SearchService/GetDocument": "search",
    "/semsearch.v1.SearchService/Embed": "search",
    "/semsearch.v1.SearchService/Rerank": "search",
    "/semsearch.v1.SearchService/UpsertDocuments": "write",
    "/semsearch.v1.SearchService/DeleteDocuments": "write",
}
ADMIN_PREFIX = "/semsearch.v1.AdminService/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def required_scope(method: str) -> str | None:
    if method.startswith(ADMIN_PREFIX):
        return "admin"
    if method.startswith(OPEN_PREFIXES):
        return None
    return REQUIRED_SCOPE.get(method, "admin")  # unknown methods: the strictest scope


def presented_key(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return None


def find_key(keys: Sequence[ApiKey], presented: str) -> ApiKey | None:
    """Compare against every key in constant time each, so timing tells nothing about near misses."""
    match = None
    candidate = presented.encode("utf-8")
    for api_key in keys:
        if hmac.compare_digest(candidate, api_key.key.get_secret_value().encode("utf-8")):
            match = api_key
    return match


def caller(keys: Sequence[ApiKey], metadata: Sequence[tuple[str, Any]] | None) -> ApiKey | None:
    """The key a call presented (the interceptor has already refused calls without a valid one)."""
    presented = presented_key(metadata)
    return find_key(keys, presented) if keys and presented else None


class TenantDeniedError(SemsearchError):
    status_code = grpc.StatusCode.PERMISSION_DENIED


def tenant_for(key: ApiKey | None, requested: str, where: str = "tenant") -> str:
    """The tenant a call acts on. A key bound to tenants acts only on them, whatever the request
    says; the reason names only the request's own tenant, never what exists elsewhere."""
    check_tenant(requested, where)
    if key is None or not key.tenants:
        return requested
    if not requested:
        if len(key.tenants) == 1:
            return key.tenants[0]
        raise InvalidInputError(f"{where} is required: key {key.name!r} is bound to several tenants")
    if requested not in key.tenants:
        raise TenantDeniedError(f"{where}: key {key.name!r} may not use tenant {requested!r}")
    return requested


class RateLimiter:
    """A token bucket per key: `rate_limit_per_s` calls a second, bursts of `rate_burst`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key name -> (tokens, at)
        self._lock = threading.Lock()

    def wait_s(self, key: ApiKey) -> float:
        """0 when the call may go now (and it is counted), else the seconds until it may."""
        if key.rate_limit_per_s is None:
            return 0.0
        rate = key.rate_limit_per_s
        burst = float(key.rate_burst or max(1, math.ceil(rate)))
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key.name, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key.name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key.name] = (tokens, now)
            return (1.0 - tokens) / rate


def _deny(code: grpc.StatusCode, details: str,
          trailing_metadata: Sequence[tuple[str, str]] = ()) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details, trailing_metadata=tuple(trailing_metadata))

    return grpc.unary_unary_rpc_method_handler(deny)


def retry_after(wait_s: float, retry: bool = True) -> list[tuple[str, str]]:
    """Trailing metadata of a rate-limited call: gRPC's own pushback (gRFC A6), which a client's retry
    policy obeys (the next attempt waits exactly that long; -1: do not retry), and for the HTTP
    gateway whole seconds (HTTP's Retry-After) and milliseconds."""
    millis = str(max(1, math.ceil(wait_s * 1e3)))
    return [("grpc-retry-pushback-ms", millis if retry else "-1"), ("retry-after", str(max(1, math.ceil(wait_s)))),
            ("retry-after-ms", millis)]


def _rate_limited(details: str, wait_s: float) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        # A wait past the caller's deadline cannot end in an answer: tell its retry policy to stop now,
        # so the caller sees this status rather than DEADLINE_EXCEEDED after a pointless wait.
        remaining = context.time_remaining()
        retry = remaining is None or remaining > wait_s
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details,
                            trailing_metadata=tuple(retry_after(wait_s, retry)))

    return grpc.unary_unary_rpc_method_handler(deny)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys = list(keys)
        self.limiter = RateLimiter()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        scope = required_scope(method)
        if scope is None:
            return await continuation(handler_call_details)
        presented = presented_key(handler_call_details.invocation_metadata)  # type: ignore[arg-type]
        if not presented:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "missing API key (authorization: Bearer <key>)")
        api_key = find_key(self.keys, presented)
        if api_key is None:
            log.info("auth_rejected", method=method)  # never the key itself
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        if SCOPE_ORDER[api_key.scope] < SCOPE_ORDER[scope]:
            log.info("auth_forbidden", method=method, key_name=api_key.name, scope=api_key.scope)
            return _deny(grpc.StatusCode.PERMISSION_DENIED, f"key {api_key.name!r} lacks the {scope} scope")
        wait_s = self.limiter.wait_s(api_key)
        if wait_s > 0:
            log.info("rate_limited", method=method, key_name=api_key.name)
            return _rate_limited(f"key {api_key.name!r} is over its rate limit ({api_key.rate_limit_per_s}/s): "
                                 f"retry after {wait_s:.3f} s", wait_s)
        return await continuation(handler_call_details)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS when a client CA is configured too."""
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        if settings.tls_client_ca_file is not None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ValueError("TLS needs both tls_cert_file and tls_key_file")
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)
