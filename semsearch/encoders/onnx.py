"""ONNX Runtime backend for the in-process encoder on CPU (`encoder_backend: onnx | onnx-int8 | auto`).

The graph is the transformer TorchEncoder loads (same weights, no pooler head), exported with PyTorch's
TorchScript-based exporter, fused for the CPU by onnxruntime's BERT optimizer (one Attention node per
layer, SkipLayerNorm, BiasGelu), and for `onnx-int8` dynamically quantized (int8 weights per
channel, in a 7-bit range). Everything around the forward pass — tokenizer, truncation, length-sorted
batching, pooling, normalization, query instruction — is `LocalEncoder`'s, shared with TorchEncoder.

Exports are cached in a directory (`onnx_cache_dir`, default `$XDG_CACHE_HOME/semsearch/onnx`), one
entry per (model version, config, weight files, export recipe, torch/onnxruntime versions,
quantization); an entry is written under a temporary name and renamed into place, so concurrent
processes never load half an export, and later processes load it without re-exporting.

The core invariant decides which backend may share a collection:
- fp32 ONNX reproduces PyTorch's vectors (every export is checked on probe texts: minimum cosine
  >= PARITY_MIN_COSINE, else the export counts as failed), so it keeps the model's version;
- int8 vectors differ (minimum cosine ~0.96 to fp32 on MiniLM), so `onnx-int8` is a model version of its
  own (`<version>+onnx-int8`): its own collection, which torch/fp32 encoders refuse and vice versa.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from transformers import AutoConfig

from semsearch.encoders.local import LocalEncoder, TorchEncoder, open_model
from semsearch.errors import SemsearchError
from semsearch.manifest import ModelManifest

log = structlog.get_logger(__name__)

# Bump when the export steps change: entries made by an older recipe are then never loaded.
RECIPE = 1
OPSET = 17
INT8_VERSION_SUFFIX = "+onnx-int8"
# fp32 ONNX vs PyTorch on the probe texts. Measured: >= 0.9999999 (float rounding in fused kernels).
PARITY_MIN_COSINE = 0.9999
# int8 is a different model version; this floor only catches a broken quantization.
INT8_MIN_COSINE = 0.8
# Chinese and English, short and long (padding inside a batch), with and without the BGE instruction.
PROBE_TEXTS = [
    "如何申请退款？",
    "为这个句子生成表示以用于检索相关文章：退钱怎么操作",
    "包裹好几天没动静了，物流一直显示运输中，请问什么时候能到？我已经等了一个星期，客服电话也打不通。",
    "how do I get a refund for a damaged parcel",
    "手机",
]
# Architectures whose exported graph onnxruntime's BERT fusions understand; others run unfused.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "camembert"}


class OnnxExportError(SemsearchError):
    """The ONNX graph could not be exported, optimized, quantized, verified or loaded."""


def onnx_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "semsearch" / "onnx"


def int8_manifest(manifest: ModelManifest) -> ModelManifest:
    """int8 vectors are not the fp32 model's vectors: a version of their own."""
    return manifest.model_copy(update={"version": manifest.version + INT8_VERSION_SUFFIX})


def _input_names(model: torch.nn.Module, features: dict[str, torch.Tensor]) -> list[str]:
    # Positional export: the names must follow forward()'s parameter order, not the tokenizer's.
    parameters = list(inspect.signature(model.forward).parameters)
    return [name for name in parameters if name in features]


def _versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("torch", "onnx", "onnxruntime")}


