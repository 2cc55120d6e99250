"""`finetune`: FlagEmbedding's `encoder_only.base` fine-tune from a typed config, then a model manifest.

Training runs in a subprocess (python, or torchrun for several GPUs) so the CLI process never holds
the training state, and a crash there leaves a readable exit code here. The output directory gets
`semsearch_manifest.json` with the pooling, normalization and query instruction the model was trained
with, so serving can only load it the way it was trained; plus a sentence-transformers config saying
the same for other tools, the exact training data (its hash is the manifest's data_hash), the
config, and the trainer's loss log.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from semsearch.encoders.local import locate_model
from semsearch.errors import InvalidInputError
from semsearch.manifest import BGE_ZH_INSTRUCTION, ModelManifest, resolve_manifest, weights_hash
from trainer._flag_entry import EMBEDDING_LR_ENV
from trainer.rows import file_hash, read_rows, write_rows

log = structlog.get_logger(__name__)

WORK_SUBDIR = "training"


def settings_file_with_overrides(path: Path | None, overrides: dict[str, Any], what: str) -> dict[str, Any]:
    """A step's settings: the YAML mapping in `path` (optional), non-None `overrides` (CLI flags) on top."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise InvalidInputError(f"{path}: expected a mapping of {what} settings")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return data


class FinetuneConfig(BaseModel):
    """Everything that decides the fine-tuned weights. YAML keys are these field names."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="Base model: local directory or hub id")
    train_data: list[Path] = Field(min_length=1, description="FlagEmbedding JSONL rows (with neg)")
    output_dir: Path
    name: str | None = Field(default=None, description="Manifest name; default <parent>-ft")
    query_instruction: str = BGE_ZH_INSTRUCTION
    pooling: Literal["cls", "mean"] | None = Field(default=None, description="Default: the base model's manifest")
    normalize: bool = True
    temperature: float = Field(default=0.02, gt=0)
    train_group_size: int = Field(default=8, ge=2, description="1 positive + (n-1) negatives per query")
    query_max_len: int = Field(default=64, gt=0)
    passage_max_len: int = Field(default=256, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, description="> 0 overrides epochs")
    learning_rate: float = Field(default=1e-5, gt=0)
    embedding_learning_rate: float | None = Field(
        default=None,
        gt=0,
        description="Learning rate of the input embedding matrix, where extend-vocab's new character rows "
        "live (they start untrained while the body is pretrained); default: learning_rate",
    )
    batch_size: int = Field(default=32, gt=0, description="Queries per device per step")
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    knowledge_distillation: bool = False
    kd_loss_type: Literal["kl_div", "m3_kd_loss"] = "kl_div"
    negatives_cross_device: bool = False
    seed: int = 42
    device: str = Field(default="auto", description="auto, cpu or cuda")
    nproc_per_node: int = Field(default=1, ge=1, description="Processes (GPUs) on this node")
    launcher: Literal["auto", "python", "torchrun"] = Field(
        default="auto", description="auto: torchrun when nproc_per_node > 1, else one python process"
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="auto: bf16 on GPUs that have it (no loss scaling), else fp16; fp32 on CPU"
    )
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_steps: int = Field(
        default=0, ge=0, description="0: no intermediate checkpoints; > 0: a run killed mid-way resumes from the last"
    )
    save_total_limit: int = Field(default=2, ge=1, description="Checkpoints kept (each holds the optimizer state)")
    dataloader_num_workers: int = 0
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads per process (OMP_NUM_THREADS); 1 is fastest on a busy CPU",
    )
    extra_args: list[str] = Field(default_factory=list, description="Passed to FlagEmbedding as is")

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.nproc_per_node > 1 and self.device == "cpu":
            raise ValueError("nproc_per_node > 1 needs GPUs (device cuda or auto)")
        if self.nproc_per_node > 1 and self.launcher == "python":
            raise ValueError("nproc_per_node > 1 needs the torchrun launcher")
        return self

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> FinetuneConfig:
        """YAML file (optional) with non-None overrides (CLI flags) on top."""
        return cls.model_validate(settings_file_with_overrides(path, overrides, "finetune"))

    def uses_cuda(self) -> bool:
        if self.device == "cpu":
            return False
        import torch

        return self.device.startswith("cuda") or torch.cuda.is_available()


def flag_arguments(
    config: FinetuneConfig, *, model_dir: Path, pooling: str, train_file: Path, cache_dir: Path
) -> list[str]:
    """The command-line arguments of FlagEmbedding's fine-tune for this config."""
    cuda = config.uses_cuda()
    args = [
        "--model_name_or_path",
        str(model_dir),
        "--train_data",
        str(train_file),
        "--cache_path",
        str(cache_dir),
        "--output_dir",
        str(config.output_dir),
        "--train_group_size",
        str(config.train_group_size),
        "--query_max_len",
        str(config.query_max_len),
        "--passage_max_len",
        str(config.passage_max_len),
        "--knowledge_distillation",
        str(config.knowledge_distillation),
        "--kd_loss_type",
        config.kd_loss_type,
        "--sentence_pooling_method",
        pooling,
        "--normalize_embeddings",
        str(config.normalize),
        "--temperature",
        str(config.temperature),
        "--num_train_epochs",
        str(config.epochs),
        "--max_steps",
        str(config.max_steps),
        "--learning_rate",
        str(config.learning_rate),
        "--per_device_train_batch_size",
        str(config.batch_size),
        "--warmup_ratio",
        str(config.warmup_ratio),
        "--weight_decay",
        str(config.weight_decay),
        "--seed",
        str(config.seed),
        "--negatives_cross_device",
        str(config.negatives_cross_device),
        "--gradient_checkpointing",
        str(config.gradient_checkpointing),
        "--logging_steps",
        str(config.logging_steps),
        "--dataloader_num_workers",
        str(config.dataloader_num_workers),
        "--report_to",
        "none",
        *_precision_arguments(config, cuda),
    ]
    if config.query_instruction:
        args += [
            "--query_instruction_for_retrieval",
            config.query_instruction,
            "--query_instruction_format",
            "{}{}",
        ]
    return args + closing_arguments(config, cuda)


