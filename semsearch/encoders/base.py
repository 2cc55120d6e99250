"""The encoder interface: one for every backend (in-process torch, remote sglang/OpenAI-compatible)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from semsearch.manifest import ModelManifest


@runtime_checkable
class Encoder(Protocol):
    """Turns texts into float32, L2-normalized vectors of `manifest.dimension`.

    `encode_queries` applies the manifest's query instruction exactly once; `encode_documents`
    never does. `timeout_s` bounds the whole call (a remote backend takes it from the caller's
    deadline); in-process backends may ignore it. Both are blocking and thread-safe.
    """

    @property
    def manifest(self) -> ModelManifest: ...

    def encode_queries(self, queries: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray: ...

    def encode_documents(self, documents: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text takes without truncation (special tokens included)."""
        ...

    def healthy(self) -> bool:
        """Can the encoder serve a request now? The service's health follows it (NOT_SERVING while
        False). In-process backends are always healthy; a remote one is not while every server is
        down or serves another model. May block briefly (bounded): call it off the event loop."""
        ...

    def close(self) -> None: ...
