"""Encoders: build the one the settings ask for.

torch and transformers load on first use (PEP 562 lazy attributes), so commands that never encode
(`semsearch search`, `--help`) start in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from semsearch.config import Settings
from semsearch.encoders.base import Encoder
from semsearch.errors import ModelNotFoundError

if TYPE_CHECKING:
    from semsearch.encoders.local import STAND_IN_MODEL, TorchEncoder, locate_model, stand_in_model_path

log = structlog.get_logger(__name__)

__all__ = ["STAND_IN_MODEL", "Encoder", "ModelNotFoundError", "TorchEncoder", "create_encoder", "locate_model",
           "stand_in_model_path"]
_LOCAL = {"STAND_IN_MODEL", "TorchEncoder", "locate_model", "stand_in_model_path"}


def __getattr__(name: str) -> Any:
    if name in _LOCAL:
        from semsearch.encoders import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_encoder(settings: Settings, *, allow_stand_in: bool = False) -> Encoder:
    """The configured encoder; with `allow_stand_in`, fall back to the packaged MiniLM when the
    configured model cannot be found (the demo's offline path), loudly."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if settings.encoder_url:
        from semsearch.encoders.discovery import DiscoveringEncoder, is_discovery_url
        from semsearch.encoders.remote import RemoteEncoder

        if is_discovery_url(settings.encoder_url):  # dns+http://<headless service>:<port>: one server per pod
            return DiscoveringEncoder(settings)

        return RemoteEncoder.from_settings(settings)
    from semsearch.encoders.local import STAND_IN_MODEL, TorchEncoder

    try:
        return TorchEncoder.from_ref(settings.model, device=settings.device, batch_size=settings.encode_batch_size)
    except ModelNotFoundError as exc:
        if not allow_stand_in:
            raise
        log.warning(
            "model_unavailable_using_stand_in", model=settings.model, reason=str(exc), stand_in=STAND_IN_MODEL,
            note="all-MiniLM-L6-v2 has an English vocabulary: Chinese results are NOT representative",
        )
        return TorchEncoder.from_ref(STAND_IN_MODEL, device=settings.device, batch_size=settings.encode_batch_size)
