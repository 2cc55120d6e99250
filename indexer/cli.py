"""`semsearch index INPUT...` (the batch indexer) and `semsearch index verify`.

`index` is a group whose default action is indexing: any first argument other than `verify` is
an input, so `semsearch index docs.jsonl` and `semsearch index verify` both read naturally
(a file literally named `verify` is `./verify`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from semsearch.cli import (
    CollectionOption,
    ConfigOption,
    DeviceOption,
    EncoderBackendOption,
    EncoderUrlOption,
    LogLevelOption,
    MilvusUriOption,
    ModelOption,
    fail,
    settings_from_cli,
)
from semsearch.config import Settings

DEFAULT_ACTION = "run"
ACTIONS = ("verify",)

EXIT_USAGE = 2
EXIT_STRICT = 3
EXIT_INTERRUPTED = 130


class IndexGroup(TyperGroup):
    """Routes `semsearch index ARGS` to the hidden default command unless ARGS starts with an action."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or args[0] not in ACTIONS:
            args = [DEFAULT_ACTION, *args]
        return super().parse_args(ctx, args)


class DefaultCommand(TyperCommand):
    """The default command documents itself as `semsearch index [OPTIONS] [INPUT]...`."""

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        path = ctx.parent.command_path if ctx.parent is not None else ctx.command_path
        formatter.write_usage(path, " ".join(self.collect_usage_pieces(ctx)))


# ---------------------------------------------------------------------------------------- options
InputsArg = Annotated[list[str] | None, typer.Argument(
    metavar="INPUT", show_default=False,
    help="JSONL (.jsonl/.ndjson), CSV, TSV or Parquet files (.gz for JSONL/CSV), document files (.md, .txt, "
         ".html, .pdf, .docx: one document each, id = path below the folder given), folders of them (recursive), "
         "or - for JSONL on stdin")]
FormatOption = Annotated[str, typer.Option(
    "--format", help="auto (by extension), jsonl, csv, tsv, parquet, markdown, text, html, pdf or docx")]
IncludeOption = Annotated[list[str] | None, typer.Option(
    "--include", help="Only files of folders matching this .gitignore-style pattern, e.g. '*.md' or 'docs/**' "
                      "(repeatable)")]
ExcludeOption = Annotated[list[str] | None, typer.Option(
    "--exclude", help="Leave out files of folders matching this .gitignore-style pattern, e.g. 'drafts/' "
                      "(repeatable)")]
IdFieldOption = Annotated[str, typer.Option(
    "--id-field", help="Field with the document id; rows without one get an id derived from their text")]
TextFieldOption = Annotated[str, typer.Option("--text-field", help="Field with the document text")]
TitleFieldOption = Annotated[str, typer.Option(
    "--title-field", help="Field with a title, prepended to the text and kept in metadata ('' for none)")]
MetadataFieldOption = Annotated[list[str] | None, typer.Option(
    "--metadata-field", help="Column copied into metadata under its name (repeat, or comma-separated)")]
MetadataObjectOption = Annotated[str, typer.Option(
    "--metadata-object-field", help="Field holding a JSON object merged into metadata ('' for none)")]
StateDirOption = Annotated[Path | None, typer.Option(
    "--state-dir", help="Where job checkpoints live [default: $XDG_DATA_HOME/semsearch/index-jobs]")]
MaxDocCharsOption = Annotated[int, typer.Option("--max-doc-chars", help="Reject documents longer than this")]
MaxMetadataOption = Annotated[int | None, typer.Option(
    "--max-metadata-bytes", help="Reject rows whose metadata JSON is larger [default: settings max_metadata_bytes]")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object")]

# `index` (run) only
OverlapOption = Annotated[int, typer.Option(
    "--overlap", help="Tokens of the previous chunk repeated at the start of the next")]
MaxTokensOption = Annotated[int | None, typer.Option(
    "--max-tokens", help="Chunk size in tokens (at most the model's limit) [default: the model's limit]",
)]
ShardOption = Annotated[str | None, typer.Option(
    "--shard", help="i/N: index only the documents whose id hashes to shard i of N (N workers in parallel)",
)]
ResumeOption = Annotated[bool, typer.Option(
    "--resume", help="Continue this job from its checkpoint (without INPUT: the interrupted job); "
                     "starts it if there is none")]
RestartOption = Annotated[bool, typer.Option("--restart", help="Discard an interrupted job's checkpoint")]
PruneOption = Annotated[bool, typer.Option(
    "--prune", help="After indexing, delete stored documents that are no longer in the source")]
PruneMaxRejectOption = Annotated[float, typer.Option(
    "--prune-max-reject-ratio", help="Skip --prune when more rows than this were rejected")]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="Re-encode and rewrite unchanged documents too (e.g. after changing chunking)")]
