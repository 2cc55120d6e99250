"""In-process reranker: transformers AutoModelForSequenceClassification on CPU or CUDA."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from semsearch.encoders.local import locate_model, pick_device
from semsearch.rerankers.base import Pair, activate
from semsearch.rerankers.manifest import RerankerManifest, resolve_reranker_manifest

log = structlog.get_logger(__name__)


def open_reranker_model(model_ref: str, overrides: dict[str, Any] | None = None) -> tuple[Path, RerankerManifest]:
    """A local directory as is, a hub id from the cache (or the hub): its directory and manifest."""
    model_dir = locate_model(model_ref)
    manifest = resolve_reranker_manifest(model_dir, model_ref, overrides)
    log.info("reranker_loading", model=model_ref, version=manifest.version, activation=manifest.activation,
             max_length=manifest.max_length)
    return model_dir, manifest


class TorchReranker:
    """A cross-encoder in this process (float16 on CUDA). Pairs are scored longest first in batches of
    `batch_size`, so a batch holds similar lengths (less padding), one forward pass at a time."""

    def __init__(self, model_dir: Path, manifest: RerankerManifest, *, device: str = "auto",
                 batch_size: int = 32) -> None:
        self._manifest = manifest
        self.batch_size = batch_size
        self.device = pick_device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=dtype).eval()
        self.model.to(self.device)  # type: ignore[arg-type]
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model_dir))
        limits = [manifest.max_length, int(getattr(self.model.config, "max_position_embeddings", 0) or 0),
                  int(getattr(self.tokenizer, "model_max_length", 0) or 0)]
        self.max_length = min(limit for limit in limits if limit > 0)
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not re-entrant

    @classmethod
    def from_ref(cls, model_ref: str, *, device: str = "auto", batch_size: int = 32,
                 manifest_overrides: dict[str, Any] | None = None) -> TorchReranker:
        model_dir, manifest = open_reranker_model(model_ref, manifest_overrides)
        return cls(model_dir, manifest, device=device, batch_size=batch_size)

    @property
    def manifest(self) -> RerankerManifest:
        return self._manifest

    def score(self, query: str, texts: Sequence[str], *, timeout_s: float | None = None) -> list[float]:
        return self.score_pairs([(query, text) for text in texts], timeout_s=timeout_s)

    def score_pairs(self, pairs: Sequence[Pair], *, timeout_s: float | None = None) -> list[float]:
        logits = [0.0] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            ids = order[start : start + self.batch_size]
            with self._tokenizer_lock:
                # longest_first, as infinity and sentence-transformers cut: same scores from every backend.
                features = self.tokenizer([pairs[i][0] for i in ids], [pairs[i][1] for i in ids], padding=True,
                                          truncation="longest_first", max_length=self.max_length,
                                          return_tensors="pt")
            with self._lock, torch.inference_mode():
                features = {k: v.to(self.device) for k, v in features.items()}
                out = self.model(**features).logits.view(-1).float().cpu().tolist()
            for i, value in zip(ids, out, strict=True):
                logits[i] = value
        return activate(logits, self._manifest.activation)

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        self.model.to("cpu")  # type: ignore[arg-type]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
