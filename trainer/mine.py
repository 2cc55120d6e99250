"""`mine`: hard negatives from the current model's own ranking.

For each row the model ranks the candidate pool (a corpus, or every pos/neg text of the rows); we
sample `negative_number` candidates from ranks [lo, hi) of that ranking (0-based, over the whole
pool), never a positive or the query itself (by id and by normalized text), and never one that
scores within `fn_margin` of the row's best positive: such a candidate is more likely an unlabelled
positive than a negative, and training against it teaches the model to push true matches away
(FlagEmbedding's hn_mine.py only removes exact positives). A row left with no negative at all gets
easy ones from below the range (counted in the stats): a row without negatives cannot train.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tqdm.auto import tqdm

from semsearch.encoders.base import Encoder
from semsearch.errors import InvalidInputError
from trainer.encoding import ExactIndex, encode_texts
from trainer.rows import RowError, TrainRow, candidate_texts, iter_jsonl, normalize_text

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Candidate:
    text: str
    id: str | None = None


@dataclass(frozen=True)
class MineConfig:
    range_lo: int = 10
    range_hi: int = 210
    negative_number: int = 15
    fn_margin: float | None = 0.05  # None: no false-negative filter
    seed: int = 42
    keep_existing: bool = False  # keep the rows' own (e.g. human-labelled) negatives too


def parse_range(text: str) -> tuple[int, int]:
    """'10-210' -> (10, 210): ranks 10..209."""
    try:
        lo_text, hi_text = text.split("-", 1)
        lo, hi = int(lo_text), int(hi_text)
    except ValueError as exc:
        raise InvalidInputError(f"rank range must look like 10-210, got {text!r}") from exc
    if lo < 0 or hi <= lo:
        raise InvalidInputError(f"rank range {text!r} is empty")
    return lo, hi


def read_corpus(path: Path) -> list[Candidate]:
    """JSONL `{id?, text}` (or `{content}`), or plain text one item a line."""
    candidates: list[Candidate] = []
    problems: list[tuple[int, str]] = []
    is_json = path.suffix in (".jsonl", ".json")
    for number, line in iter_jsonl(path):
        if not is_json:
            candidates.append(Candidate(line))
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((number, f"not JSON ({exc.msg})"))
            continue
        text = data.get("text", data.get("content")) if isinstance(data, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append((number, "needs a non-empty `text`"))
            continue
        ident = data.get("id")
        candidates.append(Candidate(text, None if ident is None else str(ident)))
    if problems:
        raise RowError(path, problems)
    return candidates


def _dedupe(candidates: Sequence[Candidate]) -> list[Candidate]:
    seen: set[str] = set()
    out = []
    for candidate in candidates:
        key = normalize_text(candidate.text)
        if key not in seen:
            seen.add(key)
            out.append(candidate)
    return out


@dataclass
class _EncodedPool:
    """The candidate pool, encoded once, with the lookups every row's exclusions need."""

    candidates: list[Candidate]
    keys: list[str]
    key_index: dict[str, int]
    id_index: dict[str, int]
    vectors: np.ndarray
    outside_vectors: dict[str, np.ndarray]  # positives that are not in the pool, for the margin test
    index: ExactIndex

    def excluded(self, row: TrainRow) -> tuple[set[str], set[int]]:
        """The row's own texts (query and positives) as keys, and their pool positions."""
        keys = {normalize_text(row.query), *(normalize_text(p) for p in row.pos)}
        ids = {x for x in (row.query_id, *(row.pos_ids or [])) if x is not None}
        positions = {self.key_index[k] for k in keys if k in self.key_index}
        return keys, positions | {self.id_index[x] for x in ids if x in self.id_index}

    def positive_vector(self, text: str) -> np.ndarray:
        key = normalize_text(text)
        return self.vectors[self.key_index[key]] if key in self.key_index else self.outside_vectors[text]


def _encode_pool(
    rows: Sequence[TrainRow], encoder: Encoder, candidates: list[Candidate], show_progress: bool
) -> _EncodedPool:
    keys = [normalize_text(c.text) for c in candidates]
    key_index = {key: i for i, key in enumerate(keys)}
    vectors = encode_texts(
        encoder.encode_documents, [c.text for c in candidates], desc="encode pool", show=show_progress
    )
    # Positives outside the pool (a corpus without them) still need a score for the margin test.
    outside = sorted({p for r in rows for p in r.pos if normalize_text(p) not in key_index})
    outside_vectors = (
        dict(zip(outside, encode_texts(encoder.encode_documents, outside, desc="encode positives",
                                       show=show_progress), strict=True))
        if outside
        else {}
    )
    return _EncodedPool(
        candidates=candidates,
        keys=keys,
        key_index=key_index,
        id_index={c.id: i for i, c in enumerate(candidates) if c.id is not None},
        vectors=vectors,
        outside_vectors=outside_vectors,
        index=ExactIndex(vectors),
    )


