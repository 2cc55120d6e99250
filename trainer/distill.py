"""`distill`: teach a transformers student the vectors of a teacher encoder on unlabelled text.

The teacher is any configured encoder (the packaged USE-Multilingual v3 in process by default, or a
remote server), read through `trainer.encoding` like mining and evaluation. The student is a
WordPiece (BERT) model, by default the packaged MiniLM stand-in with its vocabulary extended to the
corpus' characters (`trainer.vocab`); its new rows may start from the teacher's own token embeddings
(`trainer.distill_init`). The student learns to reproduce the teacher's vectors:

- `mse` / `cosine`: between the teacher's vector and a linear projection (a training-only head,
  not saved) of the student's pooled vector, when the dimensions differ;
- `simmatrix`: between the in-batch cosine-similarity matrices, which constrains the very vector the
  student will serve (pooled and normalised), with no head at all; `mse+simmatrix` adds both.

The output is an ordinary model directory with `semsearch_manifest.json` (the student's pooling, no
query instruction: the student learnt texts as the teacher sees them), servable by every backend
and a valid base for `finetune`. Not to be confused with the recipe's `distil` step, which
fine-tunes with a cross-encoder's scores as soft labels (FlagEmbedding's knowledge distillation).

Teacher vectors are computed once per (teacher version, text list) and cached as `.npy`; training
checkpoints every `save_steps` and a killed run continues from the last one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from semsearch.chunking import split_sentences
from semsearch.encoders.base import Encoder
from semsearch.encoders.use import USE_MODEL
from semsearch.errors import InvalidInputError
from semsearch.manifest import MANIFEST_FILENAME, ModelManifest, resolve_manifest, weights_hash
from trainer.distill_init import InitMap

log = structlog.get_logger(__name__)

WORK_SUBDIR = "distill"
Loss = Literal["mse", "cosine", "simmatrix", "mse+simmatrix", "cosine+simmatrix"]
STAND_IN = "sentence-transformers/all-MiniLM-L6-v2"


class DistillConfig(BaseModel):
    """Everything that decides the student's weights. YAML/recipe keys are these field names."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    student: str = Field(default=STAND_IN, description="WordPiece model directory or hub id")
    teacher: str = Field(default=USE_MODEL, description="Any model create_encoder knows")
    output_dir: Path
    name: str | None = Field(default=None, description="Manifest name; default <student>-distilled")
    loss: Loss = "mse+simmatrix"
    simmatrix_weight: float = Field(default=1.0, gt=0, description="Weight of the similarity-matrix term")
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, description="> 0 overrides epochs")
    max_texts: int | None = Field(default=None, gt=0, description="Distil on at most this many texts")
    max_len: int = Field(default=64, gt=0, description="Student tokens per text while training")
    split_over: int = Field(default=80, gt=0, description="Texts longer than this many characters are split "
                            "into sentences (passages)")
    lr: float = Field(default=1e-4, gt=0, description="Learning rate of the transformer body")
    embedding_lr: float = Field(default=1e-3, gt=0, description="Learning rate of the embeddings and the head")
    batch_size: int = Field(default=64, gt=1)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    extend_vocab: bool = Field(default=True, description="Add the corpus' unknown characters first")
    init_from_teacher: bool = Field(default=True, description="New character rows from the teacher's embeddings")
    init_map: InitMap = "lstsq"
    eval_texts: int = Field(default=500, ge=0, description="Held-out texts for the agreement metric")
    save_steps: int = Field(default=100, ge=0, description="Checkpoint every N steps (0: never)")
    logging_steps: int = Field(default=10, gt=0)
    seed: int = 42

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> DistillConfig:
        """YAML file (optional) with non-None overrides (CLI flags) on top."""
        from trainer.finetune import settings_file_with_overrides

        try:
            return cls.model_validate(settings_file_with_overrides(path, overrides, "distill"))
        except ValidationError as exc:
            raise InvalidInputError(f"distill settings: {exc}") from exc


