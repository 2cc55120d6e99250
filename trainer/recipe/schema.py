"""The recipe file: its schema (one model per step's settings) and `load_recipe`, which checks every
setting and file before any step runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semsearch.errors import InvalidInputError
from trainer.finetune import FinetuneConfig
from trainer.prepare import Source
from trainer.reranker import RerankerConfig

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


def _resolve_files(path: Path, recipe: Recipe, resolve: Callable[[Path], Path], check_files: bool) -> None:
    """Every file the recipe names, made relative to the recipe and checked to exist (`check_files`)."""

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

    _resolve_files(path, recipe, resolve, check_files)
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
            if check_files and not steps.promote.config.is_file():
                raise RecipeError(f"{path}: steps.promote.config: file not found: {steps.promote.config}")
    if recipe.device == "cpu" and any(ft.get("precision") in ("fp16", "bf16") for ft in recipe.round_finetune):
        raise RecipeError(f"{path}: steps.finetune.precision: fp16/bf16 need a GPU, but device is cpu")
    return recipe
