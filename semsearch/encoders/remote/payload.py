"""The embeddings wire format, as pure functions: the request body, the answer decoded and checked.

    POST .../embeddings  {"model": ..., "input": [texts], "encoding_format": "float" | "base64"}
      -> {"object": "list", "model": <name>, "usage": {...},
          "data": [{"object": "embedding", "index": i, "embedding": [floats] | "<base64 float32 LE>"}]}

A malformed answer raises `MalformedPayload` (another attempt may do better); an answer from
another model raises `ModelChanged` or `DimensionMismatch` (its vectors must never be used).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# A unit vector from an fp16/bf16 server lands within ~1e-3 of norm 1; far beyond that means the
# server does not normalize (wrong pooling config?) and is worth a warning, even though we fix it.
NORM_TOLERANCE = 0.05
# float32 rounding of a normalized vector: within this, it is unit already.
UNIT_NORM_EPSILON = 1e-5


class MalformedPayload(Exception):
    """Not a usable embeddings answer (not JSON, missing data, bad index, bad base64...)."""


class ModelChanged(Exception):
    """The answer names a model the server was not serving: it was swapped underneath us."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class DimensionMismatch(Exception):
    """Vectors of another dimension than the manifest's: another model."""

    def __init__(self, got: list[int]) -> None:
        super().__init__(str(got))
        self.got = got


def request_body(model: str, texts: Sequence[str], encoding_format: str) -> bytes:
    body = {"model": model, "input": list(texts), "encoding_format": encoding_format}
    # Chinese stays UTF-8 (3 bytes a character) rather than \uXXXX escapes (6).
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_embeddings(body: Any, *, expected: int, dimension: int, served_names: frozenset[str]) -> np.ndarray:
    """`expected` float32 rows of `dimension`, in input order (by `index`, not list position).

    `served_names` are the names the server may write in `model`; an answer without `model`
    is accepted (some servers leave it out)."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise MalformedPayload("response has no data list")
    model = body.get("model")
    if model is not None and str(model) not in served_names:
        raise ModelChanged(str(model))
    data = body["data"]
    if len(data) != expected:
        raise MalformedPayload(f"{len(data)} embeddings for {expected} inputs")
    rows: list[Any] = [None] * expected
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < expected or rows[index] is not None:
            raise MalformedPayload(f"bad or repeated index {index!r} in response")
        rows[index] = item.get("embedding")
    out = np.empty((expected, dimension), dtype=np.float32)
    if all(isinstance(row, list) for row in rows):
        lengths = {len(row) for row in rows}
        if lengths != {dimension}:
            raise DimensionMismatch(sorted(lengths))
        try:
            out[:] = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise MalformedPayload("embedding is not a list of numbers") from exc
        return out
    for index, row in enumerate(rows):
        out[index] = decode_row(row, dimension)
    return out


def decode_row(row: Any, dimension: int) -> np.ndarray:
    """One embedding: a float list, or base64 of little-endian float32."""
    if isinstance(row, str):
        try:
            raw = base64.b64decode(row, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedPayload("embedding is not valid base64") from exc
        if len(raw) % 4:
            raise MalformedPayload(f"base64 embedding is not float32 ({len(raw)} bytes)")
        if len(raw) != 4 * dimension:
            raise DimensionMismatch([len(raw) // 4])
        return np.frombuffer(raw, dtype="<f4")
    if isinstance(row, list):
        if len(row) != dimension:
            raise DimensionMismatch([len(row)])
        try:
            return np.asarray(row, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise MalformedPayload("embedding is not a list of numbers") from exc
    raise MalformedPayload("embedding is neither a float list nor base64")


@dataclass(frozen=True)
class NormReport:
    flagged: int  # rows whose norm was further than the tolerance from 1
    min_norm: float
    max_norm: float


def checked_norms(vectors: np.ndarray) -> np.ndarray:
    """Row norms; a zero or non-finite vector is a broken answer, whatever the model."""
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise MalformedPayload("zero or non-finite vector in response")
    return norms


def normalize_rows(vectors: np.ndarray, *, tolerance: float = NORM_TOLERANCE) -> NormReport:
    """Rescale rows to unit norm in place; rows already unit to float32 precision are left bit for
    bit as they are (the same model gives the same vectors through a server as in-process)."""
    norms = checked_norms(vectors)
    rescale = np.abs(norms - 1.0) > UNIT_NORM_EPSILON
    if rescale.any():
        vectors[rescale] /= norms[rescale, None]
    flagged = int((np.abs(norms - 1.0) > tolerance).sum())
    return NormReport(flagged, float(norms.min()), float(norms.max()))