def default_cache_dir() -> Path:
    """Where teacher vectors are kept between runs (per teacher version and text list)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semsearch" / "distill"


@dataclass
class DistillResult:
    manifest: ModelManifest
    stats: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Texts


def texts_of_rows(paths: Sequence[Path]) -> list[str]:
    """Every text of FlagEmbedding rows (query, positives, negatives), in file order."""
    from trainer.rows import read_rows

    return [t for path in paths for row in read_rows(path) for t in (row.query, *row.pos, *row.neg)]


def texts_of_corpus(paths: Sequence[Path]) -> list[str]:
    from trainer.mine import read_corpus

    return [c.text for path in paths for c in read_corpus(path)]


def distillation_texts(texts: Sequence[str], *, split_over: int, seed: int, sources: str) -> list[str]:
    """Unique texts, passages split into their sentences (what a query or a chunk looks like), shuffled
    with `seed`. InvalidInputError naming `sources` when nothing usable is left."""
    from trainer.rows import normalize_text

    seen: set[str] = set()
    out: list[str] = []
    for text in texts:
        pieces = split_sentences(text) if len(text) > split_over else [text]
        for piece in pieces:
            piece = normalize_text(piece)
            if len(piece) >= 2 and piece not in seen:  # a lone character or mark says nothing
                seen.add(piece)
                out.append(piece)
    if not out:
        raise InvalidInputError(f"no usable text to distil on in {sources}")
    random.Random(seed).shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------
# Teacher vectors, cached


def teacher_cache_file(cache_dir: Path, teacher_version: str, texts: Sequence[str]) -> Path:
    digest = hashlib.sha256(teacher_version.encode("utf-8"))
    for text in texts:
        digest.update(b"\0" + text.encode("utf-8"))
    return cache_dir / f"teacher-{digest.hexdigest()[:24]}.npy"


def teacher_vectors(teacher: Encoder, texts: Sequence[str], cache_dir: Path, *, show: bool = True) -> np.ndarray:
    """The teacher's document vectors of `texts`, from the cache when this teacher version has encoded
    this exact list before."""
    from trainer.encoding import encode_texts

    path = teacher_cache_file(cache_dir, teacher.manifest.version, texts)
    if path.exists():
        log.info("teacher_vectors_cached", file=str(path), texts=len(texts))
        return np.load(path)
    started = time.perf_counter()
    vectors = encode_texts(teacher.encode_documents, texts, desc="teacher", show=show)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, path)
    log.info("teacher_vectors_encoded", file=str(path), texts=len(texts),
             wall_s=round(time.perf_counter() - started, 1))
    return vectors


# ----------------------------------------------------------------------------------------------
# The student before training


def _new_rows_from(manifest: ModelManifest) -> int | None:
    """Where extend-vocab's rows start in a vocabulary-extended model (from its manifest), else None."""
    vocab = manifest.metrics.get("vocab") or {}
    return int(vocab["old_vocab"]) if "old_vocab" in vocab else None


def prepare_student(config: DistillConfig, texts: Sequence[str], teacher: Encoder, target: Path) -> dict[str, Any]:
    """Write the untrained student to `target`: extended vocabulary (or a check that none is missing),
    new rows from the teacher. Returns what was done."""
    from transformers import AutoModel, AutoTokenizer

    from semsearch.encoders.local import locate_model
    from trainer.vocab import extend_vocabulary, unknown_characters

    if target.exists():
        shutil.rmtree(target)
    source_dir = locate_model(config.student)
    earlier = _new_rows_from(resolve_manifest(source_dir, config.student))  # a student extended before
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    missing = unknown_characters(tokenizer, texts)
    stats: dict[str, Any] = {"missing_characters": len(missing)}
    if missing and not config.extend_vocab:
        sample = "".join(ch for ch, _ in missing.most_common(20))
        raise InvalidInputError(
            f"the student's tokenizer ({config.student}) misses {len(missing)} characters of the corpus "
            f"(most frequent: {sample}): turn extend_vocab on (--extend-vocab) or pick another student")
    if missing:
        result = extend_vocabulary(config.student, texts, target, seed=config.seed, query_instruction="",
                                   name=f"{config.name or 'student'}-vocab")
        stats["vocab"] = result.stats
    else:
        shutil.copytree(source_dir, target)
        if not (target / MANIFEST_FILENAME).exists():  # keep the parent's pooling, not a guess by directory name
            resolve_manifest(source_dir, config.student).model_copy(update={"model_path": ""}).save(target)
    added_now = _new_rows_from(resolve_manifest(target, str(target))) if missing else None
    known = [n for n in (earlier, added_now) if n is not None]
    new_from = min(known) if known else None  # every row an extension added, now or before
    if config.init_from_teacher and new_from is not None:
        if not hasattr(teacher, "token_embeddings"):
            log.warning("init_from_teacher_unavailable", teacher=config.teacher,
                        reason="the teacher exposes no token embeddings (remote?): new rows stay random")
            stats["init"] = "random (teacher has no token embeddings)"
        else:
            from trainer.distill_init import init_new_rows

            model = AutoModel.from_pretrained(str(target))
            vocab = [t for t, _ in sorted(AutoTokenizer.from_pretrained(str(target)).get_vocab().items(),
                                          key=lambda item: item[1])]
            stats["init"] = init_new_rows(model, teacher, vocab, new_from, config.init_map)
            model.save_pretrained(str(target))
    return stats


