"""`train reranker`: fine-tune a cross-encoder on the same JSONL groups as the embedder.

FlagEmbedding's `reranker.encoder_only.base`: each query is scored with its positive and
`train_group_size - 1` of its (mined or labelled) negatives in one forward pass, and the loss is a
softmax cross-entropy over that group (the positive must win), not a per-pair BCE. The base can be
any BERT-style encoder: a fresh one-logit classification head is added; for the stand-in, use the
vocabulary-extended model (`extend-vocab`) so Chinese characters are not `[UNK]`. The output loads
with FlagEmbedding's `FlagReranker` (and so as a `score --reranker` teacher).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
from pydantic import Field

from semsearch.encoders.local import locate_model
from semsearch.errors import InvalidInputError
from semsearch.rerankers.manifest import resolve_reranker_manifest
from trainer.finetune import (
    WORK_SUBDIR,
    FinetuneConfig,
    _precision_arguments,
    _resumable,
    _train_metrics,
    closing_arguments,
    launcher,
    run_flag_process,
)
from trainer.rows import file_hash, read_rows, write_rows

log = structlog.get_logger(__name__)

RERANKER_INFO = "semsearch_reranker_training.json"


class RerankerConfig(FinetuneConfig):
    """The embedder's settings where they mean the same; `max_len` bounds query + passage."""

    query_instruction: str = ""
    max_len: int = Field(default=128, gt=0, description="Tokens of query + passage together")
    learning_rate: float = Field(default=6e-5, gt=0)
    train_group_size: int = Field(default=8, ge=2, description="1 positive + (n-1) negatives, one softmax")


def reranker_arguments(config: RerankerConfig, *, model_dir: Path, train_file: Path, cache_dir: Path) -> list[str]:
    cuda = config.uses_cuda()
    args = [
        "--model_name_or_path", str(model_dir),
        "--train_data", str(train_file),
        "--cache_path", str(cache_dir),
        "--output_dir", str(config.output_dir),
        "--train_group_size", str(config.train_group_size),
        "--query_max_len", str(config.query_max_len),
        "--passage_max_len", str(config.passage_max_len),
        "--max_len", str(config.max_len),
        "--num_train_epochs", str(config.epochs),
        "--max_steps", str(config.max_steps),
        "--learning_rate", str(config.learning_rate),
        "--per_device_train_batch_size", str(config.batch_size),
        "--warmup_ratio", str(config.warmup_ratio),
        "--weight_decay", str(config.weight_decay),
        "--seed", str(config.seed),
        "--logging_steps", str(config.logging_steps),
        "--dataloader_num_workers", str(config.dataloader_num_workers),
        "--gradient_checkpointing", str(config.gradient_checkpointing),
        "--report_to", "none",
        *_precision_arguments(config, cuda),
    ]
    if config.query_instruction:
        args += ["--query_instruction_for_rerank", config.query_instruction, "--query_instruction_format", "{}{}"]
    return args + closing_arguments(config, cuda)


def run_reranker_finetune(
    config: RerankerConfig, *, stream_output: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Train; returns (and writes beside the weights) what was trained on and the loss log."""
    model_dir = locate_model(config.model)
    out = config.output_dir
    checkpoint = _resumable(config, out) if resume else None
    rows = [row for path in config.train_data for row in read_rows(path, require_neg=True)]
    if checkpoint is None and out.exists() and any(out.iterdir()):
        if not resume and not (out / WORK_SUBDIR / "finetune_config.json").exists():
            raise InvalidInputError(f"output directory {out} is not empty")
        shutil.rmtree(out)
    work = out / WORK_SUBDIR
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train_data.jsonl"
    write_rows(train_file, rows, contract_only=True)
    (work / "finetune_config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
    log_file = work / "train_log.json"
    cache_dir = Path(tempfile.mkdtemp(prefix="semsearch-rr-cache-"))
    command = [*launcher(config), *reranker_arguments(config, model_dir=model_dir, train_file=train_file,
                                                       cache_dir=cache_dir)]
    if checkpoint is not None:
        command += ["--resume_from_checkpoint", str(checkpoint)]
    log.info("reranker_start", model=config.model, rows=len(rows), resume_from=str(checkpoint) if checkpoint else None)
    started = time.perf_counter()
    try:
        run_flag_process(command, config, log_file=log_file, stream_output=stream_output, task="reranker")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if not any(out.glob("*.safetensors")) and not any(out.glob("pytorch_model*.bin")):
        raise RuntimeError(f"reranker fine-tune finished but wrote no weights to {out}")
    for done in out.glob("checkpoint-*"):
        shutil.rmtree(done, ignore_errors=True)
    info: dict[str, Any] = {
        "base_model": config.model,
        "data_hash": file_hash([train_file]),
        "max_len": config.max_len,
        "train": _train_metrics(log_file) | {"wall_s": round(time.perf_counter() - started, 1), "rows": len(rows)},
    }
    (out / RERANKER_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    # What serving and `promote --reranker` read: the version of these weights, the length trained
    # with, and raw logits (group-wise softmax training gives no calibrated probability).
    resolve_reranker_manifest(out, str(out), {"max_length": config.max_len, "activation": "none",
                                              "parent_model": config.model}).save(out)
    log.info("reranker_done", out=str(out), wall_s=info["train"]["wall_s"])
    return info
