"""Ranking metrics over one query's ranked candidate ids and its set of relevant ids (binary relevance).

- recall@k: |relevant in top k| / |relevant| (BEIR / pytrec_eval); with several relevant items a
  perfect recall@1 is 1/|relevant|.
- hit@k: 1 if any relevant item is in the top k (often also called recall@k for one-positive sets).
- MRR@k: 1 / rank of the first relevant item within the top k, else 0.
- nDCG@k: sum of 1/log2(rank+1) over relevant ranks <= k, divided by the same for an ideal ranking.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence, Set

import numpy as np


def recall_at_k(ranked: Sequence[Hashable], relevant: Set[Hashable], k: int) -> float:
    if not relevant:
        raise ValueError("a query needs at least one relevant item")
    return len(set(ranked[:k]) & relevant) / len(relevant)


def hit_at_k(ranked: Sequence[Hashable], relevant: Set[Hashable], k: int) -> float:
    return 1.0 if any(item in relevant for item in ranked[:k]) else 0.0


def mrr_at_k(ranked: Sequence[Hashable], relevant: Set[Hashable], k: int) -> float:
    for rank, item in enumerate(ranked[:k], start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[Hashable], relevant: Set[Hashable], k: int) -> float:
    if not relevant:
        raise ValueError("a query needs at least one relevant item")
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(ranked[:k], start=1) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


METRICS = ("recall@1", "recall@5", "recall@10", "hit@1", "hit@5", "hit@10", "mrr@10", "ndcg@10")


def query_metrics(ranked: Sequence[Hashable], relevant: Set[Hashable]) -> dict[str, float]:
    return {
        "recall@1": recall_at_k(ranked, relevant, 1),
        "recall@5": recall_at_k(ranked, relevant, 5),
        "recall@10": recall_at_k(ranked, relevant, 10),
        "hit@1": hit_at_k(ranked, relevant, 1),
        "hit@5": hit_at_k(ranked, relevant, 5),
        "hit@10": hit_at_k(ranked, relevant, 10),
        "mrr@10": mrr_at_k(ranked, relevant, 10),
        "ndcg@10": ndcg_at_k(ranked, relevant, 10),
    }


def mean_metrics(per_query: Iterable[dict[str, float]]) -> dict[str, float]:
    rows = list(per_query)
    if not rows:
        return dict.fromkeys(METRICS, 0.0)
    return {name: float(np.mean([row[name] for row in rows])) for name in METRICS}


def similarity_gap(pos_scores: Sequence[Sequence[float]], neg_scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """Mean over queries (having both) of mean(sim to positives) - mean(sim to negatives)."""
    gaps, pos_means, neg_means = [], [], []
    for pos, neg in zip(pos_scores, neg_scores, strict=True):
        if len(pos) and len(neg):
            pos_means.append(float(np.mean(pos)))
            neg_means.append(float(np.mean(neg)))
            gaps.append(pos_means[-1] - neg_means[-1])
    if not gaps:
        return {"pos_mean": float("nan"), "neg_mean": float("nan"), "gap": float("nan"), "queries": 0}
    return {
        "pos_mean": float(np.mean(pos_means)),
        "neg_mean": float(np.mean(neg_means)),
        "gap": float(np.mean(gaps)),
        "queries": len(gaps),
    }
