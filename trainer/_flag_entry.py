"""Subprocess entry for FlagEmbedding's `encoder_only.base` fine-tune (plain python or torchrun).

Same arguments as `python -m FlagEmbedding.finetune.embedder.encoder_only.base`; additionally writes
the trainer's log history (losses, runtime) to $SEMSEARCH_TRAIN_LOG so the manifest can record it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def main() -> None:
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments,
        EncoderOnlyEmbedderModelArguments,
        EncoderOnlyEmbedderRunner,
        EncoderOnlyEmbedderTrainingArguments,
    )
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (
            EncoderOnlyEmbedderModelArguments,
            EncoderOnlyEmbedderDataArguments,
            EncoderOnlyEmbedderTrainingArguments,
        )
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    runner = EncoderOnlyEmbedderRunner(model_args=model_args, data_args=data_args, training_args=training_args)
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
                },
                indent=2,
            ),
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
