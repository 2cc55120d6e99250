"""Initialise a student's new character rows from the teacher's own token embeddings.

`extend-vocab` gives each added character a random row: the student then has to learn 3,000+ rows
from scratch. USE-Multilingual's SentencePiece vocabulary has most single Chinese characters as
pieces, with trained 512-d embeddings; mapped into the student's 384-d embedding space they start
the new rows where the teacher says the character belongs. Two maps:

- `lstsq`: a ridge regression teacher-row -> student-row fitted on the tokens both vocabularies share
  (the student's known characters and whole words that are one teacher piece), then applied to the
  new characters: rows land in the student's own embedding geometry;
- `pca`: the teacher rows' top principal components, rescaled to the student rows' mean and spread:
  keeps the teacher's neighbourhoods but not the student's axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import structlog
import torch

log = structlog.get_logger(__name__)

InitMap = Literal["lstsq", "pca"]
_SPACE_PIECE = "▁"


def teacher_piece(teacher: Any, token: str) -> int | None:
    """The teacher's piece id for one student token (a `##` continuation maps like the bare text),
    or None when the teacher splits it or does not know it."""
    text = token.removeprefix("##")
    if not text or token.startswith("["):
        return None
    pieces = teacher.tokenizer.encode(text, out_type=str, add_bos=False, add_eos=False)
    ids = teacher.tokenizer.encode(text, out_type=int, add_bos=False, add_eos=False)
    kept = [(p, i) for p, i in zip(pieces, ids, strict=True) if p != _SPACE_PIECE]
    if len(kept) != 1 or kept[0][0] == "<unk>":
        return None
    return int(kept[0][1])


def _ridge_map(x: np.ndarray, y: np.ndarray, strength: float = 1e-2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x mean, y mean, W) of the ridge fit y - ȳ ≈ (x - x̄) W."""
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    gram += np.eye(gram.shape[0]) * strength * np.trace(gram) / gram.shape[0]
    return x_mean, y_mean, np.linalg.solve(gram, xc.T @ yc)


def _match_spread(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Rescale per dimension to the reference rows' mean and spread (a regression shrinks toward the
    mean; new rows should look like the rows the body was trained on)."""
    centered = rows - rows.mean(axis=0)
    scale = reference.std(axis=0) / np.maximum(centered.std(axis=0), 1e-6)
    return reference.mean(axis=0) + centered * scale


def teacher_rows(teacher: Any, vocab: Sequence[str], weight: np.ndarray, new_from: int,
                 how: InitMap) -> tuple[np.ndarray, list[int], dict[str, Any]]:
    """New rows (for the vocabulary indices returned) predicted from the teacher's embeddings."""
    pieces = [teacher_piece(teacher, token) for token in vocab]
    known = [i for i in range(new_from) if pieces[i] is not None]
    targets = [i for i in range(new_from, len(vocab)) if pieces[i] is not None]
    stats: dict[str, Any] = {"map": how, "new_rows": len(vocab) - new_from, "mapped_rows": len(targets),
                             "fit_rows": len(known)}
    if not targets:
        return np.empty((0, weight.shape[1]), dtype=np.float32), [], stats
    target_x = teacher.token_embeddings([pieces[i] for i in targets]).astype(np.float64)
    reference = weight[:new_from].astype(np.float64)
    if how == "lstsq":
        if len(known) < 16:  # the ridge term keeps smaller fits defined, but not meaningful
            raise ValueError(f"only {len(known)} tokens shared with the teacher: too few to fit a map (use pca)")
        known_x = teacher.token_embeddings([pieces[i] for i in known]).astype(np.float64)
        x_mean, y_mean, w = _ridge_map(known_x, weight[known].astype(np.float64))
        predicted = y_mean + (target_x - x_mean) @ w
        fit = y_mean + (known_x - x_mean) @ w
        residual = ((fit - weight[known]) ** 2).sum() / ((weight[known] - y_mean) ** 2).sum()
        stats["fit_r2"] = round(float(1 - residual), 4)
    else:
        centered = target_x - target_x.mean(axis=0)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        predicted = centered @ vt[: weight.shape[1]].T
        if predicted.shape[1] < weight.shape[1]:  # fewer rows than dimensions: pad with noise
            pad = np.random.default_rng(0).standard_normal((len(predicted), weight.shape[1] - predicted.shape[1]))
            predicted = np.concatenate([predicted, pad * 1e-3], axis=1)
    return _match_spread(predicted, reference).astype(np.float32), targets, stats


def init_new_rows(model: Any, teacher: Any, vocab: Sequence[str], new_from: int, how: InitMap) -> dict[str, Any]:
    """Overwrite the student's rows `new_from..` that the teacher knows; the others keep extend-vocab's
    random init. Returns what was done (for the manifest)."""
    embeddings = model.get_input_embeddings().weight
    weight = embeddings.detach().cpu().numpy()
    rows, indices, stats = teacher_rows(teacher, vocab, weight, new_from, how)
    if indices:
        with torch.no_grad():
            embeddings[indices] = torch.from_numpy(rows).to(embeddings.dtype)
    log.info("student_rows_from_teacher", **stats)
    return stats