StrictOption = Annotated[bool, typer.Option("--strict", help="Stop at the first bad row (exit 3)")]
RejectFileOption = Annotated[Path | None, typer.Option(
    "--reject-file", help="JSONL of rejected rows [default: beside the checkpoint]")]
JobIdOption = Annotated[str | None, typer.Option(
    "--job-id", help="Name of the job's checkpoint [default: derived from collection, inputs and options]",
)]
NoAliasOption = Annotated[bool, typer.Option(
    "--no-alias", help="Build the versioned collection but leave the --collection alias alone")]
MoveAliasOption = Annotated[bool, typer.Option(
    "--move-alias", help="Move the alias to the new collection even if it points at another model's")]
BatchChunksOption = Annotated[int, typer.Option(
    "--batch-chunks", help="Chunks per encode batch (length-sorted inside)")]
CheckpointIntervalOption = Annotated[float, typer.Option(
    "--checkpoint-interval", help="Seconds between flush+checkpoint")]
MaxRateOption = Annotated[float, typer.Option(
    "--max-rate", help="Throttle to this many documents/s (0: no limit), to spare a shared Milvus")]
RetryTimeoutOption = Annotated[float, typer.Option(
    "--retry-timeout", help="Seconds to keep retrying while Milvus is unavailable")]
ProgressOption = Annotated[str, typer.Option(
    "--progress", help="auto (a bar on a terminal, log lines otherwise), bar, log or off")]
ProgressEveryOption = Annotated[float, typer.Option(
    "--progress-every", help="Seconds between progress log lines")]


def _fields(id_field: str, text_field: str, title_field: str, metadata_fields: list[str] | None,
            metadata_object: str) -> Any:
    from indexer.sources import FieldMap

    names = tuple(name.strip() for item in metadata_fields or [] for name in item.split(",") if name.strip())
    return FieldMap(id=id_field, text=text_field, title=title_field or None, metadata=names,
                    metadata_object=metadata_object or None)


def _parse_shard(spec: str | None) -> tuple[int, int]:
    if not spec:
        return (0, 1)
    try:
        index_text, count_text = spec.split("/", 1)
        index, count = int(index_text), int(count_text)
    except ValueError as exc:
        raise typer.BadParameter(f"--shard must look like i/N (e.g. 0/4), got {spec!r}") from exc
    if count < 1 or not 0 <= index < count:
        raise typer.BadParameter(f"--shard {spec}: need 0 <= i < N")
    return (index, count)


def _open(settings: Settings) -> tuple[Any, Any]:
    from semsearch.encoders import create_encoder
    from semsearch.store import MilvusStore

    encoder = create_encoder(settings)
    store = MilvusStore.from_settings(settings, min_timeout_s=60.0)
    return encoder, store


index_app = typer.Typer(
    cls=IndexGroup, add_completion=False, pretty_exceptions_enable=False,
    help="Batch-index JSONL/CSV/Parquet and folders of Markdown/HTML/PDF/Word files into a versioned Milvus "
         "collection; `index verify` checks it.",
)


