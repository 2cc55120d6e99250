"""Fusion of dense and lexical rankings into one (hybrid retrieval), shared by serving and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from semsearch.config import Settings
from semsearch.store import MAX_SEARCH_LIMIT, Hit, RetrieverScore

MODES = ("dense", "lexical", "hybrid")
# Hybrid fuses each retriever's best `max(HYBRID_CANDIDATES, 2 * top_k)` documents (those that many
# rows hold, and at least top_k): one ranked just outside top_k by both retrievers can still win.
HYBRID_CANDIDATES = 20


def hybrid_candidates(top_k: int) -> int:
    return min(max(HYBRID_CANDIDATES, 2 * top_k), MAX_SEARCH_LIMIT)


@dataclass(frozen=True)
class Fusion:
    """How hybrid retrieval combines the dense and lexical rankings."""

    method: str = "rrf"  # "rrf" or "weighted"
    rrf_k: int = 60
    dense_weight: float = 0.5
    lexical_weight: float = 0.5

    @classmethod
    def from_settings(cls, settings: Settings) -> Fusion:
        return cls(method=settings.fusion, rrf_k=settings.rrf_k, dense_weight=settings.dense_weight,
                   lexical_weight=settings.lexical_weight)


def normalized_score(retriever: str, score: float) -> float:
    """Milvus WeightedRanker's normalization: cosine (s + 1) / 2, BM25 2 / pi * atan(s); both in [0, 1]."""
    if retriever == "dense":
        return (score + 1.0) / 2.0
    return 2.0 / math.pi * math.atan(score)


def fuse(rankings: dict[str, list[Hit]], fusion: Fusion, top_k: int, *, per_document: bool = True) -> list[Hit]:
    """Combine best-first rankings (one per retriever) into one, best first, at most top_k hits.

    A hit is a document (per_document) or a chunk. Its text is the chunk of the retriever that
    ranked it best; it keeps every retriever's own score and rank.
    """
    fused: dict[Any, tuple[float, int, Hit, list[RetrieverScore]]] = {}
    for retriever in ("dense", "lexical"):
        weight = fusion.dense_weight if retriever == "dense" else fusion.lexical_weight
        for rank, hit in enumerate(rankings.get(retriever, []), start=1):
            key: Any = hit.doc_id if per_document else (hit.doc_id, hit.chunk_index)
            if fusion.method == "rrf":
                contribution = 1.0 / (fusion.rrf_k + rank)
            else:
                contribution = weight * normalized_score(retriever, hit.score)
            score, best_rank, best_hit, found = fused.get(key, (0.0, rank, hit, []))
            if rank < best_rank:
                best_rank, best_hit = rank, hit
            found = [*found, RetrieverScore(retriever, hit.score, rank)]
            fused[key] = (score + contribution, best_rank, best_hit, found)
    ordered = sorted(fused.values(), key=lambda entry: (-entry[0], entry[1]))[:top_k]
    return [
        Hit(doc_id=hit.doc_id, chunk_index=hit.chunk_index, score=score, text=hit.text, metadata=hit.metadata,
            retrievers=tuple(found))
        for score, _, hit, found in ordered
    ]
