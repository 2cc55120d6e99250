"""gRPC transport for semsearch.v1.SearchService: a thin shell over SearchEngine."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError

from semsearch.config import Settings
from semsearch.errors import InvalidInputError, SemsearchError
from semsearch.fusion import Fusion
from semsearch.metrics import RPC_IN_FLIGHT, RPC_LATENCY, RPC_REQUESTS
from semsearch.store import Hit, RetrieverScore
from semsearch.v1 import search_pb2 as pb
from semsearch.v1 import search_pb2_grpc
from service import highlight, validation
from service.embed import EmbedService, embed_response
from service.engine import Reranked, SearchEngine, SearchQuery, SearchResult
from service.paging import Cursor, PageTokens, binding, page_secrets
from service.security import caller, tenant_for

log = structlog.get_logger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def rpc(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Map domain errors to status codes with a reason; never leak a stack trace to the caller."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex[:16])
        method = handler.__name__
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        RPC_IN_FLIGHT.inc()
        with structlog.contextvars.bound_contextvars(request_id=request_id, rpc=method):
            try:
                if isinstance(request, MalformedRequest):
                    raise InvalidInputError(f"malformed request: {request.reason}")
                if self.engine is None:
                    code = grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, "the model is still loading")
                return await handler(self, request, context)
            except SemsearchError as exc:
                code = exc.status_code
                log.info("rpc_rejected", code=code.name, reason=str(exc))
                await context.abort(code, str(exc))
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # the client left or its deadline passed
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc_failed")
                await context.abort(code, f"internal error (request id {request_id})")
            finally:
                RPC_IN_FLIGHT.dec()
                elapsed = time.perf_counter() - started
                RPC_REQUESTS.labels(method=method, code=code.name).inc()
                RPC_LATENCY.labels(method=method, code=code.name).observe(elapsed)
            raise AssertionError("unreachable")  # abort() always raises

    return wrapper


class MalformedRequest:
    """What a request that is not valid protobuf (e.g. invalid UTF-8 in a string) decodes to."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # grpc answers a deserializer exception with a bare INTERNAL; we want INVALID_ARGUMENT.
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return MalformedRequest(str(exc) or "cannot parse the request")

    return deserialize


