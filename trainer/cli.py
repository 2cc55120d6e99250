"""`semsearch train ...`: prepare, extend-vocab, mine, score, finetune, evaluate.

Every step reads and writes FlagEmbedding's JSONL rows, so steps can be rerun, skipped or replaced
by another tool. Bad rows stop a step with `file:line: reason`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from semsearch.cli import (
    EXIT_REFUSED,
    CollectionOption,
    ConfigOption,
    DeviceOption,
    EncoderBackendOption,
    EncoderUrlOption,
    MilvusUriOption,
    ModelOption,
    fail,
    settings_from_cli,
)
from semsearch.config import Settings
from semsearch.errors import SemsearchError

if TYPE_CHECKING:
    from semsearch.fusion import Fusion

train_app = typer.Typer(
    name="train",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Fine-tune an embedding model on your own data: "
    "prepare -> extend-vocab -> mine -> score -> finetune -> evaluate, or all of it: `run RECIPE.yaml`.",
)

DataOption = Annotated[Path, typer.Option("--data", help="Input rows (FlagEmbedding JSONL)")]
OutOption = Annotated[Path, typer.Option("--out", help="Output file")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed")]


@contextmanager
def _cli_errors() -> Iterator[None]:
    """Known failures as one readable message and a non-zero exit, never a traceback."""
    try:
        yield
    except SemsearchError as exc:
        raise fail(str(exc), code=2) from exc
    except RuntimeError as exc:
        raise fail(str(exc)) from exc


def _echo_json(data: dict[str, Any]) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))


@train_app.command("prepare")
def prepare_cmd(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Writes train.jsonl, test.jsonl, prepare_stats.json")],
    pairs: Annotated[
        list[Path] | None, typer.Option("--pairs", help="query/answer pairs: TSV or JSONL {query, answer}")
    ] = None,
    labelled: Annotated[
        list[Path] | None, typer.Option("--labelled", help="labelled question pairs: TSV q1, q2, 0/1")
    ] = None,
    triplets: Annotated[list[Path] | None, typer.Option("--triplets", help="JSONL {query, title, neg_title}")] = None,
    squad: Annotated[
        list[Path] | None, typer.Option("--squad", help="SQuAD JSON (CMRC2018): question -> passage, train only")
    ] = None,
    extra_triplets: Annotated[
        list[Path] | None, typer.Option("--extra-triplets", help="Triplets that only train (never held out)")
    ] = None,
    test_ratio: Annotated[float, typer.Option("--test-ratio", help="Share of intent groups held out")] = 0.1,
    seed: SeedOption = 42,
    config: ConfigOption = None,
) -> None:
    """Build training rows and split train/test by intent group (no group on both sides)."""
    from trainer.prepare import Source, prepare
    from trainer.rows import write_rows

    settings_from_cli(config)
    with _cli_errors():
        extra = [Source("triplets", p, holdout=False) for p in extra_triplets or []]
        extra += [Source("squad", p, holdout=False) for p in squad or []]
        result = prepare(pairs=pairs, labelled=labelled, triplets=triplets, sources=extra,
                         test_ratio=test_ratio, seed=seed)
        write_rows(out_dir / "train.jsonl", result.train)
        write_rows(out_dir / "test.jsonl", result.test)
        (out_dir / "prepare_stats.json").write_text(json.dumps(result.stats, ensure_ascii=False, indent=2), "utf-8")
    _echo_json(result.stats)


@train_app.command("extend-vocab")
def extend_vocab_cmd(
    data: Annotated[list[Path], typer.Option("--data", help="Training rows whose characters to add")],
    out: Annotated[Path, typer.Option("--out", help="Output model directory")],
    model: ModelOption = None,
    min_count: Annotated[int, typer.Option("--min-count", help="Add characters seen at least this often")] = 1,
    max_new: Annotated[
        int | None, typer.Option("--max-new", help="At most this many characters (most frequent)")
    ] = None,
    query_instruction: Annotated[
        str | None,
        typer.Option(
            "--query-instruction",
            help="Manifest query instruction (default: the parent's); its characters are always added",
        ),
    ] = None,
    include_instruction: Annotated[
        str | None,
        typer.Option(
            "--include-chars-of",
            help="Also add the characters of this text (e.g. the instruction you will train with)",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Manifest name")] = None,
    seed: SeedOption = 0,
    config: ConfigOption = None,
) -> None:
    """Add the corpus's unknown characters to a WordPiece model (new embedding rows, saved tokenizer)."""
    from trainer.rows import read_rows
    from trainer.vocab import extend_vocabulary

    settings = settings_from_cli(config, model=model)
    with _cli_errors():
        texts = [t for path in data for row in read_rows(path) for t in (row.query, *row.pos, *row.neg)]
        always = (query_instruction or "") + (include_instruction or "")
        result = extend_vocabulary(
            settings.model,
            texts,
            out,
            min_count=min_count,
            max_new=max_new,
            always=always,
            seed=seed,
            name=name,
            query_instruction=query_instruction,
        )
    _echo_json(result.stats | {"out": str(result.out_dir)})


