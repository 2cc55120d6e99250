"""Encoding through the serving encoder, and an exact in-memory inner-product index.

Mining and evaluation encode with `semsearch.encoders.create_encoder`, the code that serves: the same
pooling, normalization, truncation and query instruction (from the model's manifest). An evaluation
through any other path would measure a model that is never deployed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from semsearch.config import Settings
from semsearch.encoders import create_encoder
from semsearch.encoders.base import Encoder

ENCODE_CHUNK = 256


def open_encoder(settings: Settings, model: str | None = None) -> Encoder:
    """The serving encoder for `model` (or settings.model); remote when settings.encoder_url is set."""
    if model is not None:
        settings = settings.model_copy(update={"model": model})
    return create_encoder(settings)


def encode_texts(
    encode: Callable[[Sequence[str]], np.ndarray],
    texts: Sequence[str],
    *,
    desc: str,
    show: bool = True,
) -> np.ndarray:
    """Encode in chunks with a progress bar; texts are length-sorted first so chunks pad little."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    parts: list[np.ndarray] = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not show or len(texts) < ENCODE_CHUNK) as bar:
        for start in range(0, len(order), ENCODE_CHUNK):
            chunk = [texts[i] for i in order[start : start + ENCODE_CHUNK]]
            parts.append(np.asarray(encode(chunk), dtype=np.float32))
            bar.update(len(chunk))
    if not parts:
        return np.empty((0, 0), dtype=np.float32)
    stacked = np.concatenate(parts)
    out = np.empty_like(stacked)
    out[order] = stacked
    return out


class ExactIndex:
    """Brute-force top-k by inner product (cosine on normalized vectors), queries in blocks.

    Exact on purpose: mining samples from ranks 10-210 and evaluation needs true ranks, which an
    approximate (HNSW) index blurs; at training-pool sizes a matrix product is also faster than
    loading a vector database (measured in trainer/RESULTS.md).
    """

    def __init__(self, vectors: np.ndarray, block: int = 1024) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.block = block

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def scores(self, queries: np.ndarray) -> np.ndarray:
        return np.asarray(queries, dtype=np.float32) @ self.vectors.T

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[Sequence[int]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (n_queries, k), best first; `exclude[i]` ids score -inf for query i
        (they appear only when fewer than k others exist). Ties break by lowest id: deterministic."""
        n = len(self)
        k = min(k, n)
        ids = np.empty((len(queries), k), dtype=np.int64)
        top = np.empty((len(queries), k), dtype=np.float32)
        for start in range(0, len(queries), self.block):
            scores = self.scores(queries[start : start + self.block])
            if exclude is not None:
                for row, excluded in enumerate(exclude[start : start + self.block]):
                    if len(excluded):
                        scores[row, list(excluded)] = -np.inf
            for row in range(len(scores)):
                ids[start + row], top[start + row] = _top_k(scores[row], k)
        return ids, top


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of one row, score descending, ties (also at the k-th place) broken by lowest id."""
    if k < len(scores):
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        above = np.flatnonzero(scores > kth)
        tied = np.flatnonzero(scores == kth)[: k - len(above)]
        chosen = np.concatenate([above, tied])
    else:
        chosen = np.arange(len(scores))
    order = np.lexsort((chosen, -scores[chosen]))
    return chosen[order], scores[chosen[order]]