@index_app.command(
    DEFAULT_ACTION, cls=DefaultCommand, hidden=True,
    epilog="Also: [bold]semsearch index verify[/bold] [INPUT]... checks count parity with the source and "
           "re-encodes a random sample (semsearch index verify --help). Details: indexer/README.md\n\n"
           "Examples:\n\n"
           "  semsearch index corpus/ --collection docs\n\n"
           "  semsearch index handbook/ --include '*.md' --include '*.pdf' --exclude 'drafts/' --prune\n\n"
           "  semsearch index faq.csv --text-field answer --title-field question --metadata-field category --prune"
           "\n\n"
           "  semsearch index --resume\n\n"
           "  semsearch index /data --shard $JOB_COMPLETION_INDEX/8 --resume --state-dir /state",
)
def run(
    ctx: typer.Context,
    inputs: InputsArg = None,
    config: ConfigOption = None, milvus_uri: MilvusUriOption = None, collection: CollectionOption = None,
    model: ModelOption = None, encoder_url: EncoderUrlOption = None, device: DeviceOption = None,
    log_level: LogLevelOption = None, encoder_backend: EncoderBackendOption = None,
    fmt: FormatOption = "auto", include: IncludeOption = None, exclude: ExcludeOption = None,
    id_field: IdFieldOption = "id", text_field: TextFieldOption = "text", title_field: TitleFieldOption = "title",
    metadata_field: MetadataFieldOption = None, metadata_object_field: MetadataObjectOption = "metadata",
    overlap: OverlapOption = 0, max_tokens: MaxTokensOption = None, shard: ShardOption = None,
    resume: ResumeOption = False, restart: RestartOption = False,
    prune: PruneOption = False, prune_max_reject_ratio: PruneMaxRejectOption = 0.05,
    force: ForceOption = False, strict: StrictOption = False, reject_file: RejectFileOption = None,
    state_dir: StateDirOption = None, job_id: JobIdOption = None,
    no_alias: NoAliasOption = False, move_alias: MoveAliasOption = False,
    batch_chunks: BatchChunksOption = 512, checkpoint_interval: CheckpointIntervalOption = 30.0,
    max_rate: MaxRateOption = 0.0, retry_timeout: RetryTimeoutOption = 600.0,
    max_doc_chars: MaxDocCharsOption = 1_000_000, max_metadata_bytes: MaxMetadataOption = None,
    progress: ProgressOption = "auto", progress_every: ProgressEveryOption = 10.0,
    as_json: JsonOption = False,
) -> None:
    """Index documents into the versioned collection behind --collection: chunked, encoded, exactly once.

    Re-running is a no-op for unchanged documents; changed ones are rewritten; bad rows go to a reject file (with file and line) and never stop the run unless --strict. Interrupted at any point, `semsearch index --resume` finishes the job.
    """  # noqa: E501
    from indexer.job import IndexOptions
    from indexer.pipeline import PipelineConfig
    from indexer.sources import Limits

    _refuse_contradictions(ctx, inputs, resume=resume, restart=restart, no_alias=no_alias, move_alias=move_alias)
    settings = settings_from_cli(config, milvus_uri=milvus_uri, collection=collection, model=model,
                                 encoder_url=encoder_url, device=device, log_level=log_level,
                                 encoder_backend=encoder_backend)
    shard_spec = _parse_shard(shard)
    options = IndexOptions(
        inputs=list(inputs or []), format=fmt, include=tuple(include or ()), exclude=tuple(exclude or ()),
        fields=_fields(id_field, text_field, title_field, metadata_field, metadata_object_field),
        limits=Limits(max_metadata_bytes=max_metadata_bytes or settings.max_metadata_bytes,
                      max_doc_chars=max_doc_chars),
        max_tokens=max_tokens, overlap_tokens=overlap, shard=shard_spec, resume=resume, restart=restart,
        prune=prune, prune_max_reject_ratio=prune_max_reject_ratio, reject_file=reject_file,
        job_id=job_id, alias_policy="none" if no_alias else "move" if move_alias else "auto",
        pipeline=PipelineConfig(
            shard=shard_spec, batch_chunks=batch_chunks, checkpoint_interval_s=checkpoint_interval,
            max_rate=max_rate, retry_timeout_s=retry_timeout, force=force, strict=strict,
        ),
        progress="off" if as_json and progress == "auto" else progress, progress_every_s=progress_every,
    )
    if state_dir is not None:
        options.state_dir = state_dir
    summary = _run_job(options, settings, collection_given=collection is not None)
    _report_summary(summary, as_json=as_json)


def _refuse_contradictions(ctx: typer.Context, inputs: list[str] | None, *, resume: bool, restart: bool,
                           no_alias: bool, move_alias: bool) -> None:
    """Nothing to index prints the help; flags that contradict each other are a usage error (exit 2)."""
    if not inputs and not resume:
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_USAGE)
    if no_alias and move_alias:
        raise fail("--no-alias and --move-alias contradict each other", EXIT_USAGE)
    if resume and restart:
        raise fail("--resume and --restart contradict each other", EXIT_USAGE)


def _report_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    """The job's summary as one JSON object or a table; a job that did not complete exits 1."""
    from indexer.progress import print_summary

    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False))
    else:
        print_summary(summary)
    if summary["status"] != "complete":
        raise typer.Exit(1)


def _run_job(options: Any, settings: Settings, *, collection_given: bool) -> dict[str, Any]:
    """Run the indexing job; each way it can stop becomes its exit code and a one-line message."""
    from indexer.job import JobError, run_index
    from indexer.pipeline import Interrupted, StrictModeError
    from semsearch.errors import SemsearchError

    try:
        encoder, store = _open(settings)
    except SemsearchError as exc:
        raise fail(str(exc)) from exc
    try:
        result = run_index(options, encoder=encoder, store=store, collection=settings.collection,
                           collection_given=collection_given, milvus_uri=settings.milvus_uri)
    except JobError as exc:
        raise fail(str(exc), exc.exit_code) from exc
    except StrictModeError as exc:
        raise fail(f"--strict: bad row at {exc}", EXIT_STRICT) from exc
    except Interrupted as exc:
        raise fail("interrupted; what was written is checkpointed: run the same command with --resume "
                   "(or `semsearch index --resume`) to finish", EXIT_INTERRUPTED) from exc
    except (SemsearchError, ValueError) as exc:
        raise fail(f"{exc} (resume with --resume once fixed)") from exc
    finally:
        store.close()
        encoder.close()
    summary: dict[str, Any] = result.to_json()
    return summary