# ----------------------------------------------------------------------------------------------
# Training


class _Student(torch.nn.Module):
    """The transformer plus the training-only head (teacher dimension), pooled like it will be served."""

    def __init__(self, model_dir: Path, pooling: str, teacher_dim: int) -> None:
        super().__init__()
        from semsearch.encoders.local import load_model

        self.body = load_model(model_dir).train()
        self.pooling = pooling
        hidden = int(self.body.config.hidden_size)
        self.head = torch.nn.Linear(hidden, teacher_dim, bias=False)
        if hidden == teacher_dim:
            torch.nn.init.eye_(self.head.weight)

    def served(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The vector the encoders serve: pooled, normalised."""
        from semsearch.encoders.local import pool

        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.nn.functional.normalize(pool(hidden, attention_mask, self.pooling), dim=-1)


def distill_loss(config: DistillConfig, served: torch.Tensor, projected: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
    loss = served.new_zeros(())
    if config.loss.startswith("mse"):
        loss = loss + torch.nn.functional.mse_loss(projected, target) * target.shape[1]  # per-vector squared error
    if config.loss.startswith("cosine"):
        loss = loss + (1 - torch.nn.functional.cosine_similarity(projected, target, dim=-1)).mean()
    if config.loss.endswith("simmatrix"):
        teacher_sims = target @ target.T
        loss = loss + config.simmatrix_weight * torch.nn.functional.mse_loss(served @ served.T, teacher_sims)
    return loss


def _optimizer(student: _Student, config: DistillConfig) -> torch.optim.Optimizer:
    """New character rows (and the fresh head) learn at `embedding_lr`, the pretrained body at `lr`."""
    embeddings = student.body.get_input_embeddings().weight
    body = [p for p in student.body.parameters() if p is not embeddings]
    return torch.optim.AdamW([
        {"params": body, "lr": config.lr},
        {"params": [embeddings, *student.head.parameters()], "lr": config.embedding_lr, "weight_decay": 0.0},
    ], weight_decay=0.01)


class _Schedule:
    """The texts of each global step. Per epoch a fixed permutation (so a resumed run sees the same
    data), cut into windows of 50 batches sorted by length: a batch holds texts of similar length and
    pads little (short questions beside 60-token sentences would triple the work)."""

    WINDOW = 50

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.per_epoch = max(1, len(lengths) // batch_size)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._plan(epoch))
        return self._epoch[1][index]

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        order = order[: self.per_epoch * self.batch_size]
        window = self.WINDOW * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches


@dataclass
class _State:
    step: int = 0
    losses: list[list[float]] | None = None
    resumed_from: int | None = None


def _save_checkpoint(path: Path, student: _Student, optimizer: Any, scheduler: Any, state: _State) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": state.step, "losses": state.losses}, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint whole


def train_student(config: DistillConfig, student: _Student, tokenized: list[list[int]], targets: np.ndarray,
                  work: Path, *, pad_id: int, show: bool = True) -> _State:
    """The distillation loop; resumes from `work/checkpoint.pt` when present."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    schedule = _Schedule([len(ids) for ids in tokenized], config.batch_size, config.seed)
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * schedule.per_epoch))
    optimizer = _optimizer(student, config)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * config.warmup_ratio), total)
    state = _State(losses=[])
    checkpoint = work / "checkpoint.pt"
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        student.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = _State(step=saved["step"], losses=saved["losses"], resumed_from=saved["step"])
        log.info("distill_resume", step=state.step, total=total)
    teacher = torch.from_numpy(targets)
    running: list[float] = []
    with tqdm(total=total, initial=state.step, desc="distil", unit="step", disable=not show) as bar:
        while state.step < total:
            ids = schedule.batch(state.step)
            input_ids, mask = _pad([tokenized[i] for i in ids], pad_id)
            served = student.served(input_ids, mask)
            loss = distill_loss(config, served, student.head(served), teacher[ids])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            running.append(loss.item())
            bar.update(1)
            if state.step % config.logging_steps == 0 or state.step == total:
                assert state.losses is not None
                state.losses.append([state.step, round(sum(running) / len(running), 5)])
                bar.set_postfix(loss=f"{state.losses[-1][1]:.4f}")
                running = []
            if config.save_steps and state.step % config.save_steps == 0 and state.step < total:
                _save_checkpoint(checkpoint, student, optimizer, scheduler, state)
    return state


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return input_ids, mask


