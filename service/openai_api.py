"""The OpenAI-compatible `POST /v1/embeddings` and the TEI/infinity/Cohere-compatible `POST /v1/rerank`.

Each route parses its provider's JSON shape, calls the Embed or Rerank RPC over the gateway's
in-process channel (so keys, scopes, rate limits, validation, metrics and logs are the gRPC ones)
and answers in the provider's shape. Errors use OpenAI's form,
`{"error": {"message", "type", "param", "code"}}`, with the HTTP status of the gRPC code.
"""

from __future__ import annotations

import base64
import json
import re
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from semsearch.rerankers.base import convert
from semsearch.v1 import search_pb2 as pb
from service.http_api import http_status

if TYPE_CHECKING:
    from service.http_gateway import Gateway

EMBEDDING_FIELDS = {"input", "model", "encoding_format", "dimensions", "user", "input_type"}
RERANK_FIELDS = {"query", "texts", "documents", "model", "top_n", "return_documents", "return_text", "raw_scores",
                 "truncate", "truncation_direction"}
INPUT_TYPES = {"document": pb.INPUT_TYPE_DOCUMENT, "query": pb.INPUT_TYPE_QUERY}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error"}
# A service message names its field first: "input[3] is empty", "dimensions: 512 is not ...".
FIELD_PREFIX = re.compile(r"^([a-z_]+)(?:\[\d+\])?[ :.]")


_STRINGS = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]}
_OPENAI_ERROR = {"description": "OpenAI's error shape; the HTTP status follows the gRPC code", "content": {
    "application/json": {"schema": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True}}}}}}}}
EMBEDDINGS_OPERATION: dict[str, Any] = {
    "operationId": "OpenAIEmbeddings", "tags": ["OpenAI-compatible"],
    "summary": "OpenAI's embeddings request and answer (gRPC `semsearch.v1.SearchService.Embed`)",
    "description": "Vectors of the serving model. `input_type` `query` adds the model's query instruction, "
                   "as SearchDocuments does; `document` (default) does not. `dimensions` is refused unless "
                   "it equals the model's.",
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["input"], "additionalProperties": False, "properties": {
            "input": _STRINGS, "model": {"type": "string", "description": "ignored: the serving model answers"},
            "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
            "dimensions": {"type": "integer", "minimum": 1}, "user": {"type": "string"},
            "input_type": {"type": "string", "enum": ["document", "query"], "default": "document"}}}}}},
    "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {
        "type": "object", "required": ["object", "data", "model", "usage"], "properties": {
            "object": {"type": "string", "enum": ["list"]}, "model": {"type": "string"},
            "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                                "properties": {
                "object": {"type": "string", "enum": ["embedding"]}, "index": {"type": "integer"},
                "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}},
                                        {"type": "string", "description": "base64 of little-endian float32"}]}}}},
            "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"], "properties": {
                "prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}}}}}},
        "default": _OPENAI_ERROR},
}
_RERANK_RESULT = {"type": "object", "required": ["index", "relevance_score"], "properties": {
    "index": {"type": "integer"}, "relevance_score": {"type": "number"},
    "document": {"type": "object", "properties": {"text": {"type": "string"}}}}}
_TEI_RESULT = {"type": "object", "required": ["index", "score"], "properties": {
    "index": {"type": "integer"}, "score": {"type": "number"}, "text": {"type": "string"}}}