@train_app.command("distill")
def distill_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output model directory (the student)")],
    data: Annotated[
        list[Path] | None, typer.Option("--data", help="Training rows (JSONL): every text is distilled on")
    ] = None,
    corpus: Annotated[
        list[Path] | None, typer.Option("--corpus", help="Unlabelled text: JSONL {text} or one text a line")
    ] = None,
    student: Annotated[str, typer.Option("--student", help="WordPiece model (directory or hub id)")] = (
        "sentence-transformers/all-MiniLM-L6-v2"),
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="Teacher model [default: use-multilingual-v3]")
    ] = None,
    teacher_url: Annotated[
        str | None, typer.Option("--teacher-url", help="Teacher on an embedding server (as --encoder-url)")
    ] = None,
    settings_file: Annotated[
        Path | None, typer.Option("--settings", help="YAML of distill settings (trainer/distill.py DistillConfig)")
    ] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="mse, cosine, simmatrix, mse+simmatrix, "
                                             "cosine+simmatrix")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="> 0 overrides --epochs")] = None,
    max_texts: Annotated[int | None, typer.Option("--max-texts", help="Distil on at most this many texts")] = None,
    max_len: Annotated[int | None, typer.Option("--max-len", help="Student tokens per text")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    extend_vocab: Annotated[
        bool | None, typer.Option("--extend-vocab/--no-extend-vocab", help="Add the corpus' unknown characters")
    ] = None,
    init_from_teacher: Annotated[
        bool | None, typer.Option("--init-from-teacher/--random-init", help="New rows from the teacher's embeddings")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Teacher vectors cache [default: ~/.cache/semsearch/distill]")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (torch and the teacher)")] = None,
    config: ConfigOption = None,
) -> None:
    """Distil a teacher encoder into a transformers student on unlabelled text (resumable)."""
    from trainer.distill import DistillConfig, default_cache_dir, run_distill, texts_of_corpus, texts_of_rows
    from trainer.encoding import open_encoder

    if not data and not corpus:
        raise fail("give --data (training rows) and/or --corpus (unlabelled text)", code=2)
    flags = {"student": student, "teacher": teacher, "loss": loss, "epochs": epochs, "max_steps": max_steps,
             "max_texts": max_texts, "max_len": max_len, "batch_size": batch_size, "extend_vocab": extend_vocab,
             "init_from_teacher": init_from_teacher}
    with _cli_errors():
        distill_config = DistillConfig.load(settings_file, output_dir=out, **flags)
        settings = settings_from_cli(config, encoder_url=teacher_url, torch_threads=threads)
        if threads:
            import torch

            torch.set_num_threads(threads)
        texts = texts_of_rows(data or []) + texts_of_corpus(corpus or [])
        sources = ", ".join(str(p) for p in [*(data or []), *(corpus or [])])
        result = run_distill(distill_config, texts, lambda: open_encoder(settings, distill_config.teacher),
                             sources=sources, cache_dir=cache_dir or default_cache_dir())
    _echo_json({"out": str(out), "version": result.manifest.version, **result.stats})


