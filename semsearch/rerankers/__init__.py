"""Rerankers: cross-encoders that re-order retrieved candidates (in-process or remote rerank APIs).

torch and transformers load on first use, as for the encoders.
"""

from __future__ import annotations

from semsearch.config import Settings
from semsearch.encoders.remote.config import Transport, parse_encoder_urls
from semsearch.rerankers.base import Pair, Reranker, activate, convert
from semsearch.rerankers.manifest import (
    KNOWN_RERANKER_PROFILES,
    RERANKER_MANIFEST_FILENAME,
    RerankerManifest,
    resolve_reranker_manifest,
)

__all__ = ["KNOWN_RERANKER_PROFILES", "RERANKER_MANIFEST_FILENAME", "Pair", "Reranker", "RerankerManifest",
           "activate", "convert", "create_reranker", "resolve_reranker_manifest"]


def create_reranker(settings: Settings, model_ref: str | None = None, url: str | None = None) -> Reranker | None:
    """The configured reranker (`model_ref`/`url` override the settings: a registry record's); None
    when no reranker model is configured."""
    model_ref = model_ref or settings.reranker_model
    if not model_ref:
        return None
    url = url or settings.reranker_url
    if url:
        from semsearch.rerankers.remote import RemoteReranker

        api_key = settings.reranker_api_key.get_secret_value() if settings.reranker_api_key else None
        transport = Transport(api_key=api_key, timeout_s=settings.encoder_timeout_s,
                              concurrency=settings.encoder_concurrency, retries=settings.encoder_retries,
                              ca_file=settings.encoder_ca_file)
        return RemoteReranker(parse_encoder_urls(url), model_ref=model_ref, transport=transport,
                              max_batch=settings.reranker_batch_size,
                              server_activation=settings.reranker_server_activation)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    from semsearch.rerankers.local import TorchReranker

    return TorchReranker.from_ref(model_ref, device=settings.device, batch_size=settings.reranker_batch_size)
