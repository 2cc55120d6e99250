"""LangChain: `SemsearchRetriever`, a `BaseRetriever` over a semsearch service (`pip install semsearch[langchain]`).

    retriever = SemsearchRetriever(target="search.internal:50051", api_key=key, top_k=5, mode="hybrid")
    docs = retriever.invoke("退钱怎么操作？")          # or: await retriever.ainvoke(...)

Each hit becomes a `Document` with the hit's text as `page_content`, its id as `id`, and its metadata
plus the `semsearch_*` keys (score, retrievers, rerank score...; see `semsearch.integrations`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr

from semsearch.client import AsyncSearchClient, SearchClient
from semsearch.integrations.common import AsyncClients, Filters, Mode, SearchOptions, hit_metadata, search_request
from semsearch.v1 import search_pb2 as pb


def documents(response: pb.SearchDocumentsResponse) -> list[Document]:
    return [Document(id=hit.id, page_content=hit.text, metadata=hit_metadata(hit, response)) for hit in response.hits]


class SemsearchRetriever(BaseRetriever):
    """Give `target` (HOST:PORT, with `client_options` such as api_key or tls_ca_file for the clients), or
    ready clients: `client` (sync calls) and/or `async_client` (async calls; without one, async calls run
    the sync client in a thread)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    target: str | None = None
    api_key: str | None = None
    client_options: dict[str, Any] = Field(default_factory=dict)
    client: SearchClient | None = None
    async_client: AsyncSearchClient | None = None
    top_k: int = 0
    mode: Mode | None = None
    filters: Filters | None = None
    filter: Any = None  # a semsearch.v1 FilterGroup or its dict form
    tenant: str = ""
    rerank: bool = False
    rerank_candidates: int = 0
    min_score: float | None = None
    _own_async: AsyncClients | None = PrivateAttr(default=None)

    @property
    def options(self) -> SearchOptions:
        return SearchOptions(top_k=self.top_k, mode=self.mode, filters=self.filters, filter=self.filter,
                             tenant=self.tenant, rerank=self.rerank, rerank_candidates=self.rerank_candidates,
                             min_score=self.min_score)

    def _sync_client(self) -> SearchClient:
        if self.client is None:
            if self.target is None:
                raise ValueError("SemsearchRetriever needs a target (HOST:PORT) or a client")
            self.client = SearchClient(self.target, api_key=self.api_key, **self.client_options)
        return self.client

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return documents(self._sync_client().search(search_request(query, self.options)))

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        client = self.async_client
        if client is None and self.target is not None and self.client is None:
            if self._own_async is None:
                target = self.target
                self._own_async = AsyncClients(lambda: AsyncSearchClient(target, api_key=self.api_key,
                                                                         **self.client_options))
            client = self._own_async.get()
        if client is None:
            request = search_request(query, self.options)
            return documents(await asyncio.to_thread(self._sync_client().search, request))
        return documents(await client.search(search_request(query, self.options)))
