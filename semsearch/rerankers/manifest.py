"""The reranker manifest: what a cross-encoder's score means, read as data (like semsearch/manifest.py).

A cross-encoder reads (query, passage) and answers one number per pair. What that number is (a raw
logit or a sigmoid probability) and how many tokens the pair may take come from a manifest file
beside the weights, a known profile, or the model's config — and the version, as for embedders,
from a hash of the weights, so two fine-tunes never share one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from semsearch.errors import ModelNotFoundError
from semsearch.manifest import WeightsManifest, profile_name_for, slug, weights_hash

RERANKER_MANIFEST_FILENAME = "semsearch_reranker.json"
# Pairs longer than this are truncated unless a manifest says otherwise (FlagEmbedding's default).
DEFAULT_MAX_LENGTH = 512

Activation = Literal["none", "sigmoid"]


class RerankerManifest(WeightsManifest):
    """How to score (query, passage) pairs with a cross-encoder."""

    FILENAME: ClassVar[str] = RERANKER_MANIFEST_FILENAME

    max_length: int = Field(gt=0, description="Tokens of query + passage + special tokens; longer pairs are truncated")
    activation: Activation = Field(description="none: the raw logit; sigmoid: a probability in (0, 1)")


# Known public cross-encoders: every field but the version (from the weights actually loaded).
# FlagEmbedding scores bge rerankers with max_length 512 and `normalize=True` = sigmoid.
KNOWN_RERANKER_PROFILES: dict[str, dict[str, Any]] = {
    "bge-reranker-v2-m3": {"max_length": 512, "activation": "sigmoid"},
    "bge-reranker-base": {"max_length": 512, "activation": "sigmoid"},
    "bge-reranker-large": {"max_length": 512, "activation": "sigmoid"},
}


def reranker_profile_for(model_ref: str) -> str | None:
    return profile_name_for(model_ref, KNOWN_RERANKER_PROFILES)


def resolve_reranker_manifest(model_dir: Path, model_ref: str,
                              overrides: dict[str, Any] | None = None) -> RerankerManifest:
    """Order: overrides > manifest file beside the weights > known profile > the model's config.

    A model whose head has more than one output is refused: its "score" would be a guess."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 1)
    if labels != 1:
        raise ModelNotFoundError(
            f"{model_ref!r} has {labels} output labels; a reranker has one (a relevance logit): "
            "save it with num_labels=1"
        )
    stored = RerankerManifest.stored_beside(model_dir, overrides)
    if stored is not None:
        return stored
    profile = reranker_profile_for(model_ref) or reranker_profile_for(str(model_dir))
    data: dict[str, Any] = {}
    if profile is not None:
        data.update(KNOWN_RERANKER_PROFILES[profile], name=profile)
    else:
        data["name"] = slug(model_ref.rstrip("/").rsplit("/", 1)[-1]) or "reranker"
        data["activation"] = "none"  # the logit as the model gives it: no unannounced squashing
        limit = int(config.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
        data["max_length"] = min(DEFAULT_MAX_LENGTH, limit)
    data.update(overrides)
    data.setdefault("version", f"{data['name']}-{weights_hash(model_dir)}")
    data["model_path"] = str(model_dir)
    return RerankerManifest.model_validate(data)