def cache_key(model_dir: Path, manifest: ModelManifest, *, quantize: bool) -> str:
    """`<version>-<hash>`: the hash covers everything that changes the exported graph."""
    weights = sorted((p.name, p.stat().st_size) for pattern in ("*.safetensors", "pytorch_model*.bin")
                     for p in model_dir.glob(pattern))
    config = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    identity = {"version": manifest.version, "config": config, "weights": weights, "recipe": RECIPE,
                "opset": OPSET, "quantize": "int8-dynamic-per-channel-7bit" if quantize else None, **_versions()}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in manifest.version)[:80]
    return f"{slug}-{'int8' if quantize else 'fp32'}-{digest}"


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default (physical cores)
    options.inter_op_num_threads = 1  # a BERT graph is a chain: nothing to run in parallel
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def export_unfused(reference: TorchEncoder, out: Path) -> list[str]:
    """torch -> ONNX at `out` (the transformer, inputs by their tokenizer names, output
    `last_hidden_state`), not yet fused; returns the graph's input names."""
    model = reference.model
    # Two texts of different lengths: the traced graph must keep the attention mask (padding).
    example = reference.tokenize(PROBE_TEXTS[:3])
    names = _input_names(model, example)
    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(model, tuple(example[n] for n in names), str(out), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    return names


def _export_fp32(reference: TorchEncoder, out: Path) -> list[str]:
    """torch -> ONNX -> fused ONNX at `out`; returns the graph's input names."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    raw = out.with_name("raw.onnx")
    names = export_unfused(reference, raw)
    config = reference.model.config
    if config.model_type in BERT_LIKE:
        fused = optimize_model(str(raw), model_type="bert", num_heads=int(config.num_attention_heads),
                               hidden_size=int(config.hidden_size), opt_level=1, use_gpu=False)
        fused.save_model_to_file(str(out))
    else:
        onnx.save(onnx.load(str(raw)), str(out))
    raw.unlink()
    return names


def _quantize(source: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing" advice, printed on the root logger
    try:
        # Per-channel int8 weights: min cosine to fp32 0.97 against 0.87 per tensor (MiniLM, BQ texts).
        # reduce_range (7-bit weights): AVX2 CPUs without VNNI saturate u8*s8 products, others do not,
        # so full-range int8 vectors would depend on the CPU; with 7 bits no CPU saturates (and this
        # variant kept the best BQ recall@10 of those tried, bench/RESULTS.md).
        # The fused graph has contrib ops shape inference cannot type: their outputs are float.
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)


def export_model(model_dir: Path, manifest: ModelManifest, cache_dir: Path, *, quantize: bool) -> Path:
    """The cached `model.onnx` for this model (and quantization), exported first if missing.

    Raises OnnxExportError when any step fails or the result does not reproduce PyTorch."""
    try:
        entry = cache_dir / cache_key(model_dir, manifest, quantize=quantize)
        if (entry / "meta.json").exists():
            log.info("onnx_cache_hit", version=manifest.version, path=str(entry))
            return entry / "model.onnx"
        if quantize:  # int8 starts from the verified fp32 export, itself cached
            source: Path | None = export_model(model_dir, manifest, cache_dir, quantize=False)
        else:
            source = None
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache_dir))
        try:
            started = time.perf_counter()
            reference = TorchEncoder(model_dir, manifest, device="cpu")
            meta: dict[str, Any] = {"key": entry.name, "version": manifest.version, "recipe": RECIPE,
                                    "opset": OPSET, **_versions()}
            if source is None:
                meta["inputs"] = _export_fp32(reference, work / "model.onnx")
            else:
                _quantize(source, work / "model.onnx")
                meta["inputs"] = json.loads((source.parent / "meta.json").read_text())["inputs"]
                meta["quantization"] = "dynamic int8, weights per channel in 7 bits (reduce_range)"
            check = OnnxEncoder(model_dir, manifest, work / "model.onnx", threads=None)
            cosine = _min_cosine(check.encode_documents(PROBE_TEXTS), reference.encode_documents(PROBE_TEXTS))
            reference.close()
            floor = INT8_MIN_COSINE if quantize else PARITY_MIN_COSINE
            meta.update(min_cosine_to_torch=cosine, export_s=round(time.perf_counter() - started, 2),
                        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
            if cosine < floor:
                raise OnnxExportError(f"the ONNX graph does not reproduce PyTorch: min cosine {cosine:.6f} < {floor}")
            (work / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                work.rename(entry)
            except OSError:  # another process finished the same export first: use theirs
                if not (entry / "meta.json").exists():
                    raise
            log.info("onnx_exported", version=manifest.version, path=str(entry), seconds=meta["export_s"],
                     min_cosine_to_torch=round(cosine, 7), quantized=quantize)
            return entry / "model.onnx"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except OnnxExportError:
        raise
    except Exception as exc:  # any failure of a third-party step is an export failure, with its reason
        raise OnnxExportError(f"ONNX export of {manifest.version} failed: {type(exc).__name__}: {exc}") from exc


class OnnxEncoder(LocalEncoder):
    """ONNX Runtime on CPU; `LocalEncoder` does the rest exactly as for TorchEncoder."""

    device = torch.device("cpu")

    def __init__(self, model_dir: Path, manifest: ModelManifest, onnx_path: Path, *, batch_size: int = 32,
                 threads: int | None = None) -> None:
        super().__init__(model_dir, manifest, AutoConfig.from_pretrained(str(model_dir)), batch_size=batch_size)
        self.onnx_path = onnx_path
        self.session = _session(onnx_path, threads)
        self._inputs = [i.name for i in self.session.get_inputs()]

    @classmethod
    def from_ref(
        cls, model_ref: str, *, quantize: bool = False, cache_dir: Path | None = None, batch_size: int = 32,
        threads: int | None = None, manifest_overrides: dict[str, Any] | None = None,
    ) -> OnnxEncoder:
        """Export (or reuse the cached export) and load. Raises OnnxExportError on any export failure;
        ModelNotFoundError when the model itself is missing, as TorchEncoder does."""
        model_dir, manifest = open_model(model_ref, manifest_overrides)
        path = export_model(model_dir, manifest, cache_dir or default_cache_dir(), quantize=quantize)
        try:
            return cls(model_dir, int8_manifest(manifest) if quantize else manifest, path, batch_size=batch_size,
                       threads=threads)
        except Exception as exc:
            raise OnnxExportError(f"cannot load the cached ONNX graph {path}: {type(exc).__name__}: {exc}") from exc

    def _hidden(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: features[name].numpy() for name in self._inputs}
        return torch.from_numpy(self.session.run(["last_hidden_state"], feeds)[0])