# ----------------------------------------------------------------------------------------------
# The whole command


def agreement(student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """How alike two encoders rank the same texts: the correlation of their pairwise cosines, and how
    often both give a text the same nearest neighbour."""
    if len(student) < 3:
        return {}
    s, t = student @ student.T, teacher @ teacher.T
    upper = np.triu_indices(len(s), k=1)
    np.fill_diagonal(s, -np.inf)
    np.fill_diagonal(t, -np.inf)
    return {"sim_corr": round(float(np.corrcoef(s[upper], t[upper])[0, 1]), 4),
            "top1_agreement": round(float((s.argmax(axis=1) == t.argmax(axis=1)).mean()), 4)}


def _served_vectors(model_dir: Path, texts: Sequence[str]) -> np.ndarray:
    """Through the serving encoder (TorchEncoder: the manifest's pooling and truncation)."""
    from semsearch.encoders.local import TorchEncoder

    encoder = TorchEncoder.from_ref(str(model_dir), device="cpu", batch_size=64)
    try:
        return encoder.encode_documents(list(texts))
    finally:
        encoder.close()


def _start_work(config: DistillConfig, fingerprint: str) -> Path:
    """The work directory of this config; an interrupted run of the same config is kept (resume)."""
    out, work = config.output_dir, config.output_dir / WORK_SUBDIR
    saved = work / "distill_config.json"
    same = saved.exists() and json.loads(saved.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
    if out.exists() and any(out.iterdir()) and not same:
        if not saved.exists():
            raise InvalidInputError(f"output directory {out} is not empty (and not an earlier distillation)")
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    if not same:
        saved.write_text(json.dumps({"fingerprint": fingerprint, "config": config.model_dump(mode="json")},
                                    indent=2, ensure_ascii=False), encoding="utf-8")
    return work


def split_texts(config: DistillConfig, texts: list[str]) -> tuple[list[str], list[str]]:
    """(training texts, held-out agreement texts): the held-out ones never train."""
    held = min(config.eval_texts, len(texts) // 5)
    train = texts[held:]
    return (train[: config.max_texts] if config.max_texts else train), texts[:held]


def run_distill(config: DistillConfig, texts: Sequence[str], teacher_factory: Callable[[], Encoder], *,
                sources: str, cache_dir: Path, show: bool = True) -> DistillResult:
    """Distil the teacher into the student on `texts`; writes the model to `config.output_dir`."""
    started = time.perf_counter()
    pool = distillation_texts(texts, split_over=config.split_over, seed=config.seed, sources=sources)
    train, held = split_texts(config, pool)
    teacher = teacher_factory()
    try:
        vectors = teacher_vectors(teacher, [*train, *held], cache_dir, show=show)
        cache_file = teacher_cache_file(cache_dir, teacher.manifest.version, [*train, *held])
        data_hash = cache_file.stem.removeprefix("teacher-")
        settings = config.model_dump_json(exclude={"output_dir"})
        fingerprint = hashlib.sha256(f"{settings}|{data_hash}".encode()).hexdigest()
        work = _start_work(config, fingerprint)
        init_dir = work / "student-init"
        init_stats: dict[str, Any] = {}
        if not (work / "checkpoint.pt").exists() or not (init_dir / "config.json").exists():
            init_stats = prepare_student(config, [*train, *held], teacher, init_dir)
            (work / "init_stats.json").write_text(json.dumps(init_stats, indent=2, default=str), encoding="utf-8")
        elif (work / "init_stats.json").exists():
            init_stats = json.loads((work / "init_stats.json").read_text(encoding="utf-8"))
        teacher_version = teacher.manifest.version
    finally:
        teacher.close()
    before = agreement(_served_vectors(init_dir, held), vectors[len(train):]) if held else {}
    state, manifest_parent = _train_and_save(config, init_dir, train, vectors[: len(train)], work, show=show)
    after = agreement(_served_vectors(config.output_dir, held), vectors[len(train):]) if held else {}
    stats = {"teacher": teacher_version, "texts": len(train), "held_out_texts": len(held), "loss": config.loss,
             "steps": state.step, "resumed_from_step": state.resumed_from, "init": init_stats,
             "agreement_before": before, "agreement_after": after,
             "wall_s": round(time.perf_counter() - started, 1)}
    manifest = _write_manifest(config, manifest_parent, data_hash, stats, state)
    for leftover in (work / "checkpoint.pt", init_dir):  # only needed to resume; ~100 MB each
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    log.info("distill_done", out=str(config.output_dir), version=manifest.version, **before, **{
        f"after_{k}": v for k, v in after.items()})
    return DistillResult(manifest, stats)


def _train_and_save(config: DistillConfig, init_dir: Path, train: list[str], targets: np.ndarray, work: Path, *,
                    show: bool) -> tuple[_State, ModelManifest]:
    from transformers import AutoTokenizer

    from trainer.finetune import _write_sentence_transformers_config

    parent = resolve_manifest(init_dir, str(init_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(init_dir))
    tokenized = tokenizer(train, truncation=True, max_length=config.max_len)["input_ids"]
    torch.manual_seed(config.seed)
    student = _Student(init_dir, parent.pooling, targets.shape[1])
    state = train_student(config, student, tokenized, np.ascontiguousarray(targets, dtype=np.float32), work,
                          pad_id=int(tokenizer.pad_token_id or 0), show=show)
    out = config.output_dir
    student.body.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _write_sentence_transformers_config(out, parent.pooling, True, served_max_tokens(config, parent))
    return state, parent


def served_max_tokens(config: DistillConfig, parent: ModelManifest) -> int:
    """The student learnt texts of at most `max_len` tokens, so that is what it is told to chunk to:
    on CMRC2018 passages a student distilled at 64 tokens scored MRR@10 0.80 on 64-token chunks and
    0.63 on its parent's 256 (trainer/RESULTS.md)."""
    return min(parent.max_tokens, config.max_len)


def _write_manifest(config: DistillConfig, parent: ModelManifest, data_hash: str, stats: dict[str, Any],
                    state: _State) -> ModelManifest:
    out = config.output_dir
    name = config.name or f"{parent.name.removesuffix('-vocab')}-distilled"
    hidden = int(json.loads((out / "config.json").read_text(encoding="utf-8"))["hidden_size"])
    losses = state.losses or []
    manifest = ModelManifest(
        name=name,
        version=f"{name}-{data_hash[:8]}-{weights_hash(out)}",
        pooling=parent.pooling,
        normalize=True,
        query_instruction="",  # the student learnt texts as the teacher encodes documents: no instruction
        dimension=hidden,
        max_tokens=served_max_tokens(config, parent),
        parent_model=parent.version,
        data_hash=data_hash,
        metrics={"distill": stats, "train": {"steps": state.step, "losses": losses,
                                             "first_loss": losses[0][1] if losses else None,
                                             "last_loss": losses[-1][1] if losses else None,
                                             "resumed_from_step": state.resumed_from}},
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    manifest.save(out)
    return manifest
