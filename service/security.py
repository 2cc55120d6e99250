"""Authentication (API keys with scopes, constant-time comparison) and TLS for the gRPC port."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog

from semsearch.config import SCOPE_ORDER, ApiKey, Settings

log = structlog.get_logger(__name__)

# The scope each method needs; methods not listed (health, reflection) need no key.
REQUIRED_SCOPE: dict[str, str] = {
    "/semsearch.v1.SearchService/SearchDocuments": "search",
    "/semsearch.v1.SearchService/BatchSearchDocuments": "search",
    "/semsearch.v1.SearchService/GetDocument": "search",
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


def _deny(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(deny)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self.keys = list(keys)

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