RERANK_OPERATION: dict[str, Any] = {
    "operationId": "Rerank", "tags": ["OpenAI-compatible"],
    "summary": "Cross-encoder scores in TEI's shape (`texts`) or Cohere/infinity's (`documents`) "
               "(gRPC `semsearch.v1.SearchService.Rerank`)",
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["query"], "additionalProperties": False, "properties": {
            "query": {"type": "string"}, "texts": {"type": "array", "items": {"type": "string"}},
            "documents": {"type": "array", "items": {"oneOf": [
                {"type": "string"}, {"type": "object", "required": ["text"],
                                     "properties": {"text": {"type": "string"}}}]}},
            "model": {"type": "string"}, "top_n": {"type": "integer", "minimum": 1},
            "return_documents": {"type": "boolean"}, "return_text": {"type": "boolean"},
            "raw_scores": {"type": "boolean", "description": "logits instead of sigmoid probabilities"},
            "truncate": {"type": "boolean"}, "truncation_direction": {"type": "string"}}}}}},
    "responses": {"200": {"description": "TEI: a list; Cohere/infinity: {results, model}", "content": {
        "application/json": {"schema": {"oneOf": [
            {"type": "array", "items": _TEI_RESULT},
            {"type": "object", "required": ["object", "results", "model"], "properties": {
                "object": {"type": "string", "enum": ["rerank"]}, "model": {"type": "string"},
                "results": {"type": "array", "items": _RERANK_RESULT}}}]}}}},
        "default": _OPENAI_ERROR},
}
# What GET /openapi.json says of these routes (they are not proto-mapped, so written by hand).
OPENAPI_PATHS = {"/v1/embeddings": {"post": EMBEDDINGS_OPERATION}, "/v1/rerank": {"post": RERANK_OPERATION}}


class OpenAIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = "invalid_api_key" if status == 401 else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(json.dumps(body, ensure_ascii=False), status_code=status, headers=headers,
                    media_type="application/json")


def _json_object(body: bytes, known: set[str]) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8")) if body.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(f"the body is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise OpenAIError("the body must be a JSON object")
    unknown = sorted(set(data) - known)
    if unknown:
        raise OpenAIError(f"unknown field {unknown[0]!r}; the fields are {', '.join(sorted(known))}", unknown[0])
    return data


