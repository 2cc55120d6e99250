"""What every framework retriever shares: the search options, the request they make, the metadata of a hit."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from google.protobuf import json_format

from semsearch.client import AsyncSearchClient, SearchClient
from semsearch.v1 import search_pb2 as pb

Scalar = str | int | float | bool
# {"category": "refund"} (EQ), {"category": ["refund", "invoice"]} (IN), or typed MetadataFilter
# messages (or their dict form) for every other operator.
Filters = Mapping[str, Scalar | Sequence[Scalar]] | Sequence[pb.MetadataFilter | Mapping[str, Any]]
Mode = Literal["dense", "lexical", "hybrid"]

MODES = {"dense": pb.RETRIEVAL_MODE_DENSE, "lexical": pb.RETRIEVAL_MODE_LEXICAL, "hybrid": pb.RETRIEVAL_MODE_HYBRID}
PREFIX = "semsearch_"  # metadata keys the retrievers add; the document's own keys keep their names


@dataclass(frozen=True)
class SearchOptions:
    """How a retriever searches. None / 0 leave a setting to the service (its default top_k, retrieval
    mode, rerank candidates)."""

    top_k: int = 0
    mode: Mode | None = None
    filters: Filters | None = None
    filter: pb.FilterGroup | Mapping[str, Any] | None = None  # a boolean group (AND/OR/NOT)
    tenant: str = ""
    rerank: bool = False
    rerank_candidates: int = 0
    min_score: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # any other SearchDocumentsRequest field


def _value(value: Scalar, where: str) -> pb.FilterValue:
    if isinstance(value, bool):  # before int: bool is an int
        return pb.FilterValue(bool_value=value)
    if isinstance(value, int):
        return pb.FilterValue(int_value=value)
    if isinstance(value, float):
        return pb.FilterValue(double_value=value)
    if isinstance(value, str):
        return pb.FilterValue(string_value=value)
    raise TypeError(f"{where}: a filter value is a str, int, float or bool, not {type(value).__name__}")


def typed_filters(filters: Filters | None) -> list[pb.MetadataFilter]:
    if not filters:
        return []
    if isinstance(filters, Mapping):
        typed = []
        for name, value in filters.items():
            if isinstance(value, Sequence) and not isinstance(value, str):
                typed.append(pb.MetadataFilter(field=name, operator=pb.FILTER_OPERATOR_IN,
                                               values=[_value(v, f"filters[{name!r}]") for v in value]))
            else:
                typed.append(pb.MetadataFilter(field=name, operator=pb.FILTER_OPERATOR_EQ,
                                               value=_value(value, f"filters[{name!r}]")))
        return typed
    return [item if isinstance(item, pb.MetadataFilter) else json_format.ParseDict(dict(item), pb.MetadataFilter())
            for item in filters]


def search_request(query: str, options: SearchOptions) -> pb.SearchDocumentsRequest:
    if options.mode is not None and options.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {options.mode!r}")
    request = pb.SearchDocumentsRequest(
        query=query, top_k=options.top_k, filters=typed_filters(options.filters), tenant=options.tenant,
        mode=MODES[options.mode] if options.mode else pb.RETRIEVAL_MODE_UNSPECIFIED, rerank=options.rerank,
        rerank_candidates=options.rerank_candidates,
    )
    if options.filter is not None:
        group = options.filter if isinstance(options.filter, pb.FilterGroup) else \
            json_format.ParseDict(dict(options.filter), pb.FilterGroup())
        request.filter.CopyFrom(group)
    if options.min_score is not None:
        request.min_score = options.min_score
    if options.extra:
        json_format.ParseDict(dict(options.extra), request)
    return request


def hit_metadata(hit: pb.SearchHit, response: pb.SearchDocumentsResponse) -> dict[str, Any]:
    """The hit's own metadata plus `semsearch_*` keys: id, score, chunk index, the retrievers' scores and
    ranks, the retrieval score (and with rerank the rerank score and the rank before it), model version."""
    metadata: dict[str, Any] = json_format.MessageToDict(hit.metadata)
    metadata.update({
        f"{PREFIX}id": hit.id, f"{PREFIX}score": hit.score, f"{PREFIX}chunk_index": hit.chunk_index,
        f"{PREFIX}retrieval_score": hit.retrieval_score, f"{PREFIX}model_version": response.model_version,
        f"{PREFIX}retrievers": {pb.RetrievalMode.Name(r.retriever).removeprefix("RETRIEVAL_MODE_").lower():
                                {"score": r.score, "rank": r.rank} for r in hit.retrievers},
    })
    if hit.HasField("rerank_score"):
        metadata[f"{PREFIX}rerank_score"] = hit.rerank_score
        metadata[f"{PREFIX}retrieval_rank"] = hit.retrieval_rank
        metadata[f"{PREFIX}reranker_version"] = response.reranker_version
    return metadata


class AsyncClients:
    """One AsyncSearchClient per event loop: a grpc.aio channel belongs to the loop that made it, and a
    retriever may be called from several (`asyncio.run` twice, a framework's own loop)."""

    def __init__(self, make: Callable[[], AsyncSearchClient]) -> None:
        self._make = make
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncSearchClient] = \
            weakref.WeakKeyDictionary()

    def get(self) -> AsyncSearchClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._make()
        return client


def search(client: SearchClient, query: str, options: SearchOptions) -> pb.SearchDocumentsResponse:
    return client.search(search_request(query, options))


async def search_async(client: AsyncSearchClient, query: str, options: SearchOptions) -> pb.SearchDocumentsResponse:
    return await client.search(search_request(query, options))
