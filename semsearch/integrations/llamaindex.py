"""LlamaIndex: `SemsearchRetriever`, a `BaseRetriever` over a semsearch service (`pip install semsearch[llamaindex]`).

    retriever = SemsearchRetriever(target="search.internal:50051", api_key=key, top_k=5, mode="hybrid")
    nodes = retriever.retrieve("退钱怎么操作？")        # or: await retriever.aretrieve(...)

Each hit becomes a `NodeWithScore`: a `TextNode` (id: the document id, `#chunk` appended for chunks
after the first; the hit's metadata plus the `semsearch_*` keys, which are kept out of what the LLM
and embedding models read) and the hit's score.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from semsearch.client import AsyncSearchClient, SearchClient
from semsearch.integrations.common import PREFIX, AsyncClients, SearchOptions, hit_metadata, search_request
from semsearch.v1 import search_pb2 as pb


def nodes(response: pb.SearchDocumentsResponse) -> list[NodeWithScore]:
    result = []
    for hit in response.hits:
        metadata = hit_metadata(hit, response)
        own = [key for key in metadata if key.startswith(PREFIX)]
        node = TextNode(id_=hit.id if hit.chunk_index == 0 else f"{hit.id}#{hit.chunk_index}", text=hit.text,
                        metadata=metadata, excluded_llm_metadata_keys=own, excluded_embed_metadata_keys=own)
        result.append(NodeWithScore(node=node, score=hit.score))
    return result


class SemsearchRetriever(BaseRetriever):
    """Give `target` (HOST:PORT; `client_options` such as tls_ca_file go to the clients) or ready clients
    (`client` for retrieve, `async_client` for aretrieve). Search options are `SearchOptions`' fields."""

    def __init__(self, target: str | None = None, *, api_key: str | None = None,
                 client: SearchClient | None = None, async_client: AsyncSearchClient | None = None,
                 client_options: dict[str, Any] | None = None, options: SearchOptions | None = None,
                 **option_fields: Any) -> None:
        super().__init__()
        if target is None and client is None and async_client is None:
            raise ValueError("SemsearchRetriever needs a target (HOST:PORT) or a client")
        self.target = target
        self.api_key = api_key
        self.client_options = dict(client_options or {})
        self.client = client
        self.async_client = async_client
        self._async_clients = AsyncClients(lambda: AsyncSearchClient(target or "", api_key=api_key,
                                                                     **self.client_options))
        self.options = replace(options or SearchOptions(), **option_fields)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if self.client is None:
            if self.target is None:
                raise ValueError("retrieve needs a target or a client (this retriever has only an async client)")
            self.client = SearchClient(self.target, api_key=self.api_key, **self.client_options)
        return nodes(self.client.search(search_request(query_bundle.query_str, self.options)))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        client = self.async_client
        if client is None:
            if self.target is None:
                return self._retrieve(query_bundle)
            client = self._async_clients.get()  # one per event loop
        return nodes(await client.search(search_request(query_bundle.query_str, self.options)))