def _texts(value: Any, field: str) -> list[str]:
    """A string or a list of strings (OpenAI's token-id arrays are refused: the tokenizer is the service's)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise OpenAIError(f"{field} must be a string or a non-empty list of strings", field)
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise OpenAIError(f"{field}[{index}] must be a string, not {type(item).__name__} (token arrays are not "
                              "supported: send text)", field)
    return value


def embed_request(data: dict[str, Any]) -> tuple[pb.EmbedRequest, str]:
    """The Embed request and the encoding format, from an OpenAI embeddings body."""
    if "input" not in data:
        raise OpenAIError("input is required", "input")
    texts = _texts(data["input"], "input")
    encoding = data.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise OpenAIError(f"encoding_format must be 'float' or 'base64', not {encoding!r}", "encoding_format")
    input_type = data.get("input_type") or "document"
    if input_type not in INPUT_TYPES:
        raise OpenAIError(f"input_type must be 'query' or 'document', not {input_type!r}", "input_type")
    dimensions = data.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                   or dimensions <= 0):
        raise OpenAIError(f"dimensions must be a positive integer, not {dimensions!r}", "dimensions")
    if data.get("model") is not None and not isinstance(data["model"], str):
        raise OpenAIError("model must be a string", "model")
    return pb.EmbedRequest(input=texts, input_type=INPUT_TYPES[input_type], dimensions=dimensions or 0), encoding


def embeddings_body(response: pb.EmbedResponse, encoding: str) -> dict[str, Any]:
    data = []
    for index, embedding in enumerate(response.embeddings):
        values: Any = list(embedding.values)  # float32 -> float: exact, and exact again on the way back
        if encoding == "base64":
            values = base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": values})
    usage = {"prompt_tokens": response.token_count, "total_tokens": response.token_count}
    return {"object": "list", "data": data, "model": response.model_version, "usage": usage}


def _documents(data: dict[str, Any]) -> tuple[list[str], str]:
    """The passages (`texts`: TEI; `documents` of strings or {"text"} objects: Cohere, infinity, Jina)."""
    field = "texts" if "texts" in data else "documents"
    if field not in data:
        raise OpenAIError("documents (or TEI's texts) is required", "documents")
    raw = data[field]
    if isinstance(raw, list):
        raw = [item["text"] if isinstance(item, dict) and isinstance(item.get("text"), str) else item for item in raw]
    return _texts(raw, field), field


def rerank_request(data: dict[str, Any]) -> tuple[pb.RerankRequest, str]:
    query = data.get("query")
    if not isinstance(query, str):
        raise OpenAIError("query is required and must be a string", "query")
    texts, field = _documents(data)
    top_n = data.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n <= 0):
        raise OpenAIError(f"top_n must be a positive integer, not {top_n!r}", "top_n")
    return pb.RerankRequest(query=query, texts=texts), field


def rerank_body(data: dict[str, Any], request: pb.RerankRequest, response: pb.RerankResponse,
                field: str) -> Any:
    """TEI (`texts`): a list of {index, score[, text]}; otherwise {results: [{index, relevance_score[,
    document]}], model}. Scores are probabilities (sigmoid) unless `raw_scores` asks for logits."""
    scores = convert(list(response.scores), response.activation,  # type: ignore[arg-type]
                     "none" if data.get("raw_scores") else "sigmoid")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: data.get("top_n") or len(scores)]
    if field == "texts":
        return [{"index": i, "score": scores[i], **({"text": request.texts[i]} if data.get("return_text") else {})}
                for i in order]
    results = [{"index": i, "relevance_score": scores[i],
                **({"document": {"text": request.texts[i]}} if data.get("return_documents") else {})} for i in order]
    return {"object": "rerank", "results": results, "model": response.reranker_version}


def _param(message: str) -> str | None:
    match = FIELD_PREFIX.match(message)
    return match.group(1) if match else None


def routes(gateway: Gateway) -> list[Route]:
    """The two routes, calling the gateway's in-process channel."""
    from service.http_gateway import FORWARDED_HEADERS, BadRequest, parse_timeout, retry_details

    embed = gateway.channel.unary_unary("/semsearch.v1.SearchService/Embed",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=pb.EmbedResponse.FromString)
    rerank = gateway.channel.unary_unary("/semsearch.v1.SearchService/Rerank",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=pb.RerankResponse.FromString)

    async def call(request: Request, method: Any, message: Any) -> Any:
        metadata = grpc.aio.Metadata(*((name, request.headers[name]) for name in FORWARDED_HEADERS
                                       if name in request.headers))
        return await method(message, metadata=metadata, timeout=parse_timeout(request.headers.get("grpc-timeout")))

    def failure(exc: Exception, rename: dict[str, str] | None = None) -> Response:
        if isinstance(exc, OpenAIError):
            return error_response(exc.status, str(exc), exc.param)
        if isinstance(exc, BadRequest):
            return error_response(exc.http or http_status(exc.code), str(exc))
        assert isinstance(exc, grpc.aio.AioRpcError)
        message = exc.details() or exc.code().name
        headers = {}
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry_after, _ = retry_details(exc.trailing_metadata())  # type: ignore[arg-type]
            headers["Retry-After"] = retry_after or "1"
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            headers["WWW-Authenticate"] = 'Bearer realm="semsearch"'
        param = _param(message) if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else None
        param = (rename or {}).get(param or "", param)  # the service's field name -> the caller's
        return error_response(http_status(exc.code()), message, param, headers)

    async def embeddings(request: Request) -> Response:
        try:
            data = _json_object(await gateway.read_body(request), EMBEDDING_FIELDS)
            message, encoding = embed_request(data)
            answer = await call(request, embed, message)
        except (OpenAIError, BadRequest, grpc.aio.AioRpcError) as exc:
            return failure(exc)
        return Response(json.dumps(embeddings_body(answer, encoding)), media_type="application/json")

    async def rerank_route(request: Request) -> Response:
        try:
            data = _json_object(await gateway.read_body(request), RERANK_FIELDS)
            message, field = rerank_request(data)
        except (OpenAIError, BadRequest) as exc:
            return failure(exc)
        try:
            answer = await call(request, rerank, message)
        except (BadRequest, grpc.aio.AioRpcError) as exc:
            return failure(exc, {"texts": field})
        return Response(json.dumps(rerank_body(data, message, answer, field), ensure_ascii=False),
                        media_type="application/json")

    return [Route("/v1/embeddings", embeddings, methods=["POST"], name="openai_embeddings"),
            Route("/v1/rerank", rerank_route, methods=["POST"], name="rerank")]