def closing_arguments(config: FinetuneConfig, cuda: bool) -> list[str]:
    """Checkpointing, CPU and the user's extra arguments: the same for embedder and reranker runs."""
    args = (["--save_strategy", "steps", "--save_steps", str(config.save_steps),
             "--save_total_limit", str(config.save_total_limit)] if config.save_steps else ["--save_strategy", "no"])
    if not cuda:
        args += ["--use_cpu", "True", "--dataloader_pin_memory", "False"]
    return args + list(config.extra_args)


def _precision_arguments(config: FinetuneConfig, cuda: bool) -> list[str]:
    precision = config.precision
    if precision == "auto":
        if not cuda:
            precision = "fp32"
        else:
            import torch

            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return ["--fp16", str(precision == "fp16"), "--bf16", str(precision == "bf16")]


def launcher(config: FinetuneConfig) -> list[str]:
    if config.launcher == "torchrun" or (config.launcher == "auto" and config.nproc_per_node > 1):
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(config.nproc_per_node),
            "-m",
            "trainer._flag_entry",
        ]
    return [sys.executable, "-m", "trainer._flag_entry"]


def _write_sentence_transformers_config(out_dir: Path, pooling: str, normalize: bool, max_tokens: int) -> None:
    """So sentence-transformers loads the model with the trained pooling too, not its mean default."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out_dir / "2_Normalize").mkdir(exist_ok=True)
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    (out_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_tokens, "do_lower_case": False}, indent=2), encoding="utf-8"
    )
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    (out_dir / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": int(config["hidden_size"]),
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            indent=2,
        ),
        encoding="utf-8",
    )


def _train_metrics(log_file: Path) -> dict[str, Any]:
    if not log_file.exists():
        return {}
    data = json.loads(log_file.read_text(encoding="utf-8"))
    history = data.get("log_history", [])
    losses = [[h["step"], h["loss"]] for h in history if "loss" in h]
    final: dict[str, Any] = next((h for h in reversed(history) if "train_runtime" in h), {})
    return {
        "steps": data.get("global_step"),
        "epochs": data.get("epoch"),
        "world_size": data.get("world_size"),
        "device": data.get("device"),
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "train_loss": final.get("train_loss"),
        "train_runtime_s": final.get("train_runtime"),
        "train_samples_per_second": final.get("train_samples_per_second"),
        "resumed_from_step": data.get("resumed_from_step"),
        "steps_this_run": data.get("steps_this_run"),
        "losses": losses,
    }


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete HF checkpoint under `out` (`checkpoint-N` with its trainer state, which
    the Trainer writes after the weights and the optimizer), or None."""
    done = [
        d for d in out.glob("checkpoint-*")
        if d.name.split("-", 1)[1].isdigit() and (d / "trainer_state.json").exists()
    ]
    return max(done, key=lambda d: int(d.name.split("-", 1)[1]), default=None)


def _resumable(config: FinetuneConfig, out: Path) -> Path | None:
    """A checkpoint of an interrupted run of this very config (same settings file), else None."""
    saved = out / WORK_SUBDIR / "finetune_config.json"
    if not saved.exists() or saved.read_text(encoding="utf-8") != config.model_dump_json(indent=2):
        return None
    return last_checkpoint(out)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies, so a killed `train run` leaves no trainer behind
    (it would otherwise keep writing into the step directory the resumed run uses)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def run_flag_process(
    command: list[str],
    config: FinetuneConfig,
    *,
    log_file: Path,
    stream_output: bool = True,
    task: str = "embedder",
) -> None:
    """Run a FlagEmbedding fine-tune (`trainer._flag_entry`) in a child process; RuntimeError if it fails."""
    env = dict(
        os.environ,
        SEMSEARCH_TRAIN_LOG=str(log_file),
        SEMSEARCH_FLAG_TASK=task,
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
    )
    if not config.uses_cuda():
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop(EMBEDDING_LR_ENV, None)  # only this config's setting, never one inherited from the shell
    if config.embedding_learning_rate is not None:
        env[EMBEDDING_LR_ENV] = repr(config.embedding_learning_rate)
    if config.torch_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(config.torch_threads)
    # The package root must be importable by the child (`-m trainer._flag_entry`).
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        command,
        env=env,
        check=False,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        stdout=None if stream_output else subprocess.PIPE,
        stderr=None if stream_output else subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        tail = (result.stdout or "")[-4000:]
        raise RuntimeError(f"FlagEmbedding fine-tune failed (exit {result.returncode}){': ' + tail if tail else ''}")


