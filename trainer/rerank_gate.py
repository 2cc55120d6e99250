"""The gate of a reranker promotion: on held-out rows, retrieval then rerank with the candidate must
beat retrieval then rerank with the current reranker (or retrieval alone when there is none).

Retrieval is the serving pair's encoder over the pool of the rows' candidates (their pos and neg
texts; each query's own text removed), exact top `candidates`; each reranker re-orders those same
candidates, so the two sides differ only in the reranker. A reranker needs no re-embedding, so this
gate is the whole evaluation of a reranker promotion.
"""

from __future__ import annotations

from collections.abc import Sequence

from semsearch.encoders import Encoder
from semsearch.errors import InvalidInputError
from semsearch.rerankers import Reranker
from trainer.encoding import ExactIndex
from trainer.metrics import mean_metrics, query_metrics
from trainer.promotion import GateResult, verdict
from trainer.rows import TrainRow, distinct_texts, normalize_text


def rerank_metrics(rows: Sequence[TrainRow], encoder: Encoder, rerankers: Sequence[Reranker | None], *,
                   candidates: int = 50) -> list[dict[str, float]]:
    """Metrics of retrieval (top `candidates`) re-ordered by each reranker (None: retrieval order)."""
    pool = distinct_texts(text for row in rows for text in (*row.pos, *row.neg))
    where = {normalize_text(text): i for i, text in enumerate(pool)}

    def at(text: str) -> int | None:
        return where.get(normalize_text(text))

    queries = [row for row in rows if any(at(text) != at(row.query) for text in row.pos)]
    if not queries:
        raise InvalidInputError("the gate's rows hold no query with a positive other than itself")
    index = ExactIndex(encoder.encode_documents(pool))
    exclude = [[i] if (i := at(row.query)) is not None else [] for row in queries]
    ids, _ = index.search(encoder.encode_queries([row.query for row in queries]), candidates, exclude=exclude)
    relevant = [{i for text in row.pos if (i := at(text)) is not None and i != at(row.query)} for row in queries]
    out = []
    for reranker in rerankers:
        ranked = [[int(x) for x in row_ids] for row_ids in ids]
        if reranker is not None:
            pairs = [(row.query, pool[i]) for row, row_ids in zip(queries, ranked, strict=True) for i in row_ids]
            scores = iter(reranker.score_pairs(pairs))
            reordered = []
            for row_ids in ranked:
                row_scores = [next(scores) for _ in row_ids]
                reordered.append([row_ids[i] for i in sorted(range(len(row_ids)), key=lambda i: -row_scores[i])])
            ranked = reordered
        out.append(mean_metrics(query_metrics(r, rel) for r, rel in zip(ranked, relevant, strict=True)))
    return out


def rerank_gate(rows: Sequence[TrainRow], encoder: Encoder, current: Reranker | None, candidate: Reranker, *,
                metric: str, min_improvement: float, guards: dict[str, float], candidates: int = 50) -> GateResult:
    before, after = rerank_metrics(rows, encoder, [current, candidate], candidates=candidates)
    return verdict(before, after, metric=metric, min_improvement=min_improvement, guards=guards)
