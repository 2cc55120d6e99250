"""Subprocess entry for FlagEmbedding's `encoder_only.base` fine-tunes (plain python or torchrun).

Same arguments as `python -m FlagEmbedding.finetune.embedder.encoder_only.base` (or, with
SEMSEARCH_FLAG_TASK=reranker, `...finetune.reranker.encoder_only.base`); additionally writes
the trainer's log history (losses, runtime) to $SEMSEARCH_TRAIN_LOG so the manifest can record it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# FlagEmbedding's argument parser has no per-group learning rate: the parent passes it here.
EMBEDDING_LR_ENV = "SEMSEARCH_EMBEDDING_LR"


def _checkpoint_step(checkpoint: str | None) -> int | None:
    if not checkpoint:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state["global_step"])


def _load_inner(wrapper: Any, checkpoint: str) -> None:
    import safetensors.torch
    import torch

    inner = wrapper.model
    folder = Path(checkpoint)
    if (folder / "model.safetensors").exists():
        state = safetensors.torch.load_file(str(folder / "model.safetensors"), device="cpu")
    else:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    result = inner.load_state_dict(state, strict=False)
    # Non-persistent buffers and tied weights may be absent from a save; anything else is a mismatch.
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if hasattr(inner, "tie_weights"):
        inner.tie_weights()


def _embedding_learning_rate(trainer: Any, learning_rate: float) -> None:
    """Give the input embedding matrix its own optimizer group at `learning_rate` (the rest keep the
    trainer's). The scheduler, made after the optimizer, scales every group from its own rate."""
    make_optimizer = trainer.create_optimizer

    def create_optimizer() -> Any:
        optimizer = make_optimizer()
        if any(group.get("is_embedding") for group in optimizer.param_groups):
            return optimizer  # already split (the Trainer returns its optimizer on later calls)
        weight = trainer.model.model.get_input_embeddings().weight
        decay = 0.0
        for group in optimizer.param_groups:
            if any(p is weight for p in group["params"]):
                decay = group["weight_decay"]
                group["params"] = [p for p in group["params"] if p is not weight]
        optimizer.add_param_group(
            {"params": [weight], "weight_decay": decay, "lr": learning_rate, "is_embedding": True}
        )
        return optimizer

    trainer.create_optimizer = create_optimizer


def main() -> None:
    if os.environ.get("SEMSEARCH_FLAG_TASK") == "reranker":
        from FlagEmbedding.abc.finetune.reranker import AbsRerankerDataArguments as DataArguments
        from FlagEmbedding.abc.finetune.reranker import AbsRerankerModelArguments as ModelArguments
        from FlagEmbedding.abc.finetune.reranker import AbsRerankerTrainingArguments as TrainingArguments
        from FlagEmbedding.finetune.reranker.encoder_only.base import EncoderOnlyRerankerRunner as Runner
    else:
        from FlagEmbedding.finetune.embedder.encoder_only.base import (
            EncoderOnlyEmbedderDataArguments as DataArguments,  # type: ignore[assignment]
        )
        from FlagEmbedding.finetune.embedder.encoder_only.base import (
            EncoderOnlyEmbedderModelArguments as ModelArguments,  # type: ignore[assignment]
        )
        from FlagEmbedding.finetune.embedder.encoder_only.base import (
            EncoderOnlyEmbedderRunner as Runner,  # type: ignore[assignment]
        )
        from FlagEmbedding.finetune.embedder.encoder_only.base import (
            EncoderOnlyEmbedderTrainingArguments as TrainingArguments,  # type: ignore[assignment]
        )
    from transformers import HfArgumentParser, TrainerCallback

    class StepCounter(TrainerCallback):  # type: ignore[misc]
        steps = 0

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.steps += 1

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    runner = Runner(model_args=model_args, data_args=data_args, training_args=training_args)
    embedding_lr = os.environ.get(EMBEDDING_LR_ENV)
    if embedding_lr:
        _embedding_learning_rate(runner.trainer, float(embedding_lr))
    counter = StepCounter()
    runner.trainer.add_callback(counter)
    # FlagEmbedding checkpoints hold the inner transformers model (its `save_pretrained`), while the
    # Trainer would load them into the wrapper, whose keys all differ (`model.` prefix): with
    # strict=False that restores no weight at all, and then fails on a missing attribute. Load them
    # into the inner model, strictly.
    runner.trainer._load_from_checkpoint = lambda checkpoint, model=None: _load_inner(
        runner.trainer.model if model is None else model, checkpoint
    )
    resumed_from = _checkpoint_step(training_args.resume_from_checkpoint)
    runner.run()
    log_path = os.environ.get("SEMSEARCH_TRAIN_LOG")
    if log_path and runner.trainer.is_world_process_zero():
        state = runner.trainer.state
        Path(log_path).write_text(
            json.dumps(
                {
                    "global_step": state.global_step,
                    "epoch": state.epoch,
                    "log_history": state.log_history,
                    "world_size": training_args.world_size,
                    "device": str(training_args.device),
                    # Evidence that a resumed run continued: steps done here + the checkpoint's step.
                    "resumed_from_step": resumed_from,
                    "steps_this_run": counter.steps,
                },
                indent=2,
            ),
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
