"""Python clients of the semsearch gRPC service: `SearchClient` (blocking) and `AsyncSearchClient` (asyncio).

    with SearchClient("search.internal:50051", api_key=key, tls_ca_file="ca.pem") as client:
        client.upsert(documents=[{"id": "refund", "text": "如何申请退款？", "metadata": {"category": "refund"}}])
        response = client.search(query="退钱怎么操作？", top_k=5)

Each method takes either a request message or its fields as keyword arguments (any field of the
message, so fields added to the .proto work unchanged; nested messages may be dicts, enums their
names) and returns the response message. Errors are `grpc.RpcError` with the service's status code.

`timeout` is the deadline of one method call, retries included. Retries are gRPC's own (the
channel's service config, gRFC A6), not a loop here: UNAVAILABLE (the service restarting or still
loading its model, a connection refused) and RESOURCE_EXHAUSTED (a full queue, a key over its rate
limit) are retried with jittered exponential backoff, up to `max_attempts` attempts (gRPC allows at
most 5), and when the service answers with `grpc-retry-pushback-ms` the next attempt waits exactly
that long (a negative value: do not retry). `wait_for_ready=True` makes a call wait for the service
to come up (a restart, a rollout) within its deadline instead of failing at once. Every RPC is safe
to retry: searches read, upserts are idempotent by id, deletes by id remove what is there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import Message

from semsearch.config import Settings
from semsearch.v1 import admin_pb2, admin_pb2_grpc, search_pb2, search_pb2_grpc

__all__ = ["AsyncSearchClient", "SearchClient", "TlsFileError", "is_unavailable", "retry_service_config",
           "status_of"]

M = TypeVar("M", bound=Message)
Metadata = Sequence[tuple[str, str]]


class TlsFileError(ValueError):
    """A TLS file that cannot be read, or half a client certificate; the message names the setting."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, details) of a failed call: sync errors are grpc.Call, asyncio ones AioRpcError (not a Call)."""
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    return None


def is_unavailable(exc: BaseException) -> bool:
    status = status_of(exc)
    return status is not None and status[0] == grpc.StatusCode.UNAVAILABLE