@train_app.command("mine")
def mine_cmd(
    data: DataOption,
    out: OutOption,
    model: ModelOption = None,
    encoder_url: EncoderUrlOption = None,
    device: DeviceOption = None,
    encoder_backend: EncoderBackendOption = None,
    corpus: Annotated[
        Path | None,
        typer.Option("--corpus", help="Candidate pool: JSONL {id, text} or text lines; default all pos/neg texts"),
    ] = None,
    rank_range: Annotated[
        str, typer.Option("--range", help="Sample from these ranks (0-based, hi exclusive)")
    ] = "10-210",
    negative_number: Annotated[int, typer.Option("--negative-number", help="Negatives per row")] = 15,
    fn_margin: Annotated[
        float,
        typer.Option(
            "--fn-margin",
            help="Drop candidates above the best positive score minus this (likely false negatives), <0 off",
        ),
    ] = 0.05,
    keep_negs: Annotated[
        bool, typer.Option("--keep-negs/--replace-negs", help="Keep the rows' own negatives too")
    ] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Encoder batch size")] = None,
    seed: SeedOption = 42,
    config: ConfigOption = None,
) -> None:
    """Hard negatives from the current model's ranking of the candidate pool."""
    from trainer.encoding import open_encoder
    from trainer.mine import MineConfig, mine_hard_negatives, parse_range, read_corpus
    from trainer.rows import read_rows, write_rows

    settings = settings_from_cli(
        config, model=model, encoder_url=encoder_url, device=device, encode_batch_size=batch_size,
        encoder_backend=encoder_backend,
    )
    with _cli_errors():
        lo, hi = parse_range(rank_range)
        rows = read_rows(data)
        candidates = read_corpus(corpus) if corpus else None
        mine_config = MineConfig(
            range_lo=lo,
            range_hi=hi,
            negative_number=negative_number,
            fn_margin=None if fn_margin < 0 else fn_margin,
            seed=seed,
            keep_existing=keep_negs,
        )
        encoder = open_encoder(settings)
        try:
            mined, stats = mine_hard_negatives(rows, encoder, mine_config, corpus=candidates)
        finally:
            encoder.close()
        write_rows(out, mined)
    _echo_json(stats | {"model_version": encoder.manifest.version, "out": str(out)})


