"""`score`: teacher scores from a cross-encoder reranker, for knowledge distillation.

Uses FlagEmbedding's reranker API (bge-reranker-v2-m3 in production; any sequence-classification
cross-encoder with one label works). `pos_scores[i]` scores `(query, pos[i])` and `neg_scores[j]`
scores `(query, neg[j])`: FlagEmbedding's distillation relies on that alignment.

Resumable: rows are scored in chunks, and each chunk's lines are appended and fsynced before the
next starts; a rerun keeps the complete lines already written (after checking they belong to the
same input) and scores only the rest. A torn last line from a crash is discarded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from tqdm.auto import tqdm

from semsearch.errors import InvalidInputError
from trainer.rows import TrainRow, read_rows

log = structlog.get_logger(__name__)


class Scorer(Protocol):
    def __call__(self, pairs: list[tuple[str, str]]) -> list[float]: ...


@dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = 64
    chunk_rows: int = 64
    max_length: int = 512
    normalize: bool = False  # raw logits: FlagEmbedding's KD loss applies its own softmax


def flag_reranker_scorer(model: str, *, device: str = "auto", config: ScoreConfig = ScoreConfig()) -> Scorer:
    """A batched scorer over FlagEmbedding's reranker (imported here: FlagEmbedding is slow to import)."""
    import torch
    from FlagEmbedding import FlagReranker

    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    devices: list[str] = [device if device.startswith("cuda") else "cuda:0"] if use_cuda else ["cpu"]
    reranker = FlagReranker(
        model,
        use_fp16=use_cuda,
        devices=devices,
        batch_size=config.batch_size,
        max_length=config.max_length,
        normalize=config.normalize,
    )

    def score(pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        result = reranker.compute_score(
            pairs, batch_size=config.batch_size, max_length=config.max_length, normalize=config.normalize
        )
        return [float(s) for s in (result if isinstance(result, list) else [result])]

    return score


def score_rows(rows: Sequence[TrainRow], scorer: Scorer) -> list[TrainRow]:
    """Each row with pos_scores/neg_scores from one scorer call over all of its pairs."""
    pairs: list[tuple[str, str]] = []
    for row in rows:
        pairs += [(row.query, p) for p in row.pos] + [(row.query, n) for n in row.neg]
    scores = scorer(pairs)
    if len(scores) != len(pairs):
        raise RuntimeError(f"scorer returned {len(scores)} scores for {len(pairs)} pairs")
    out = []
    at = 0
    for row in rows:
        pos_scores = scores[at : at + len(row.pos)]
        at += len(row.pos)
        neg_scores = scores[at : at + len(row.neg)]
        at += len(row.neg)
        out.append(row.model_copy(update={"pos_scores": pos_scores, "neg_scores": neg_scores}))
    return out


def _completed_lines(out_path: Path, rows: Sequence[TrainRow]) -> int:
    """How many leading rows `out_path` already holds, after dropping a torn last line."""
    if not out_path.exists():
        return 0
    raw = out_path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        log.warning("score_resume_torn_line", path=str(out_path), dropped_bytes=len(raw) - keep)
        with out_path.open("r+b") as handle:
            handle.truncate(keep)
        raw = raw[:keep]
    lines = raw.decode("utf-8").splitlines()
    if len(lines) > len(rows):
        raise InvalidInputError(f"{out_path} has {len(lines)} rows but the input has {len(rows)}: not a resume")
    for number, line in enumerate(lines, start=1):
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{out_path}:{number}: not JSON; use --restart to score from scratch") from exc
        row = rows[number - 1]
        if data.get("query") != row.query or data.get("neg") != row.neg or data.get("pos") != row.pos:
            raise InvalidInputError(
                f"{out_path}:{number}: does not match input row {number}; use --restart to score from scratch"
            )
        if "pos_scores" not in data or "neg_scores" not in data:
            raise InvalidInputError(f"{out_path}:{number}: no scores; use --restart to score from scratch")
    return len(lines)


def score_file(
    in_path: Path,
    out_path: Path,
    scorer_factory: Callable[[], Scorer],
    *,
    chunk_rows: int = 64,
    restart: bool = False,
    show_progress: bool = True,
    max_chunks: int | None = None,
) -> dict[str, Any]:
    """Score every row of `in_path` into `out_path`, resuming where a previous run stopped.

    `max_chunks` stops early (as a crash would), for tests and time-boxed runs."""
    rows = read_rows(in_path)
    if restart and out_path.exists():
        out_path.unlink()
    done = _completed_lines(out_path, rows)
    stats: dict[str, Any] = {"rows": len(rows), "resumed_from": done, "scored": 0}
    if done == len(rows):
        log.info("score_already_complete", path=str(out_path), rows=len(rows))
        return stats
    scorer = scorer_factory()  # loaded only when there is work left
    out_path.parent.mkdir(parents=True, exist_ok=True)
    chunks = 0
    with (
        out_path.open("a", encoding="utf-8") as handle,
        tqdm(
            total=len(rows),
            initial=done,
            desc="teacher scores",
            unit="row",
            disable=not show_progress,
        ) as bar,
    ):
        for start in range(done, len(rows), chunk_rows):
            if max_chunks is not None and chunks >= max_chunks:
                break
            scored = score_rows(rows[start : start + chunk_rows], scorer)
            handle.write("".join(row.to_json() + "\n" for row in scored))
            handle.flush()
            os.fsync(handle.fileno())
            stats["scored"] += len(scored)
            chunks += 1
            bar.update(len(scored))
    stats["complete"] = done + stats["scored"] == len(rows)
    log.info("scored", **stats)
    return stats