@index_app.command("verify")
def verify(
    inputs: InputsArg = None,
    config: ConfigOption = None, milvus_uri: MilvusUriOption = None, collection: CollectionOption = None,
    model: ModelOption = None, encoder_url: EncoderUrlOption = None, device: DeviceOption = None,
    log_level: LogLevelOption = None, encoder_backend: EncoderBackendOption = None,
    fmt: FormatOption = "auto", include: IncludeOption = None, exclude: ExcludeOption = None,
    id_field: IdFieldOption = "id", text_field: TextFieldOption = "text", title_field: TitleFieldOption = "title",
    metadata_field: MetadataFieldOption = None, metadata_object_field: MetadataObjectOption = "metadata",
    max_doc_chars: MaxDocCharsOption = 1_000_000, max_metadata_bytes: MaxMetadataOption = None,
    state_dir: StateDirOption = None,
    sample: Annotated[int, typer.Option("--sample", help="Documents to re-encode and compare")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random sample")] = 0,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", help="Largest 1 - cosine(stored, re-encoded) accepted")] = 1e-3,
    as_json: JsonOption = False,
) -> None:
    """Check a collection against its source: exact document-id parity, and a random sample re-chunked and re-encoded with the current model must match what is stored (exit 1 when not).

    Without INPUT, the source (and field mapping) of the collection's latest indexing job is used.
    """  # noqa: E501
    from indexer.checkpoint import default_state_dir, list_jobs
    from indexer.job import options_from_config
    from indexer.sources import InputError, Limits, discover
    from indexer.verify import run_verify
    from semsearch.errors import SemsearchError

    settings = settings_from_cli(config, milvus_uri=milvus_uri, collection=collection, model=model,
                                 encoder_url=encoder_url, device=device, log_level=log_level,
                                 encoder_backend=encoder_backend)
    fields = _fields(id_field, text_field, title_field, metadata_field, metadata_object_field)
    limits = Limits(max_metadata_bytes=max_metadata_bytes or settings.max_metadata_bytes,
                    max_doc_chars=max_doc_chars)
    sources = list(inputs or [])
    patterns = (tuple(include or ()), tuple(exclude or ()))
    if not sources:
        jobs = [(mtime, cfg) for _, cfg, _, mtime in list_jobs(state_dir or default_state_dir())
                if cfg.get("collection") == settings.collection]
        if not jobs:
            raise fail(f"no INPUT given and no indexing job of collection {settings.collection!r} found "
                       "in the state directory", EXIT_USAGE)
        from indexer.job import IndexOptions

        stored = options_from_config(IndexOptions(), max(jobs, key=lambda item: item[0])[1])
        sources, fmt, fields, limits = stored.inputs, stored.format, stored.fields, stored.limits
        patterns = (stored.include, stored.exclude)
    try:
        files = discover(sources, fmt, *patterns)
    except InputError as exc:
        raise fail(str(exc), EXIT_USAGE) from exc
    try:
        encoder, store = _open(settings)
    except SemsearchError as exc:
        raise fail(str(exc)) from exc
    try:
        report = run_verify(files=files, fields=fields, limits=limits, encoder=encoder, store=store,
                            collection=settings.collection, sample=sample, seed=seed, tolerance=tolerance)
    except SemsearchError as exc:
        raise fail(str(exc)) from exc
    finally:
        store.close()
        encoder.close()
    if as_json:
        typer.echo(json.dumps(report.to_json(), ensure_ascii=False))
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")


def _print_report(report: Any) -> None:
    out = sys.stdout
    verdict = "OK" if report.ok else "FAILED"
    print(f"verify {report.collection}: {verdict}", file=out)
    print(f"  source documents   {report.source_documents:>12,}  (rejected rows {report.source_rejected:,}, "
          f"duplicate ids {report.source_duplicates:,})", file=out)
    print(f"  stored documents   {report.stored_documents:>12,}  ({report.stored_chunks:,} chunks)", file=out)
    print(f"  missing / extra    {report.missing:>12,} / {report.extra:,}", file=out)
    print(f"  sample             {report.sampled:>12,}  max 1-cosine {report.max_vector_deviation:.3g} "
          f"(model {report.current_model_version})", file=out)
    for problem in report.problems:
        print(f"  problem: {problem}", file=out)
