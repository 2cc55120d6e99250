"""The reranker interface: one for every backend (in-process transformers, remote rerank APIs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from semsearch.rerankers.manifest import Activation, RerankerManifest

Pair = tuple[str, str]  # (query, passage)


@runtime_checkable
class Reranker(Protocol):
    """Scores (query, passage) pairs with a cross-encoder: one float per pair, higher is more relevant,
    with the manifest's activation applied (so every backend reports the same number for the same
    weights). Blocking and thread-safe; `timeout_s` bounds a remote call (the caller's deadline)."""

    @property
    def manifest(self) -> RerankerManifest: ...

    def score(self, query: str, texts: Sequence[str], *, timeout_s: float | None = None) -> list[float]: ...

    def score_pairs(self, pairs: Sequence[Pair], *, timeout_s: float | None = None) -> list[float]:
        """Pairs of several queries at once (the service's micro-batches)."""
        ...

    def healthy(self) -> bool: ...

    def close(self) -> None: ...


def activate(logits: Sequence[float], activation: Activation) -> list[float]:
    if activation == "none":
        return [float(x) for x in logits]
    return [_sigmoid(float(x)) for x in logits]


def convert(scores: Sequence[float], given: Activation, wanted: Activation) -> list[float]:
    """Scores a server computed with `given` activation, as the manifest's `wanted` one."""
    if given == wanted:
        return [float(x) for x in scores]
    if wanted == "sigmoid":
        return [_sigmoid(float(x)) for x in scores]
    # Server applied sigmoid, manifest wants the logit: invert (clamped away from 0 and 1).
    out = []
    for x in scores:
        p = min(max(float(x), 1e-7), 1 - 1e-7)
        out.append(math.log(p / (1 - p)))
    return out


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def score_by_query(reranker: Reranker, pairs: Sequence[Pair], timeout_s: float | None) -> list[float]:
    """`score_pairs` for backends whose API takes one query per call: grouped by query, order kept."""
    groups: dict[str, list[int]] = {}
    for i, (query, _) in enumerate(pairs):
        groups.setdefault(query, []).append(i)
    out = [0.0] * len(pairs)
    for query, indices in groups.items():
        for i, value in zip(indices, reranker.score(query, [pairs[i][1] for i in indices], timeout_s=timeout_s),
                            strict=True):
            out[i] = value
    return out