def _checkpoint_or_overwritable(config: FinetuneConfig, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (with `resume`), else None once the output directory is known to
    be empty or an earlier fine-tune's output that may be replaced."""
    out = config.output_dir
    checkpoint = _resumable(config, out) if resume else None
    if checkpoint is None and out.exists() and any(out.iterdir()):
        if not (overwrite or resume):
            raise InvalidInputError(f"output directory {out} is not empty (use --overwrite)")
        if not (out / WORK_SUBDIR / "finetune_config.json").exists():
            # --overwrite deletes only an earlier fine-tune's output, never an arbitrary directory.
            raise InvalidInputError(f"{out} is not the output of an earlier fine-tune: not overwriting it")
    return checkpoint


def run_finetune(
    config: FinetuneConfig, *, overwrite: bool = False, stream_output: bool = True, resume: bool = False
) -> ModelManifest:
    """Train, then write the manifest; returns it. Raises InvalidInputError on bad data or config.

    `resume`: when `output_dir` holds a checkpoint of an interrupted run of the same config, continue
    from it (HF Trainer `resume_from_checkpoint`: step, optimizer, scheduler and data order), else
    start over in it."""
    model_dir = locate_model(config.model)
    parent = resolve_manifest(model_dir, config.model)
    pooling = config.pooling or parent.pooling
    out = config.output_dir
    checkpoint = _checkpoint_or_overwritable(config, resume=resume, overwrite=overwrite)
    # Validate every row first: a bad line 90,000 should fail now, by line, not mid-training.
    rows = [
        row
        for path in config.train_data
        for row in read_rows(path, require_neg=True, require_scores=config.knowledge_distillation)
    ]
    if checkpoint is None and out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    if len(rows) < config.batch_size * config.nproc_per_node:
        log.warning("fewer_rows_than_one_batch", rows=len(rows), batch_size=config.batch_size)
    work = out / WORK_SUBDIR
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train_data.jsonl"
    # Only the contract fields: FlagEmbedding concatenates files column-wise and reads `prompt`.
    write_rows(train_file, rows, contract_only=True)
    data_hash = file_hash([train_file])
    (work / "finetune_config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
    log_file = work / "train_log.json"

    cache_dir = Path(tempfile.mkdtemp(prefix="semsearch-ft-cache-"))
    command = [
        *launcher(config),
        *flag_arguments(config, model_dir=model_dir, pooling=pooling, train_file=train_file, cache_dir=cache_dir),
    ]
    if checkpoint is not None:
        command += ["--resume_from_checkpoint", str(checkpoint)]
        log.info("finetune_resume", checkpoint=str(checkpoint))
    log.info(
        "finetune_start",
        model=config.model,
        rows=len(rows),
        pooling=pooling,
        data_hash=data_hash,
        command=" ".join(command[:6]) + " ...",
    )
    started = time.perf_counter()
    try:
        run_flag_process(command, config, log_file=log_file, stream_output=stream_output)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    wall = time.perf_counter() - started
    if not any(out.glob("*.safetensors")) and not any(out.glob("pytorch_model*.bin")):
        raise RuntimeError(f"fine-tune finished but wrote no weights to {out}")
    for done in out.glob("checkpoint-*"):  # only needed to resume; each holds the optimizer state
        shutil.rmtree(done, ignore_errors=True)

    _write_sentence_transformers_config(out, pooling, config.normalize, parent.max_tokens)
    name = config.name or f"{parent.name}-ft"
    hidden = int(json.loads((out / "config.json").read_text(encoding="utf-8"))["hidden_size"])
    manifest = ModelManifest(
        name=name,
        version=f"{name}-{data_hash[:8]}-{weights_hash(out)}",
        pooling=pooling,
        normalize=config.normalize,
        query_instruction=config.query_instruction,
        dimension=hidden,
        max_tokens=parent.max_tokens,
        parent_model=parent.version,
        data_hash=data_hash,
        metrics={"train": _train_metrics(log_file) | {"wall_s": round(wall, 1), "rows": len(rows)}},
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    manifest.save(out)
    log.info("finetune_done", out=str(out), version=manifest.version, wall_s=round(wall, 1))
    return manifest