@train_app.command("score")
def score_cmd(
    data: DataOption,
    out: OutOption,
    reranker: Annotated[
        str, typer.Option("--reranker", help="Cross-encoder: local directory or hub id (bge-reranker-v2-m3)")
    ],
    device: DeviceOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per forward pass")] = 64,
    chunk_rows: Annotated[int, typer.Option("--chunk-rows", help="Rows written (and resumable) per chunk")] = 64,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per query+passage pair")] = 512,
    normalize: Annotated[bool, typer.Option("--sigmoid/--raw", help="Sigmoid scores instead of raw logits")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Ignore an existing output instead of resuming")] = False,
    config: ConfigOption = None,
) -> None:
    """Teacher scores (pos_scores, neg_scores) from a cross-encoder; resumes an interrupted run."""
    from trainer.score import ScoreConfig, flag_reranker_scorer, score_file

    settings = settings_from_cli(config, device=device)
    score_config = ScoreConfig(batch_size=batch_size, chunk_rows=chunk_rows, max_length=max_length, normalize=normalize)
    with _cli_errors():
        stats = score_file(
            data,
            out,
            lambda: flag_reranker_scorer(reranker, device=settings.device, config=score_config),
            chunk_rows=chunk_rows,
            restart=restart,
        )
    _echo_json(stats | {"out": str(out)})


@train_app.command("finetune")
def finetune_cmd(
    train_config: Annotated[
        Path | None, typer.Option("--train-config", help="YAML of finetune settings (FinetuneConfig)")
    ] = None,
    model: ModelOption = None,
    data: Annotated[list[Path] | None, typer.Option("--data", help="Training rows (with neg)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output model directory")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Manifest name")] = None,
    instruction: Annotated[
        str | None, typer.Option("--query-instruction", help="Query instruction ('' for none)")
    ] = None,
    pooling: Annotated[str | None, typer.Option("--pooling", help="cls or mean (default: the base model's)")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size", help="train_group_size: 1 pos + n-1 negs")] = None,
    query_max_len: Annotated[int | None, typer.Option("--query-max-len")] = None,
    passage_max_len: Annotated[int | None, typer.Option("--passage-max-len")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr")] = None,
    embedding_lr: Annotated[
        float | None, typer.Option("--embedding-lr", help="LR of the input embeddings (new rows); default --lr")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Queries per device per step")] = None,
    kd: Annotated[bool | None, typer.Option("--kd/--no-kd", help="Knowledge distillation from pos/neg scores")] = None,
    nproc: Annotated[int | None, typer.Option("--nproc", help="GPUs: > 1 runs torchrun")] = None,
    launcher: Annotated[str | None, typer.Option("--launcher", help="auto, python or torchrun")] = None,
    device: DeviceOption = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (OMP_NUM_THREADS)")] = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Test rows: evaluate after training, into the manifest")
    ] = None,
    eval_pool: Annotated[list[Path] | None, typer.Option("--eval-pool", help="More rows for the global pool")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory")] = False,
    config: ConfigOption = None,
) -> None:
    """Fine-tune with FlagEmbedding (encoder_only.base) and write the model with its manifest."""
    from trainer.finetune import run_finetune

    settings = settings_from_cli(config, model=model, device=device)
    flags = {"model": model or (None if train_config else settings.model), "train_data": data, "output_dir": out,
             "name": name, "query_instruction": instruction, "pooling": pooling, "temperature": temperature,
             "train_group_size": group_size, "query_max_len": query_max_len, "passage_max_len": passage_max_len,
             "epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate,
             "embedding_learning_rate": embedding_lr, "batch_size": batch_size, "knowledge_distillation": kd,
             "nproc_per_node": nproc, "launcher": launcher, "device": device, "seed": seed, "torch_threads": threads}
    with _cli_errors():
        ft_config = _finetune_config(train_config, flags)
        manifest = run_finetune(ft_config, overwrite=overwrite)
        if eval_data is not None:
            _evaluate_finetuned(ft_config.output_dir, settings, eval_data, eval_pool)
    _echo_json(
        {
            "out": str(ft_config.output_dir),
            "version": manifest.version,
            "train": manifest.metrics.get("train"),
        }
    )


def _finetune_config(train_config: Path | None, flags: dict[str, Any]) -> Any:
    """The YAML settings with the flags given on top; an invalid combination is a usage error (exit 2)."""
    from trainer.finetune import FinetuneConfig

    try:
        return FinetuneConfig.load(train_config, **flags)
    except ValueError as exc:
        raise fail(f"finetune config: {exc}", code=2) from exc


def _evaluate_finetuned(model_dir: Path, settings: Settings, eval_data: Path, eval_pool: list[Path] | None) -> None:
    """Evaluate the new model locally (never through an encoder server) and record it in its manifest."""
    from trainer.evaluate import evaluate_models, record_metrics
    from trainer.rows import read_rows

    report, _ = evaluate_models(
        read_rows(eval_data),
        [("finetuned", str(model_dir))],
        settings.model_copy(update={"encoder_url": None}),
        pool_rows=[r for p in eval_pool or [] for r in read_rows(p)],
    )
    record_metrics(model_dir, report["models"][0])


# `train evaluate`'s longer options, named here so that its signature reads one option a line.
EvalPassagesOption = Annotated[
    list[Path] | None,
    typer.Option("--passages", help="SQuAD-format JSON (CMRC2018), repeatable: question -> passage retrieval, "
                 "passages chunked and ranked through Milvus like the service"),
]
EvalMaxQuestionsOption = Annotated[
    int | None, typer.Option("--max-questions", help="--passages: a seeded sample of N questions (all passages)")
]
EvalChunkTokensOption = Annotated[
    int | None, typer.Option("--chunk-tokens", min=16, help="--passages: chunk to N tokens instead of each "
                             "model's max_tokens (to measure chunk sizes; the model still sees whole chunks)")
]
EvalFusionOption = Annotated[
    str | None, typer.Option("--fusion", help="Hybrid fusion: rrf, weighted, minmax or dbsf "
                             "[default: the `fusion` setting]")
]
EvalLexicalWeightOption = Annotated[
    float | None, typer.Option("--lexical-weight", help="Weighted fusion: lexical weight")
]
EvalFusionsOption = Annotated[
    str, typer.Option("--fusions", help="More hybrids from the same searches (and the best one chosen), "
                      "e.g. rrf:20,rrf:10:0.2:0.8,weighted:0.3:0.7,minmax:0.2:0.8,dbsf:0.2:0.8; "
                      "grid = every fusion tuning measures"),
]
EvalModelsOption = Annotated[
    list[str] | None,
    typer.Option("--model", help="LABEL=REF or REF, repeatable: models side by side [default: SEMSEARCH_MODEL]"),
]
EvalPoolOption = Annotated[
    list[Path] | None, typer.Option("--pool", help="More rows whose candidates join the global pool")
]
EvalCorpusOption = Annotated[
    Path | None,
    typer.Option("--corpus", help="More candidates for the global pool (JSONL {text} or lines)"),
]
EvalRetrievalOption = Annotated[
    str,
    typer.Option("--retrieval", help="Comma-separated modes: dense, lexical, hybrid (not dense alone: "
                 "ranked through Milvus Lite like the service)"),
]
EvalRerankOption = Annotated[
    str | None,
    typer.Option("--rerank", help="Cross-encoder (directory or hub id): also rerank each model's dense top N"),
]
EvalMissesOption = Annotated[
    bool,
    typer.Option("--misses", help="Also write misses-N.jsonl: each test query whose global-pool top 1 is "
                 "not a labelled positive, with that top 1 and the first positive in its top 10 (a label audit)"),
]


@train_app.command("evaluate")
def evaluate_cmd(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Writes report.json, report.md, scores.png")],
    data: Annotated[Path | None, typer.Option("--data", help="Test rows (held-out intents)")] = None,
    passages: EvalPassagesOption = None,
    max_questions: EvalMaxQuestionsOption = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --max-questions sample")] = 42,
    chunk_tokens: EvalChunkTokensOption = None,
    fusion: EvalFusionOption = None,
    rrf_k: Annotated[int | None, typer.Option("--rrf-k", help="RRF constant [default: the `rrf_k` setting]")] = None,
    dense_weight: Annotated[float | None, typer.Option("--dense-weight", help="Weighted fusion: dense weight")] = None,
    lexical_weight: EvalLexicalWeightOption = None,
    fusions: EvalFusionsOption = "",
    models: EvalModelsOption = None,
    pool: EvalPoolOption = None,
    corpus: EvalCorpusOption = None,
    encoder_url: EncoderUrlOption = None,
    device: DeviceOption = None,
    encoder_backend: EncoderBackendOption = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Encoder batch size")] = None,
    record: Annotated[bool, typer.Option("--record", help="Store the metrics in each local model's manifest")] = False,
    retrieval: EvalRetrievalOption = "dense",
    rerank: EvalRerankOption = None,
    rerank_top: Annotated[int, typer.Option("--rerank-top", help="Candidates the reranker reorders")] = 50,
    rerank_max_length: Annotated[int, typer.Option("--rerank-max-length", help="Tokens per pair")] = 256,
    misses: EvalMissesOption = False,
    config: ConfigOption = None,
) -> None:
    """recall@1/5/10, MRR@10, nDCG@10 on the test and global pools (--data) and question -> passage retrieval
    (--passages), models side by side; JSON, Markdown, PNG."""
    from trainer.evaluate import write_report
    from trainer.passages import evaluate_passages, load_passages

    if data is None and not passages:
        raise fail("give --data (test rows) or --passages (SQuAD JSON), or both", code=2)
    settings = settings_from_cli(config, encoder_url=encoder_url, device=device, encode_batch_size=batch_size,
                                 encoder_backend=encoder_backend, fusion=fusion, rrf_k=rrf_k,
                                 dense_weight=dense_weight, lexical_weight=lexical_weight)
    specs = _evaluated_models(models, settings)
    modes, more_fusions = _retrieval_choice(retrieval, fusions)
    with _cli_errors():
        started = time.perf_counter()
        # Passage files are read (and refused) before any model is loaded.
        passage_set = load_passages(passages, max_questions=max_questions, seed=seed) if passages else None
        report: dict[str, Any] = {"models": []}
        distributions: list[Any] = []
        if data is not None:
            report, distributions = _evaluate_rows(
                data, specs, settings, pool=pool, corpus=corpus, modes=modes, more_fusions=more_fusions,
                rerank=rerank, rerank_top=rerank_top, rerank_max_length=rerank_max_length, misses=misses,
            )
        if passage_set is not None:
            report["passages"] = evaluate_passages(passage_set, specs, settings, retrieval=modes,
                                                   more_fusions=more_fusions, chunk_tokens=chunk_tokens)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        paths = write_report(report, distributions, out_dir)
        if record:
            _record_local_models(report)
    typer.echo((out_dir / "report.md").read_text(encoding="utf-8"))
    typer.echo(" ".join(f"{kind}={path}" for kind, path in paths.items()))


def _evaluated_models(models: list[str] | None, settings: Settings) -> list[tuple[str, str]]:
    """(label, ref) of each --model, or of the configured model; an encoder server serves only one."""
    from trainer.evaluate import parse_model_spec

    specs = [parse_model_spec(m) for m in models] if models else [parse_model_spec(settings.model)]
    if settings.encoder_url and len(specs) > 1:
        raise fail("--encoder-url evaluates the one served model: give at most one --model", code=2)
    return specs


def _retrieval_choice(retrieval: str, fusions: str) -> tuple[tuple[str, ...], dict[str, Fusion]]:
    """--retrieval's modes and --fusions' extra hybrids; a malformed one is a usage error (exit 2)."""
    from trainer.evaluate import parse_fusions, parse_retrieval

    try:
        return parse_retrieval(retrieval), parse_fusions(fusions)
    except ValueError as exc:
        raise fail(str(exc), code=2) from exc


def _evaluate_rows(
    data: Path,
    specs: list[tuple[str, str]],
    settings: Settings,
    *,
    pool: list[Path] | None,
    corpus: Path | None,
    modes: tuple[str, ...],
    more_fusions: dict[str, Fusion],
    rerank: str | None,
    rerank_top: int,
    rerank_max_length: int,
    misses: bool,
) -> tuple[dict[str, Any], list[Any]]:
    """The report and score distributions of the test rows (--data) in the test and global pools."""
    from trainer.evaluate import evaluate_models, parse_model_spec
    from trainer.mine import read_corpus
    from trainer.rows import read_rows
    from trainer.score import ScoreConfig, flag_reranker_scorer

    # Arguments in this order: input files are read (and refused) before the reranker is loaded.
    return evaluate_models(
        read_rows(data),
        specs,
        settings,
        pool_rows=[r for p in pool or [] for r in read_rows(p)],
        corpus=[c.text for c in read_corpus(corpus)] if corpus else (),
        retrieval=modes,
        rerank=flag_reranker_scorer(rerank, device=settings.device,
                                    config=ScoreConfig(max_length=rerank_max_length)) if rerank else None,
        rerank_label=parse_model_spec(rerank)[0] if rerank else "rerank",
        rerank_top=rerank_top,
        misses=misses,
        more_fusions=more_fusions,
    )


def _record_local_models(report: dict[str, Any]) -> None:
    """--record: the metrics go into the manifest of each evaluated model that is a local directory."""
    from trainer.evaluate import record_metrics

    for entry in report["models"]:
        if Path(entry["model"]).is_dir():
            record_metrics(Path(entry["model"]), entry)


@train_app.command("tune-fusion")
def tune_fusion_cmd(
    pairs: Annotated[Path | None, typer.Option("--pairs", help="Labelled queries: JSONL {query, ids} (or "
                                               "{query, id}), or SQuAD JSON whose paragraphs were indexed under "
                                               "their id")] = None,
    keep: Annotated[bool, typer.Option(
        "--keep-previous", help="After a promotion: keep the tuning of the pair it replaced (no measuring)",
    )] = False,
    collection: CollectionOption = None,
    milvus_uri: MilvusUriOption = None,
    model: ModelOption = None,
    encoder_url: EncoderUrlOption = None,
    device: DeviceOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Measure and report; record nothing")] = False,
    config: ConfigOption = None,
) -> None:
    """Choose the collection's default retrieval (mode, fusion) on your labelled queries, searched in the live
    collection like the service searches; recorded on the collection and with its registry pair."""
    from semsearch.store import MilvusStore
    from trainer.tune import TuningRefusedError, keep_previous, tune

    if (pairs is None) == keep:
        raise fail("give --pairs (labelled queries to tune on) or --keep-previous, one of the two", code=2)
    settings = settings_from_cli(config, collection=collection, milvus_uri=milvus_uri, model=model,
                                 encoder_url=encoder_url, device=device)
    try:
        with _cli_errors():
            store = MilvusStore.from_settings(settings, min_timeout_s=60.0)
            try:
                if pairs is None:
                    report = keep_previous(store, settings.collection)
                else:
                    report = tune(settings, store, settings.collection, pairs, model=model, dry_run=dry_run)
            finally:
                store.close()
    except TuningRefusedError as exc:  # a refusal: nothing written (exit 3)
        raise fail(str(exc), code=EXIT_REFUSED) from exc
    _echo_json(report)


@train_app.command("run")
def run_cmd(
    recipe_file: Annotated[Path, typer.Argument(help="Recipe YAML: data, base model, steps (README.md, Fine-tuning)")],
    check: Annotated[bool, typer.Option("--check", help="Only validate the recipe, run nothing")] = False,
    until: Annotated[
        str | None, typer.Option("--until", help="Stop after this step (extend-vocab, finetune-r1, ...)")
    ] = None,
) -> None:
    """Run a whole training recipe; a re-run skips finished steps and resumes an interrupted one."""
    from trainer.recipe import load_recipe, run_recipe

    with _cli_errors():
        recipe = load_recipe(recipe_file)
        if check:
            typer.echo(f"{recipe_file}: ok ({recipe.rounds} round(s), work directory {recipe.work_dir})")
            return
        report = run_recipe(recipe, echo=lambda line: typer.echo(line, err=True), until=until)
    typer.echo(json.dumps({"report": report["report"],
                           "steps": [(s["step"], s["status"], s["wall_s"]) for s in report["steps"]]},
                          ensure_ascii=False))


@train_app.command("reranker")
def reranker_cmd(
    data: Annotated[list[Path], typer.Option("--data", help="Training rows with neg (mined or labelled)")],
    out: Annotated[Path, typer.Option("--out", help="Output model directory")],
    model: ModelOption = None,
    group_size: Annotated[int, typer.Option("--group-size", help="1 positive + n-1 negatives, one softmax")] = 8,
    max_len: Annotated[int, typer.Option("--max-len", help="Tokens of query + passage")] = 128,
    epochs: Annotated[float, typer.Option("--epochs")] = 1.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="> 0 overrides epochs")] = -1,
    learning_rate: Annotated[float, typer.Option("--lr")] = 6e-5,
    embedding_lr: Annotated[
        float | None, typer.Option("--embedding-lr", help="LR of the input embeddings (new rows); default --lr")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Queries per device per step")] = 16,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Checkpoint every N steps (resumable)")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out")] = False,
    device: DeviceOption = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (OMP_NUM_THREADS)")] = None,
    seed: SeedOption = 42,
    config: ConfigOption = None,
) -> None:
    """Fine-tune a cross-encoder reranker (FlagEmbedding, group-wise softmax) on the same rows."""
    from trainer.reranker import RerankerConfig, run_reranker_finetune

    settings = settings_from_cli(config, model=model, device=device)
    with _cli_errors():
        try:
            rr_config = RerankerConfig(
                model=settings.model, train_data=data, output_dir=out, train_group_size=group_size, max_len=max_len,
                epochs=epochs, max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
                embedding_learning_rate=embedding_lr, save_steps=save_steps, device=settings.device,
                torch_threads=threads, seed=seed,
            )
        except ValueError as exc:
            raise fail(f"reranker config: {exc}", code=2) from exc
        info = run_reranker_finetune(rr_config, resume=resume)
    _echo_json({"out": str(out), "train": {k: v for k, v in info["train"].items() if k != "losses"}})


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
