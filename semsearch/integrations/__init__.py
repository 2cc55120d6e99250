"""Retrievers for RAG frameworks, each a thin layer over `semsearch.client`:

- `semsearch.integrations.langchain.SemsearchRetriever` — LangChain `BaseRetriever` (sync and async),
  `pip install semsearch[langchain]`;
- `semsearch.integrations.llamaindex.SemsearchRetriever` — LlamaIndex `BaseRetriever` returning
  `NodeWithScore`, `pip install semsearch[llamaindex]`;
- `semsearch.integrations.haystack.SemsearchRetriever` — a Haystack component with `run` and
  `run_async`, `pip install semsearch[haystack]`.

All take the same search options (`SearchOptions`: top_k, mode, filters, filter, tenant, rerank,
rerank_candidates, min_score) and map each hit to the framework's document type: the text, the hit's
metadata, and `semsearch_*` keys for the id, score, chunk index, retrieval score and rank, rerank
score and the retrievers that found it. Import the submodule of your framework; this package imports
none of them.
"""

from semsearch.integrations.common import SearchOptions, hit_metadata, search_request

__all__ = ["SearchOptions", "hit_metadata", "search_request"]
