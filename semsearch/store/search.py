"""Search: dense (cosine) or BM25 retrieval over chunks, best first, optionally one hit per document.

Per-document search uses Milvus grouping where the server has it and otherwise oversamples with
growing limits; a short answer is returned only from a fully loaded collection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from semsearch.filters import Condition, render_filters
from semsearch.store.connection import StoreConnection
from semsearch.store.rows import Hit, RetrieverScore
from semsearch.store.schema import SPARSE_FIELD

# Searches read this client's own writes (Session) and otherwise never wait on the server.
SEARCH_CONSISTENCY = "Session"
# Milvus' largest search limit (topk); per-document searches never ask for more.
MAX_SEARCH_LIMIT = 16384
# Without native grouping, a per-document search first fetches this many chunks per document
# wanted, then 4x more while documents are missing and rows remain.
PER_DOCUMENT_OVERSAMPLE = 3


class StoreSearch(StoreConnection):
    """The search layer of MilvusStore (semsearch/store/milvus.py sets its state)."""

    search_ef: int

    def search(
        self, name: str, vectors: np.ndarray | None = None, *, top_k: int, filters: Sequence[Condition] = (),
        output_fields: Iterable[str] = ("doc_id", "chunk_index", "text", "metadata"),
        timeout_s: float | None = None, texts: Sequence[str] | None = None, per_document: bool = False,
        min_score: float | None = None, enough: int | None = None,
    ) -> list[list[Hit]]:
        """Dense search (`vectors`) or BM25 search over the chunk text (`texts`), best first.

        `per_document`: at most one hit (its best chunk) per document, and `top_k` documents whenever
        the collection holds that many after filters: Milvus grouping search where the backend has
        it (Milvus >= 2.4), then, for queries still short (Milvus Lite and 2.3 have no native
        grouping), searches with growing limits until enough documents or no more rows.
        `enough` (per_document, below top_k): up to top_k documents are welcome but `enough` suffice, so
        the first search fetches top_k rows, not PER_DOCUMENT_OVERSAMPLE times more (hybrid candidates:
        Milvus Lite builds every fetched row in Python, and the rows are most of a search's cost).

        `min_score`: no hit scores below it. Dense searches are Milvus range searches (`radius`:
        rows below it are never fetched); BM25 scores are cut here (best first: a cut row means
        no later row qualifies, so the growing-limit loop stops).
        """
        lexical = texts is not None
        data: list[Any] = list(texts) if texts is not None else np.asarray(vectors, dtype=np.float32).tolist()
        if not data:
            return []
        fields = list(dict.fromkeys(["doc_id", "chunk_index", *output_fields]))
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        retriever = "lexical" if lexical else "dense"

        def run(batch: list[Any], limit: int, group: bool) -> list[list[Hit]]:
            options: dict[str, Any] = {"group_by_field": "doc_id"} if group else {}
            if lexical:
                params: dict[str, Any] = {"metric_type": "BM25"}
            else:
                params = {"metric_type": "COSINE", "params": {"ef": max(self.search_ef, limit)}}
                if min_score is not None:
                    # Milvus keeps similarities strictly above the radius: equal ones pass the cut below.
                    params["params"]["radius"] = max(-1.0, float(min_score) - 1e-6)
                    params["params"]["range_filter"] = 1.0 + 1e-6
            results = self._call(
                self.client.search, collection_name=name, data=batch, limit=limit, filter=render_filters(filters),
                output_fields=fields, anns_field=SPARSE_FIELD if lexical else "vector", search_params=params,
                timeout=timeout, consistency_level=SEARCH_CONSISTENCY, **options,
            )
            found = [_hits(per_query, retriever, lexical) for per_query in results]
            if min_score is not None:
                found = [[hit for hit in hits if hit.score >= min_score] for hits in found]
            return found

        if not per_document:
            return self._checked_complete(name, run(data, top_k, False), top_k)
        found: list[list[Hit]] = [[] for _ in data]
        todo = list(range(len(data)))
        wanted = top_k if enough is None else min(enough, top_k)
        if self.capabilities().grouping:
            grouped = run(data, top_k, True)
            for i in todo:
                found[i] = best_chunk_per_document(grouped[i], top_k)
            todo = [i for i in todo if len(found[i]) < wanted]
        limit = min(top_k * (PER_DOCUMENT_OVERSAMPLE if enough is None else 1), MAX_SEARCH_LIMIT)
        while todo:
            results = run([data[i] for i in todo], limit, False)
            short = []
            for i, hits in zip(todo, results, strict=True):
                found[i] = best_chunk_per_document(hits, top_k)
                if len(found[i]) < wanted and len(hits) >= limit and limit < MAX_SEARCH_LIMIT:
                    short.append(i)  # more rows may hold more documents
            todo = short
            limit = min(limit * 4, MAX_SEARCH_LIMIT)
        return self._checked_complete(name, found, wanted)

    def probe_search(self, name: str, dimension: int, timeout_s: float) -> None:
        """One dense search of `name` (one hit, no fields): raises as a search would. Health's proof that
        searches answer now: a restarted Milvus server reports a collection loaded before its searches
        do (they time out for a while), and a load state does not exercise the query path."""
        probe = np.zeros((1, dimension), dtype=np.float32)
        probe[0, 0] = 1.0
        self.search(name, probe, top_k=1, output_fields=(), timeout_s=timeout_s)

    def _checked_complete(self, name: str, found: list[list[Hit]], wanted: int) -> list[list[Hit]]:
        """`found`, once a short answer (fewer hits than wanted: a filter, a threshold, a small
        collection, or a collection still loading after a restart) is known to come from a fully
        loaded collection: an empty OK would tell a RAG application "nothing found"."""
        if any(len(hits) < wanted for hits in found):
            self.require_loaded(name)
        return found


def _hits(results: Iterable[dict[str, Any]], retriever: str, lexical: bool) -> list[Hit]:
    hits = []
    for rank, hit in enumerate(results, start=1):
        entity = hit["entity"]
        # BM25 scores are >= 0; Milvus Lite 3.2 reports them negated (its internal distance).
        score = abs(float(hit["distance"])) if lexical else float(hit["distance"])
        hits.append(Hit(
            doc_id=str(entity["doc_id"]), chunk_index=int(entity["chunk_index"]), score=score,
            text=str(entity.get("text", "")), metadata=dict(entity.get("metadata") or {}),
            retrievers=(RetrieverScore(retriever, score, rank),),
        ))
    return hits


def best_chunk_per_document(hits: Sequence[Hit], top_k: int) -> list[Hit]:
    """The first (best) hit of each document, at most top_k of them; ranks renumbered per document."""
    seen: set[str] = set()
    best: list[Hit] = []
    for hit in hits:  # sorted by score, best first
        if hit.doc_id in seen:
            continue
        seen.add(hit.doc_id)
        best.append(replace(hit, retrievers=tuple(replace(r, rank=len(best) + 1) for r in hit.retrievers)))
        if len(best) == top_k:
            break
    return best