def _sample_row(
    row: TrainRow,
    query_vector: np.ndarray,
    ranked: tuple[np.ndarray, np.ndarray],
    pool: _EncodedPool,
    config: MineConfig,
    stats: dict[str, Any],
) -> TrainRow:
    """One row with its mined negatives: ranks [lo, hi) minus positives and likely false negatives."""
    ids, scores = ranked
    excluded_keys, excluded = pool.excluded(row)
    threshold = np.inf
    if config.fn_margin is not None:
        threshold = max(float(query_vector @ pool.positive_vector(p)) for p in row.pos) - config.fn_margin
    kept: list[tuple[str, str | None]] = []
    if config.keep_existing:
        kept = [
            (t, None if row.neg_ids is None else row.neg_ids[j])
            for j, t in enumerate(row.neg)
            if normalize_text(t) not in excluded_keys
        ]
    kept_keys = {normalize_text(t) for t, _ in kept}
    eligible: list[int] = []
    for rank in range(config.range_lo, len(ids)):
        candidate = int(ids[rank])
        if candidate in excluded:
            stats["dropped_positive"] += 1
        elif scores[rank] > threshold:
            stats["dropped_false_negative"] += 1
        elif pool.keys[candidate] not in kept_keys:
            eligible.append(candidate)
    # Seeded by the row's own content, not its position: the same row gets the same negatives
    # wherever it sits in the file (given the same pool).
    rng = random.Random(f"{config.seed}:{row.query}:{row.pos[0]}")
    chosen = set(rng.sample(range(len(eligible)), min(config.negative_number, len(eligible))))
    picked = [c for j, c in enumerate(eligible) if j in chosen]  # in rank order
    if not kept and not picked and len(pool.index) > len(ids):
        # Nothing left in the range (all positives or likely false negatives): a row without
        # negatives cannot train, so fall back to easy negatives from below the range.
        row_scores = pool.index.scores(query_vector[None, :])[0]
        below = [int(c) for c in np.argsort(-row_scores, kind="stable")[len(ids) :]]
        below = [c for c in below if c not in excluded and row_scores[c] <= threshold]
        picked = sorted(rng.sample(below, min(config.negative_number, len(below))))
        stats["rows_fallback_below_range"] += bool(picked)
    negatives = [t for t, _ in kept] + [pool.candidates[c].text for c in picked]
    neg_ids = [x for _, x in kept] + [pool.candidates[c].id for c in picked]
    stats["mined"] += len(picked)
    stats["rows_short"] += len(picked) < config.negative_number
    stats["rows_without_neg"] += not negatives
    has_ids = bool(neg_ids) and all(x is not None for x in neg_ids)
    return row.without_scores().model_copy(
        update={"neg": negatives, "neg_ids": list(map(str, neg_ids)) if has_ids else None}
    )


def mine_hard_negatives(
    rows: Sequence[TrainRow],
    encoder: Encoder,
    config: MineConfig,
    *,
    corpus: Sequence[Candidate] | None = None,
    show_progress: bool = True,
) -> tuple[list[TrainRow], dict[str, Any]]:
    """Rows with `neg` replaced by mined negatives (stale teacher scores dropped), and statistics."""
    if config.negative_number < 1:
        raise InvalidInputError("negative_number must be at least 1")
    candidates = _dedupe(corpus if corpus is not None else [Candidate(t) for t in candidate_texts(rows)])
    if not candidates:
        raise InvalidInputError("empty candidate pool")
    started = time.perf_counter()
    pool = _encode_pool(rows, encoder, candidates, show_progress)
    query_vectors = encode_texts(
        encoder.encode_queries, [r.query for r in rows], desc="encode queries", show=show_progress
    )
    encoded = time.perf_counter()
    ids, scores = pool.index.search(query_vectors, min(config.range_hi, len(pool.index)))
    searched = time.perf_counter()

    stats: dict[str, Any] = {
        "rows": len(rows),
        "pool": len(candidates),
        "mined": 0,
        "dropped_positive": 0,
        "dropped_false_negative": 0,
        "rows_short": 0,
        "rows_fallback_below_range": 0,
        "rows_without_neg": 0,
    }
    out = [
        _sample_row(row, query_vectors[i], (ids[i], scores[i]), pool, config, stats)
        for i, row in enumerate(tqdm(rows, desc="sample negatives", unit="row", disable=not show_progress))
    ]
    stats.update(
        encode_s=round(encoded - started, 2),
        search_s=round(searched - encoded, 3),
        sample_s=round(time.perf_counter() - searched, 2),
        range=[config.range_lo, config.range_hi],
        negative_number=config.negative_number,
        fn_margin=config.fn_margin,
        seed=config.seed,
    )
    log.info("mined", **{k: v for k, v in stats.items() if not isinstance(v, list)})
    return out, stats
