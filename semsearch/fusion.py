"""Fusion of dense and lexical rankings into one (hybrid retrieval), shared by serving and evaluation."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
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


METHODS = ("rrf", "weighted", "minmax", "dbsf")


@dataclass(frozen=True)
class Fusion:
    """How hybrid retrieval combines the dense and lexical rankings.

    - rrf: sum of weight / (rrf_k + rank), the weights relative (equal weights: classic RRF, 1 / (k + rank));
    - weighted: sum of weight x a fixed map of the raw score to [0, 1] (Milvus WeightedRanker's);
    - minmax: sum of weight x the score min-max normalised over that retriever's candidates;
    - dbsf: sum of weight x the score normalised over mean +- 3 standard deviations of that retriever's
      candidates (distribution-based score fusion, as Qdrant's DBSF), clipped to [0, 1].
    """

    method: str = "rrf"
    rrf_k: int = 60
    dense_weight: float = 0.5
    lexical_weight: float = 0.5

    @classmethod
    def from_settings(cls, settings: Settings) -> Fusion:
        return cls(method=settings.fusion, rrf_k=settings.rrf_k, dense_weight=settings.dense_weight,
                   lexical_weight=settings.lexical_weight)

    def describe(self) -> str:
        """A short name: 'rrf k=60', 'rrf k=10 0.2/0.8', 'minmax 0.2/0.8'."""
        weights = f"{self.dense_weight:g}/{self.lexical_weight:g}"
        if self.method == "rrf":
            return f"rrf k={self.rrf_k}" + ("" if self.dense_weight == self.lexical_weight else f" {weights}")
        return f"{self.method} {weights}"

    def weight(self, retriever: str) -> float:
        weight = self.dense_weight if retriever == "dense" else self.lexical_weight
        if self.method != "rrf":
            return weight
        # RRF's weights are relative, so equal ones give the classic 1 / (k + rank) scores.
        total = self.dense_weight + self.lexical_weight
        return 1.0 if total == 0 else 2.0 * weight / total


# Hybrid's fusion where nothing chose one (the default of the fusion settings): over 30 fusions with a
# Chinese-capable dense model (USE) on CMRC2018 passages, BQ's test pool and the shipped FAQ's
# paraphrases, the one whose worst case was best (-0.022 MRR@10 on the FAQ, above the better half on
# the others); lexical-heavy fusions lost up to 0.22 on paraphrases (trainer/RESULTS.md).
SAFE_FUSION = Fusion("minmax", 60, 0.5, 0.5)


def normalized_score(retriever: str, score: float) -> float:
    """Milvus WeightedRanker's normalization: cosine (s + 1) / 2, BM25 2 / pi * atan(s); both in [0, 1]."""
    if retriever == "dense":
        return (score + 1.0) / 2.0
    return 2.0 / math.pi * math.atan(score)


def _normalizer(fusion: Fusion, retriever: str, hits: list[Hit]) -> Callable[[int, float], float]:
    """rank, score -> this retriever's contribution before its weight, for the fusion's method."""
    if fusion.method == "rrf":
        return lambda rank, _: 1.0 / (fusion.rrf_k + rank)
    if fusion.method == "weighted":
        return lambda _, score: normalized_score(retriever, score)
    scores = [hit.score for hit in hits]
    if fusion.method == "minmax":
        low, high = min(scores, default=0.0), max(scores, default=0.0)
    else:  # dbsf
        mean = statistics.fmean(scores) if scores else 0.0
        spread = 3.0 * statistics.pstdev(scores) if len(scores) > 1 else 0.0
        low, high = mean - spread, mean + spread
    if high <= low:  # one candidate, or all equal: each counts fully
        return lambda _, __: 1.0
    return lambda _, score: min(1.0, max(0.0, (score - low) / (high - low)))


def fuse(rankings: dict[str, list[Hit]], fusion: Fusion, top_k: int, *, per_document: bool = True) -> list[Hit]:
    """Combine best-first rankings (one per retriever) into one, best first, at most top_k hits.

    A hit is a document (per_document) or a chunk. Its text is the chunk of the retriever that
    ranked it best; it keeps every retriever's own score and rank. minmax and dbsf normalise over the
    candidates given: the same candidates always give the same scores (pages fuse one pool).
    """
    fused: dict[Any, tuple[float, int, Hit, list[RetrieverScore]]] = {}
    for retriever in ("dense", "lexical"):
        hits = rankings.get(retriever, [])
        weight = fusion.weight(retriever)
        normalize = _normalizer(fusion, retriever, hits)
        for rank, hit in enumerate(hits, start=1):
            key: Any = hit.doc_id if per_document else (hit.doc_id, hit.chunk_index)
            contribution = weight * normalize(rank, hit.score)
            score, best_rank, best_hit, found = fused.get(key, (0.0, rank, hit, []))
            if rank < best_rank:
                best_rank, best_hit = rank, hit
            found = [*found, RetrieverScore(retriever, hit.score, rank)]
            fused[key] = (score + contribution, best_rank, best_hit, found)
    # Ties (min-max gives each retriever's best 1 and its worst 0): the better best rank first, then, the
    # sort being stable, the order hits were met in: dense ranking first (a paraphrase's answer often
    # shares no word with the question, so the lexical half cannot vouch for it).
    ordered = sorted(fused.values(), key=lambda entry: (-entry[0], entry[1]))[:top_k]
    return [
        Hit(doc_id=hit.doc_id, chunk_index=hit.chunk_index, score=score, text=hit.text, metadata=hit.metadata,
            retrievers=tuple(found))
        for score, _, hit, found in ordered
    ]


def tuning_candidates() -> dict[str, Fusion]:
    """The fusions `--fusions grid` and fusion tuning measure, by name ('hybrid minmax 0.2/0.8'): RRF at
    two k with relative weights, and the three score fusions, each from dense-heavy to nearly lexical
    alone (a weak dense half must be able to fall back to the strong lexical one, and the reverse)."""
    grid: dict[str, Fusion] = {}
    for dense in (0.8, 0.5, 0.3, 0.2, 0.1, 0.05):
        lexical = round(1.0 - dense, 2)
        for fusion in (Fusion("rrf", 60, dense, lexical), Fusion("rrf", 10, dense, lexical),
                       Fusion("weighted", 60, dense, lexical), Fusion("minmax", 60, dense, lexical),
                       Fusion("dbsf", 60, dense, lexical)):
            grid[f"hybrid {fusion.describe()}"] = fusion
    return grid
