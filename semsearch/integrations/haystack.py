"""Haystack (2.x and later): `SemsearchRetriever`, a component over a semsearch service
(`pip install semsearch[haystack]`).

    retriever = SemsearchRetriever(target="search.internal:50051", top_k=5, mode="hybrid")
    pipeline.add_component("retriever", retriever)   # input: query (+ filters, top_k); output: documents

The API key comes from `SEMSEARCH_API_KEY` by default (a `Secret`, so `to_dict` never writes it).
`filters` take Haystack's filter syntax (`{"field": "meta.category", "operator": "==", "value": "refund"}`,
nested `AND`/`OR`/`NOT` groups), turned into semsearch's typed filters. Each hit becomes a `Document`
(id: the document id, `#chunk` appended for chunks after the first; content: the hit's text; meta:
its metadata plus the `semsearch_*` keys; score: the hit's score).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict
from haystack.utils import Secret, deserialize_secrets_inplace

from semsearch.client import AsyncSearchClient, SearchClient
from semsearch.integrations.common import (
    AsyncClients,
    Mode,
    Scalar,
    SearchOptions,
    hit_metadata,
    search_request,
    typed_filters,
)
from semsearch.v1 import search_pb2 as pb

COMPARISONS = {"==": pb.FILTER_OPERATOR_EQ, "!=": pb.FILTER_OPERATOR_NE, ">": pb.FILTER_OPERATOR_GT,
               ">=": pb.FILTER_OPERATOR_GTE, "<": pb.FILTER_OPERATOR_LT, "<=": pb.FILTER_OPERATOR_LTE,
               "in": pb.FILTER_OPERATOR_IN, "not in": pb.FILTER_OPERATOR_NOT_IN}
LOGIC = {"AND": pb.LOGICAL_OPERATOR_AND, "OR": pb.LOGICAL_OPERATOR_OR, "NOT": pb.LOGICAL_OPERATOR_NOT}


def _comparison(condition: dict[str, Any]) -> pb.MetadataFilter:
    operator, field = condition.get("operator"), str(condition.get("field", ""))
    value: Scalar | list[Scalar] = condition.get("value")  # type: ignore[assignment]  # checked by typed_filters
    if operator not in COMPARISONS:
        raise ValueError(f"filter operator {operator!r} is not supported; use one of {', '.join(COMPARISONS)}, "
                         f"{', '.join(LOGIC)}")
    if not field.startswith("meta."):
        raise ValueError(f"filter field {field!r}: semsearch filters metadata only (meta.<key>)")
    name = field.removeprefix("meta.")
    many = operator in ("in", "not in")
    if many != isinstance(value, list):
        raise ValueError(f"filter on {field!r}: {operator!r} takes {'a list' if many else 'one value'}")
    (typed,) = typed_filters({name: value})  # `value` for a scalar, `values` for a list
    typed.operator = COMPARISONS[operator]
    return typed


def haystack_filter(filters: dict[str, Any]) -> pb.FilterGroup:
    """Haystack's filter syntax as a semsearch FilterGroup (typed values, never an expression string)."""
    if "conditions" not in filters:
        return pb.FilterGroup(operator=pb.LOGICAL_OPERATOR_AND, filters=[_comparison(filters)])
    operator = filters.get("operator")
    if operator not in LOGIC:
        raise ValueError(f"logical filter operator {operator!r} is not one of {', '.join(LOGIC)}")
    group = pb.FilterGroup(operator=LOGIC[operator])
    for condition in filters["conditions"]:
        if "conditions" in condition:
            group.groups.append(haystack_filter(condition))
        else:
            group.filters.append(_comparison(condition))
    return group


def documents(response: pb.SearchDocumentsResponse) -> list[Document]:
    return [Document(id=hit.id if hit.chunk_index == 0 else f"{hit.id}#{hit.chunk_index}", content=hit.text,
                     meta=hit_metadata(hit, response), score=hit.score) for hit in response.hits]


@component
class SemsearchRetriever:
    """Retrieves documents for a query from a semsearch service (gRPC at `target`, HOST:PORT)."""

    def __init__(self, target: str, *, api_key: Secret | None = None, top_k: int = 0, mode: Mode | None = None,
                 filters: dict[str, Any] | None = None, tenant: str = "", rerank: bool = False,
                 rerank_candidates: int = 0, min_score: float | None = None,
                 client_options: dict[str, Any] | None = None) -> None:
        self.target = target
        self.api_key = api_key if api_key is not None else Secret.from_env_var("SEMSEARCH_API_KEY", strict=False)
        self.filters = filters
        self.client_options = dict(client_options or {})
        self.options = SearchOptions(top_k=top_k, mode=mode, tenant=tenant, rerank=rerank,
                                     rerank_candidates=rerank_candidates, min_score=min_score)
        self._client: SearchClient | None = None
        self._async_clients = AsyncClients(lambda: AsyncSearchClient(target, api_key=self.api_key.resolve_value(),
                                                                     **self.client_options))

    def _request(self, query: str, filters: dict[str, Any] | None, top_k: int | None) -> pb.SearchDocumentsRequest:
        chosen = filters if filters is not None else self.filters
        options = replace(self.options, top_k=top_k if top_k is not None else self.options.top_k,
                          filter=haystack_filter(chosen) if chosen else None)
        return search_request(query, options)

    @component.output_types(documents=list[Document])
    def run(self, query: str, filters: dict[str, Any] | None = None, top_k: int | None = None) -> dict[str, Any]:
        if self._client is None:
            self._client = SearchClient(self.target, api_key=self.api_key.resolve_value(), **self.client_options)
        return {"documents": documents(self._client.search(self._request(query, filters, top_k)))}

    @component.output_types(documents=list[Document])
    async def run_async(self, query: str, filters: dict[str, Any] | None = None,
                        top_k: int | None = None) -> dict[str, Any]:
        client = self._async_clients.get()  # one per event loop
        return {"documents": documents(await client.search(self._request(query, filters, top_k)))}

    def to_dict(self) -> dict[str, Any]:
        options = self.options
        return default_to_dict(self, target=self.target, api_key=self.api_key.to_dict(), top_k=options.top_k,
                               mode=options.mode, filters=self.filters, tenant=options.tenant, rerank=options.rerank,
                               rerank_candidates=options.rerank_candidates, min_score=options.min_score,
                               client_options=self.client_options)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SemsearchRetriever:
        deserialize_secrets_inplace(data["init_parameters"], keys=["api_key"])
        return default_from_dict(cls, data)