def _read(setting: str, source: str | Path | bytes | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise TlsFileError(setting, f"{setting} {source}: {exc.strerror or exc}") from exc


def channel_credentials(tls_ca_file: str | Path | bytes | None = None,
                        tls_client_cert_file: str | Path | bytes | None = None,
                        tls_client_key_file: str | Path | bytes | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: the CA that signed the service's certificate (None: the system's roots), and a
    client certificate and key for mutual TLS. Paths or PEM bytes."""
    if (tls_client_cert_file is None) != (tls_client_key_file is None):
        missing = "tls_client_key_file" if tls_client_key_file is None else "tls_client_cert_file"
        raise TlsFileError(missing, "mutual TLS needs both tls_client_cert_file and tls_client_key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read("tls_ca_file", tls_ca_file),
        private_key=_read("tls_client_key_file", tls_client_key_file),
        certificate_chain=_read("tls_client_cert_file", tls_client_cert_file),
    )


SERVICES = ("semsearch.v1.SearchService", "semsearch.v1.AdminService")
RETRY_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
MAX_GRPC_ATTEMPTS = 5  # gRPC lowers any larger maxAttempts to 5


def retry_service_config(max_attempts: int = 5, base_s: float = 0.1, max_wait_s: float = 2.0,
                         codes: Sequence[str] = RETRY_CODES, wait_for_ready: bool = False) -> str:
    """The `grpc.service_config` of the clients' channels: gRPC retries `codes` itself (backoff
    min(max_wait_s, base_s * 2^n), each wait drawn at random below it; the server's
    grpc-retry-pushback-ms replaces the wait, or stops the retries when negative)."""
    method: dict[str, Any] = {"name": [{"service": service} for service in SERVICES],
                              "waitForReady": wait_for_ready}
    attempts = min(max_attempts, MAX_GRPC_ATTEMPTS)
    if attempts > 1 and codes:  # a retryPolicy needs maxAttempts >= 2: one attempt means none
        method["retryPolicy"] = {"maxAttempts": attempts, "initialBackoff": f"{base_s:g}s",
                                 "maxBackoff": f"{max_wait_s:g}s", "backoffMultiplier": 2,
                                 "retryableStatusCodes": list(codes)}
    return json.dumps({"methodConfig": [method]})


# Each RPC: the stub attribute that carries it and its request message.
RPCS: dict[str, tuple[str, type[Message]]] = {
    "SearchDocuments": ("_search", search_pb2.SearchDocumentsRequest),
    "BatchSearchDocuments": ("_search", search_pb2.BatchSearchDocumentsRequest),
    "UpsertDocuments": ("_search", search_pb2.UpsertDocumentsRequest),
    "DeleteDocuments": ("_search", search_pb2.DeleteDocumentsRequest),
    "GetDocument": ("_search", search_pb2.GetDocumentRequest),
    "Embed": ("_search", search_pb2.EmbedRequest),
    "Rerank": ("_search", search_pb2.RerankRequest),
    "GetServingState": ("_admin", admin_pb2.GetServingStateRequest),
    "ReloadServingState": ("_admin", admin_pb2.ReloadServingStateRequest),
    "DescribeCollection": ("_admin", admin_pb2.DescribeCollectionRequest),
}


class _ClientBase:
    """What both clients share: the target, credentials, metadata, deadline and retry policy."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        tls_ca_file: str | Path | bytes | None = None,
        tls_client_cert_file: str | Path | bytes | None = None,
        tls_client_key_file: str | Path | bytes | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = 30.0,
        max_attempts: int = 5,
        retry_base_s: float = 0.1,
        retry_max_wait_s: float = 2.0,
        retry_codes: Sequence[str] = RETRY_CODES,
        wait_for_ready: bool = False,
        metadata: Metadata = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata: list[tuple[str, str]] = list(metadata)
        if api_key is not None:
            self.metadata.append(("authorization", f"Bearer {api_key}"))
        # TLS when asked for, or when any TLS file is given (as `semsearch search` decides).
        use_tls = tls if tls is not None else any(
            f is not None for f in (tls_ca_file, tls_client_cert_file, tls_client_key_file))
        self.credentials = (channel_credentials(tls_ca_file, tls_client_cert_file, tls_client_key_file)
                            if use_tls else None)
        self.options = list(options)
        if not any(name == "grpc.service_config" for name, _ in self.options):  # the caller's own wins
            self.options += [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(
                max_attempts, retry_base_s, retry_max_wait_s, retry_codes, wait_for_ready))]
        if tls_server_name:
            self.options.append(("grpc.ssl_target_name_override", tls_server_name))

    @classmethod
    def from_settings(cls, settings: Settings, target: str | None = None, **kwargs: Any) -> Self:
        """A client configured like `semsearch search`: api_key and tls_* settings, `addr` as the target
        (never host/port: those are where `serve` binds)."""
        return cls(
            target or settings.addr or f"127.0.0.1:{Settings.model_fields['port'].default}",
            api_key=settings.api_key.get_secret_value() if settings.api_key is not None else None,
            tls_ca_file=settings.tls_ca_file, tls_client_cert_file=settings.tls_client_cert_file,
            tls_client_key_file=settings.tls_client_key_file, tls_server_name=settings.tls_server_name,
            **kwargs,
        )

    @staticmethod
    def _request(cls: type[M], request: M | None, fields: dict[str, Any]) -> M:
        if request is not None:
            if fields:
                raise TypeError(f"pass a {cls.__name__} or its fields, not both")
            if not isinstance(request, cls):
                raise TypeError(f"expected a {cls.__name__}, got {type(request).__name__}")
            return request
        return cls(**fields)

    def _invoke(self, rpc: str, request: Message | None, fields: dict[str, Any], timeout: float | None,
                metadata: Metadata) -> Any:
        """One call, for both clients: the response (blocking stub) or an awaitable of it (grpc.aio).
        gRPC retries it within the deadline (the channel's service config)."""
        stub, request_class = RPCS[rpc]
        message = self._request(request_class, request, fields)
        timeout = self.timeout if timeout is None else timeout
        return getattr(getattr(self, stub), rpc)(message, timeout=timeout, metadata=[*self.metadata, *metadata])


