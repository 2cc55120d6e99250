"""Encoders: build the one the settings ask for.

torch and transformers load on first use (PEP 562 lazy attributes), so commands that never encode
(`semsearch search`, `--help`) start in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from semsearch.config import Settings
from semsearch.encoders.base import Encoder
from semsearch.encoders.use import USE_MODEL
from semsearch.errors import ModelNotFoundError

if TYPE_CHECKING:
    from semsearch.encoders.local import STAND_IN_MODEL, TorchEncoder, locate_model, stand_in_model_path
    from semsearch.encoders.onnx import OnnxEncoder

log = structlog.get_logger(__name__)

__all__ = ["OFFLINE_FALLBACK_MODEL", "STAND_IN_MODEL", "Encoder", "ModelNotFoundError", "OnnxEncoder", "TorchEncoder",
           "create_encoder", "locate_model", "stand_in_model_path"]
_LOCAL = {"STAND_IN_MODEL", "TorchEncoder", "locate_model", "stand_in_model_path"}


def __getattr__(name: str) -> Any:
    if name in _LOCAL:
        from semsearch.encoders import local

        return getattr(local, name)
    if name == "OnnxEncoder":
        from semsearch.encoders import onnx

        return onnx.OnnxEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The offline fallback of `allow_stand_in`: the packaged model that reads Chinese (encoders/use.py).
OFFLINE_FALLBACK_MODEL = USE_MODEL


def create_encoder(settings: Settings, *, allow_stand_in: bool = False) -> Encoder:
    """The configured encoder; with `allow_stand_in`, fall back to the packaged USE-Multilingual v3
    when the configured model cannot be found (the demo's offline path), loudly."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if settings.encoder_url:
        from semsearch.encoders.discovery import DiscoveringEncoder, is_discovery_url
        from semsearch.encoders.remote import RemoteEncoder

        if is_discovery_url(settings.encoder_url):  # dns+http://<headless service>:<port>: one server per pod
            return DiscoveringEncoder(settings)

        return RemoteEncoder.from_settings(settings)
    try:
        return _local_encoder(settings.model, settings)
    except ModelNotFoundError as exc:
        if not allow_stand_in:
            raise
        log.warning(
            "model_unavailable_using_fallback", model=settings.model, reason=str(exc), fallback=OFFLINE_FALLBACK_MODEL,
            note="USE-Multilingual v3 reads Chinese, but is a smaller, older model than bge-large-zh",
        )
        return _local_encoder(OFFLINE_FALLBACK_MODEL, settings)


def _local_encoder(model_ref: str, settings: Settings) -> Encoder:
    """The in-process backend `encoder_backend` asks for. ONNX runs on CPU only: the GPU path stays torch.
    fp32 ONNX that cannot be exported falls back to torch (same vectors) with one warning; int8 never
    falls back, because torch's vectors are another model version than the one asked for."""
    if model_ref == USE_MODEL:  # not a transformers model: its own numpy runtime, whatever the backend
        from semsearch.encoders.use import UseEncoder

        return UseEncoder(threads=settings.torch_threads, batch_size=max(settings.encode_batch_size, 64))
    from semsearch.encoders.local import TorchEncoder, pick_device

    backend = settings.encoder_backend
    on_cpu = pick_device(settings.device).type == "cpu"

    def torch_encoder() -> Encoder:
        return TorchEncoder.from_ref(model_ref, device=settings.device, batch_size=settings.encode_batch_size)

    if backend == "torch":
        return torch_encoder()
    from semsearch.encoders.onnx import OnnxEncoder, OnnxExportError, onnx_available

    if backend == "auto" and not (on_cpu and onnx_available()):
        return torch_encoder()
    if not on_cpu:
        if backend == "onnx-int8":
            raise ModelNotFoundError(f"encoder_backend onnx-int8 runs on CPU only, not on device {settings.device!r}")
        log.warning("onnx_backend_cpu_only_using_torch", device=settings.device, model=model_ref)
        return torch_encoder()
    quantize = backend == "onnx-int8"
    try:
        if not onnx_available():
            raise OnnxExportError("onnxruntime and onnx are not installed")
        return OnnxEncoder.from_ref(model_ref, quantize=quantize, cache_dir=settings.onnx_cache_dir,
                                    batch_size=settings.encode_batch_size, threads=settings.torch_threads)
    except OnnxExportError as exc:
        if quantize:
            raise ModelNotFoundError(
                f"encoder_backend onnx-int8: {exc}. No fallback: int8 is a model version of its own"
            ) from exc
        log.warning("onnx_export_failed_using_torch", model=model_ref, backend=backend, reason=str(exc))
        return torch_encoder()