def add_search_service(servicer: SearchServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_SearchServiceServicer_to_server, with lenient request decoding."""
    service = pb.DESCRIPTOR.services_by_name["SearchService"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=lenient(getattr(pb, method.input_type.name).FromString),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if value:
        json_format.ParseDict(value, message)
    return message


_MODE_ENUMS = {name: value for value, name in validation.MODES.items() if name}
_FUSION_ENUMS = {name: value for value, name in validation.FUSIONS.items()}


def _retriever(score: RetrieverScore) -> pb.RetrieverScore:
    return pb.RetrieverScore(retriever=_MODE_ENUMS[score.retriever], score=score.score, rank=score.rank)


def _hit(hit: Hit, reranked: Reranked | None = None) -> pb.SearchHit:
    message = pb.SearchHit(id=hit.doc_id, score=hit.score, text=hit.text, metadata=_struct(hit.metadata),
                           chunk_index=hit.chunk_index, retrievers=[_retriever(r) for r in hit.retrievers],
                           retrieval_score=hit.score)
    if reranked is not None:
        message.retrieval_score = reranked.retrieval_score
        message.retrieval_rank = reranked.retrieval_rank
        message.rerank_score = reranked.rerank_score
    return message


def _response(result: SearchResult, next_page_token: str = "") -> pb.SearchDocumentsResponse:
    reranked: list[Reranked | None] = [None] * len(result.hits)
    if result.reranked is not None:
        reranked = list(result.reranked)
    return pb.SearchDocumentsResponse(
        hits=[_hit(h, r) for h, r in zip(result.hits, reranked, strict=True)], model_version=result.model_version,
        collection=result.collection,
        timing=pb.SearchTiming(total_ms=result.total_ms, encode_ms=result.encode_ms, store_ms=result.store_ms,
                               rerank_ms=result.rerank_ms),
        mode=_MODE_ENUMS[result.mode], reranker_version=result.reranker_version, next_page_token=next_page_token,
        fusion=_fusion_options(result.fusion), retrieval_source=result.retrieval_source,
    )


def _fusion_options(fusion: Fusion | None) -> pb.FusionOptions | None:
    """The fusion that served a hybrid request, every field filled in (None in other modes)."""
    if fusion is None:
        return None
    return pb.FusionOptions(method=_FUSION_ENUMS[fusion.method], rrf_k=fusion.rrf_k,
                            dense_weight=fusion.dense_weight, lexical_weight=fusion.lexical_weight)


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, settings: Settings, engine: SearchEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.page_tokens = PageTokens(page_secrets(settings), settings.page_token_ttl_s)
        self.embedding = EmbedService(settings)  # Embed / Rerank (/v1/embeddings, /v1/rerank)

    def _tenant(self, context: grpc.aio.ServicerContext, requested: str, where: str = "tenant") -> str:
        """The tenant this call acts on: the request's, within what the caller's key is bound to."""
        key = caller(self.settings.api_keys, context.invocation_metadata())  # type: ignore[arg-type]
        return tenant_for(key, requested, where)

    def _query(self, request: pb.SearchDocumentsRequest, context: grpc.aio.ServicerContext,
               where: str = "") -> tuple[SearchQuery, str]:
        """The typed query (tenant resolved, page token opened) and what its page tokens are bound to."""
        prefix = f"{where}." if where else ""
        tenant = self._tenant(context, request.tenant, f"{prefix}tenant")
        bound_to = binding(request, tenant)
        cursor = (self.page_tokens.open(request.page_token, bound_to, f"{prefix}page_token")
                  if request.page_token else None)
        return validation.search_query(request, self.settings, where, tenant=tenant, cursor=cursor), bound_to

    def _paged_response(self, query: SearchQuery, bound_to: str, result: SearchResult) -> pb.SearchDocumentsResponse:
        token = ""
        if query.paged and result.more:
            token = self.page_tokens.issue(bound_to, Cursor(query.offset + len(result.hits), result.model_version,
                                                            result.collection, mode=result.mode,
                                                            fusion=result.fusion, pool_depth=result.pool_depth))
        return _response(result, token)

    @rpc
    async def SearchDocuments(
        self, request: pb.SearchDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchDocumentsResponse:
        assert self.engine is not None
        query, bound_to = self._query(request, context)
        (result,) = await self.engine.search([query], context.time_remaining())
        return await self._highlighted(request, self._paged_response(query, bound_to, result))

    @rpc
    async def BatchSearchDocuments(
        self, request: pb.BatchSearchDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchSearchDocumentsResponse:
        assert self.engine is not None
        validation.batch_size(request, self.settings)
        typed = [self._query(item, context, f"requests[{i}]") for i, item in enumerate(request.requests)]
        results = await self.engine.search([query for query, _ in typed], context.time_remaining())
        return pb.BatchSearchDocumentsResponse(responses=[
            await self._highlighted(item, self._paged_response(query, bound_to, result))
            for item, (query, bound_to), result in zip(request.requests, typed, results, strict=True)
        ])

    async def _highlighted(self, request: pb.SearchDocumentsRequest,
                           response: pb.SearchDocumentsResponse) -> pb.SearchDocumentsResponse:
        """`highlight`: the query's terms marked in each hit (service/highlight.py); jieba runs off the loop."""
        if request.highlight:
            await asyncio.to_thread(highlight.annotate, response.hits, request.query, self.settings.lexical_analyzer)
        return response

    @rpc
    async def UpsertDocuments(
        self, request: pb.UpsertDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpsertDocumentsResponse:
        assert self.engine is not None
        documents = [
            dataclasses.replace(doc, tenant=self._tenant(context, item.tenant, f"documents[{i}].tenant"))
            for i, (doc, item) in enumerate(zip(validation.documents(request, self.settings), request.documents,
                                                strict=True))
        ]
        count, pair = await self.engine.upsert(documents, context.time_remaining())
        return pb.UpsertDocumentsResponse(upserted_count=count, model_version=pair.model_version,
                                          collection=pair.collection.name)

    @rpc
    async def DeleteDocuments(
        self, request: pb.DeleteDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDocumentsResponse:
        assert self.engine is not None
        delete = validation.delete_request(request, self.settings)
        tenant = self._tenant(context, request.tenant)
        if delete.ids:
            count = await self.engine.delete(delete.ids, tenant, dry_run=delete.dry_run)
        else:
            count = await self.engine.delete_matching(delete.conditions, tenant, dry_run=delete.dry_run)
        return pb.DeleteDocumentsResponse(deleted_count=count)

    @rpc
    async def GetDocument(
        self, request: pb.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDocumentResponse:
        assert self.engine is not None
        doc_id = validation.document_id(request.id, "id")
        document, collection = await self.engine.get(doc_id, self._tenant(context, request.tenant))
        return pb.GetDocumentResponse(
            document=pb.Document(id=document.doc_id, text=document.text, metadata=_struct(document.metadata),
                                 tenant=document.tenant),
            collection=collection,
        )

    @rpc
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        assert self.engine is not None
        return embed_response(await self.embedding.embed(self.engine, request, context.time_remaining()))

    @rpc
    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        assert self.engine is not None
        return await self.embedding.rerank(self.engine, request, context.time_remaining())