class SearchClient(_ClientBase):
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.channel: grpc.Channel = (grpc.secure_channel(target, self.credentials, options=self.options)
                                      if self.credentials is not None
                                      else grpc.insecure_channel(target, options=self.options))
        self._search = search_pb2_grpc.SearchServiceStub(self.channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def search(self, request: search_pb2.SearchDocumentsRequest | None = None, /, *, timeout: float | None = None,
               metadata: Metadata = (), **fields: Any) -> search_pb2.SearchDocumentsResponse:
        return self._invoke("SearchDocuments", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    def batch_search(self, request: search_pb2.BatchSearchDocumentsRequest | None = None, /, *,
                     timeout: float | None = None, metadata: Metadata = (),
                     **fields: Any) -> search_pb2.BatchSearchDocumentsResponse:
        return self._invoke("BatchSearchDocuments", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    def upsert(self, request: search_pb2.UpsertDocumentsRequest | None = None, /, *, timeout: float | None = None,
               metadata: Metadata = (), **fields: Any) -> search_pb2.UpsertDocumentsResponse:
        return self._invoke("UpsertDocuments", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    def delete(self, request: search_pb2.DeleteDocumentsRequest | None = None, /, *, timeout: float | None = None,
               metadata: Metadata = (), **fields: Any) -> search_pb2.DeleteDocumentsResponse:
        return self._invoke("DeleteDocuments", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    def get(self, request: search_pb2.GetDocumentRequest | str | None = None, /, *, timeout: float | None = None,
            metadata: Metadata = (), **fields: Any) -> search_pb2.GetDocumentResponse:
        """`get("doc-id")`, `get(id="doc-id")` or `get(GetDocumentRequest(...))`."""
        if isinstance(request, str):
            request, fields = None, {"id": request, **fields}
        return self._invoke("GetDocument", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    def embed(self, request: search_pb2.EmbedRequest | None = None, /, *, timeout: float | None = None,
              metadata: Metadata = (), **fields: Any) -> search_pb2.EmbedResponse:
        """The serving model's vectors: `embed(input=[...], input_type="INPUT_TYPE_QUERY")` for queries."""
        return self._invoke("Embed", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    def rerank(self, request: search_pb2.RerankRequest | None = None, /, *, timeout: float | None = None,
               metadata: Metadata = (), **fields: Any) -> search_pb2.RerankResponse:
        return self._invoke("Rerank", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    def serving_state(self, *, timeout: float | None = None,
                      metadata: Metadata = ()) -> admin_pb2.GetServingStateResponse:
        return self._invoke("GetServingState", None, {}, timeout, metadata)  # type: ignore[no-any-return]

    def reload_serving_state(self, *, timeout: float | None = None,
                             metadata: Metadata = ()) -> admin_pb2.ReloadServingStateResponse:
        return self._invoke("ReloadServingState", None, {}, timeout, metadata)  # type: ignore[no-any-return]

    def describe_collection(self, *, timeout: float | None = None,
                            metadata: Metadata = ()) -> admin_pb2.DescribeCollectionResponse:
        return self._invoke("DescribeCollection", None, {}, timeout, metadata)  # type: ignore[no-any-return]


class AsyncSearchClient(_ClientBase):
    """asyncio client (grpc.aio). Create it inside the event loop that uses it; `async with` or `await close()`."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.channel: grpc.aio.Channel = (
            grpc.aio.secure_channel(target, self.credentials, options=self.options)
            if self.credentials is not None else grpc.aio.insecure_channel(target, options=self.options))
        self._search = search_pb2_grpc.SearchServiceStub(self.channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def __aenter__(self) -> AsyncSearchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def search(self, request: search_pb2.SearchDocumentsRequest | None = None, /, *,
                     timeout: float | None = None, metadata: Metadata = (),
                     **fields: Any) -> search_pb2.SearchDocumentsResponse:
        return await self._invoke("SearchDocuments", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    async def batch_search(self, request: search_pb2.BatchSearchDocumentsRequest | None = None, /, *,
                           timeout: float | None = None, metadata: Metadata = (),
                           **fields: Any) -> search_pb2.BatchSearchDocumentsResponse:
        return await self._invoke("BatchSearchDocuments", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    async def upsert(self, request: search_pb2.UpsertDocumentsRequest | None = None, /, *,
                     timeout: float | None = None, metadata: Metadata = (),
                     **fields: Any) -> search_pb2.UpsertDocumentsResponse:
        return await self._invoke("UpsertDocuments", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    async def delete(self, request: search_pb2.DeleteDocumentsRequest | None = None, /, *,
                     timeout: float | None = None, metadata: Metadata = (),
                     **fields: Any) -> search_pb2.DeleteDocumentsResponse:
        return await self._invoke("DeleteDocuments", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    async def get(self, request: search_pb2.GetDocumentRequest | str | None = None, /, *,
                  timeout: float | None = None, metadata: Metadata = (),
                  **fields: Any) -> search_pb2.GetDocumentResponse:
        if isinstance(request, str):
            request, fields = None, {"id": request, **fields}
        return await self._invoke("GetDocument", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    async def embed(self, request: search_pb2.EmbedRequest | None = None, /, *, timeout: float | None = None,
                    metadata: Metadata = (), **fields: Any) -> search_pb2.EmbedResponse:
        return await self._invoke("Embed", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    async def rerank(self, request: search_pb2.RerankRequest | None = None, /, *, timeout: float | None = None,
                     metadata: Metadata = (), **fields: Any) -> search_pb2.RerankResponse:
        return await self._invoke("Rerank", request, fields, timeout, metadata)  # type: ignore[no-any-return]

    async def serving_state(self, *, timeout: float | None = None,
                            metadata: Metadata = ()) -> admin_pb2.GetServingStateResponse:
        return await self._invoke("GetServingState", None, {}, timeout, metadata)  # type: ignore[no-any-return]

    async def reload_serving_state(self, *, timeout: float | None = None,
                                   metadata: Metadata = ()) -> admin_pb2.ReloadServingStateResponse:
        return await self._invoke("ReloadServingState", None, {}, timeout, metadata)  # type: ignore[no-any-return]

    async def describe_collection(self, *, timeout: float | None = None,
                                  metadata: Metadata = ()) -> admin_pb2.DescribeCollectionResponse:
        return await self._invoke("DescribeCollection", None, {}, timeout, metadata)  # type: ignore[no-any-return]
