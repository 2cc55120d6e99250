"""One indexing job: pick the collection, open or resume the checkpoint, run the pipeline, prune,
point the alias.

Collections are versioned: `--collection docs` with model version `bge-large-zh-v1.5-1a2b3c` writes
into `docs__bge_large_zh_v1_5_1a2b3c`, a collection that records the model manifest, and `docs` is
an alias readers (the service's --collection) follow. The first complete job creates the alias;
if it already points at a collection of another model the job refuses to start unless told
`--no-alias` (build the new collection, leave readers where they are: the promotion step swaps
later) or `--move-alias` (point readers at the new collection once this job completes). When the
model registry has a record for the name, the registry decides: the job writes into its current
pair when the model matches, builds beside it with --no-alias, and otherwise refuses (promotion,
not the indexer, swaps a registry-served name).
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from indexer.checkpoint import STATUS_RUNNING, JobState, Progress, default_state_dir, job_id_for, list_jobs
from indexer.pipeline import Pipeline, PipelineConfig, rejects_in, token_counter
from indexer.progress import ProgressReporter
from indexer.sources import (
    DOCUMENT_FORMATS,
    FieldMap,
    InputError,
    Limits,
    SourceFile,
    completed_bytes,
    find_inputs,
    shard_of,
)
from semsearch.encoders.base import Encoder
from semsearch.errors import SemsearchError
from semsearch.ingest import Planner, rules_of
from semsearch.manifest import ModelManifest
from semsearch.registry import REGISTRY_COLLECTION, ModelRegistry, RegistryRecord
from semsearch.store import MilvusStore, check_same_model, versioned_name

log = structlog.get_logger(__name__)

AliasPolicy = Literal["auto", "none", "move"]
CHUNKING_PROPERTY = "semsearch.chunking"
SHARD_PROPERTY_PREFIX = "semsearch.index."


class JobError(Exception):
    """The job cannot start or continue as asked; the message says what to do."""

    exit_code = 2


@dataclass
class IndexOptions:
    inputs: list[str] = field(default_factory=list)
    format: str = "auto"
    include: tuple[str, ...] = ()  # .gitignore-style patterns for the files of directories
    exclude: tuple[str, ...] = ()
    fields: FieldMap = field(default_factory=FieldMap)
    limits: Limits = field(default_factory=Limits)
    max_tokens: int | None = None  # default: the model's limit
    overlap_tokens: int = 0
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    restart: bool = False
    prune: bool = False
    prune_max_reject_ratio: float = 0.05
    reject_file: Path | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    job_id: str | None = None
    alias_policy: AliasPolicy = "auto"
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    progress: str = "auto"  # auto, bar, log, off
    progress_every_s: float = 10.0


@dataclass
class Target:
    physical: str
    alias: str | None  # the alias to point at `physical` once the job completes
    alias_state: str


def registry_record(store: MilvusStore, name: str) -> RegistryRecord | None:
    """The model registry's record of `name` (None without a registry or record); read-only."""
    registry = ModelRegistry(store)
    try:
        return registry.get(name)
    except SemsearchError:
        try:  # a registry reopened by a new Milvus Lite process is 'released'
            store.load(REGISTRY_COLLECTION)
            return registry.get(name)
        except SemsearchError as exc:
            raise JobError(f"cannot read the model registry ({exc}); is Milvus reachable?") from exc


def plan_target(store: MilvusStore, name: str, manifest: ModelManifest, policy: AliasPolicy) -> Target:
    versioned = versioned_name(name, manifest.version)
    record = registry_record(store, name)
    if record is not None and record.current is not None:
        # The registry owns what readers use: write into its current pair, or build beside it.
        serving = record.current
        if serving.model_version == manifest.version:
            return Target(serving.collection, None, "registry's current pair")
        if policy == "none":
            return Target(versioned, None, f"registry serves {serving.collection}; not moved")
        raise JobError(
            f"{name!r} is served by the model registry from {serving.collection!r} (model {serving.model_version}); "
            f"this job indexes model {manifest.version}. Pass --no-alias to build {versioned!r} without touching "
            f"readers, then `semsearch promote` to swap {name!r} to the new model."
        )
    current = store.resolve(name)
    if not current:
        return Target(versioned, None if policy == "none" else name, "new")
    if current == name:
        # A plain collection (made before versioning): write into it, as long as the model matches.
        check_same_model(store.collection_info(name), manifest)
        log.warning("collection_not_versioned", collection=name,
                    note="writing into a plain collection; no alias is created")
        return Target(name, None, "plain collection")
    if current == versioned:
        return Target(versioned, None if policy == "none" else name, "already points here")
    if policy == "none":
        return Target(versioned, None, f"left pointing at {current}")
    if policy == "move":
        return Target(versioned, name, f"moves from {current} when the job completes")
    other = store.collection_info(current).model_version
    raise JobError(
        f"alias {name!r} points at {current!r} (model {other}); this job indexes model {manifest.version} into "
        f"{versioned!r}. Pass --no-alias to build {versioned!r} without moving readers (promote it later), "
        f"or --move-alias to point {name!r} at it once this job completes."
    )


def chunking_record(max_tokens: int, overlap: int) -> dict[str, int]:
    return {"max_tokens": max_tokens, "overlap_tokens": overlap}


def check_chunking(store: MilvusStore, physical: str, manifest: ModelManifest, wanted: dict[str, int],
                   force: bool) -> None:
    """Unchanged documents are recognised by content hash, which does not see chunking options: a
    collection records its chunking, and a job with other options must rewrite everything (--force)."""
    properties = store.collection_properties(physical)
    recorded_json = properties.get(CHUNKING_PROPERTY)
    if recorded_json:
        recorded = json.loads(recorded_json)
    elif store.count(physical) == 0:
        recorded = wanted
    else:  # written by the service: its chunker uses the model limit and no overlap
        recorded = chunking_record(manifest.max_tokens, 0)
    if recorded != wanted and not force:
        raise JobError(
            f"collection {physical!r} was chunked with {recorded}; this job asks for {wanted}. "
            "Unchanged documents would keep their old chunks: pass --force to rewrite every document."
        )
    if recorded_json is None or recorded != wanted:
        store.set_collection_properties(physical, {CHUNKING_PROPERTY: json.dumps(wanted, sort_keys=True)})


def find_unfinished(state_dir: Path, collection: str | None, shard: tuple[int, int] | None) -> str:
    candidates = [
        (job_id, config) for job_id, config, status, _ in list_jobs(state_dir)
        if status == STATUS_RUNNING and (collection is None or config.get("collection") == collection)
        and (shard is None or tuple(config.get("shard", (0, 1))) == shard)
    ]
    if not candidates:
        raise JobError(f"no interrupted job to resume in {state_dir}: give the INPUT files to start one")
    if len(candidates) > 1:
        listing = ", ".join(job_id for job_id, _ in candidates)
        raise JobError(f"several interrupted jobs in {state_dir} ({listing}): choose one with --job-id")
    return candidates[0][0]


@dataclass
class IndexResult:
    job_id: str
    status: str  # complete, interrupted, failed
    collection: str
    alias: str | None
    alias_state: str
    model_version: str
    totals: dict[str, int]
    reasons: dict[str, int]
    reject_file: str
    state_file: str
    elapsed_s: float
    docs_per_s: float
    chunks_per_s: float
    busy_s: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def stop_on_signals(pipeline: Pipeline) -> Iterator[None]:
    """SIGINT/SIGTERM stop the job cleanly (checkpointing what is durable); a second one kills it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()
        log.warning("index_stopping", signal=signal.Signals(signum).name,
                    note="finishing the write in flight and checkpointing; press Ctrl-C again to abort")
        pipeline.stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def job_identity(target: Target, files: Sequence[SourceFile], options: IndexOptions,
                 chunking: dict[str, int], manifest: ModelManifest) -> dict[str, Any]:
    identity = {
        "collection": target.physical, "model_version": manifest.version,
        "files": [[f.path, f.format] for f in files], "fields": asdict(options.fields),
        "limits": asdict(options.limits), "chunking": chunking, "shard": list(options.shard),
    }
    if options.include or options.exclude:  # only then: earlier jobs keep their ids
        identity["filters"] = {"include": list(options.include), "exclude": list(options.exclude)}
    return identity


def prune_scope(files: Sequence[SourceFile]) -> set[str] | None:
    """The roots whose documents --prune may delete when every input is a document file (a folder
    indexed into a collection shared with other folders leaves theirs alone); None: all documents."""
    if any(f.format not in DOCUMENT_FORMATS for f in files):
        return None
    return {f.root for f in files}


def _interrupted_job(options: IndexOptions, state_dir: Path, collection: str | None) -> tuple[IndexOptions, str]:
    """`--resume` without inputs: the options and collection of the interrupted job to finish."""
    job_id = options.job_id or find_unfinished(state_dir, collection,
                                                options.shard if options.shard != (0, 1) else None)
    stored = JobState(state_dir, job_id)
    try:
        if not stored.exists:
            raise JobError(f"no job {job_id!r} in {state_dir}")
        return options_from_config(options, stored.get("config")), stored.get("config")["collection"]
    finally:
        stored.close()


def _run_pipeline(pipeline: Pipeline, files: Sequence[SourceFile], options: IndexOptions) -> Any:
    """Run the index phase with its progress display and signal handling; the progress it reached."""
    reporter = ProgressReporter(options.progress, sum(f.size for f in files) or None,
                                log_every_s=options.progress_every_s)
    try:
        with stop_on_signals(pipeline):
            pipeline.run(tick=lambda: reporter.update(pipeline.live, completed_bytes(files, pipeline.live_position)))
    except InputError as exc:  # e.g. a CSV file without the text column
        raise JobError(f"{exc} (then resume with --resume)") from exc
    finally:
        reporter.update(pipeline.live, completed_bytes(files, pipeline.live_position))
        reporter.close()
    return pipeline.progress


def run_index(options: IndexOptions, *, encoder: Encoder, store: MilvusStore, collection: str,
              collection_given: bool = True, milvus_uri: str = "") -> IndexResult:
    started = time.monotonic()
    manifest = encoder.manifest
    state_dir = options.state_dir = options.state_dir.expanduser().resolve()

    if options.resume and not options.inputs:
        options, collection = _interrupted_job(options, state_dir, collection if collection_given else None)

    max_tokens = min(options.max_tokens or manifest.max_tokens, manifest.max_tokens)
    chunking = chunking_record(max_tokens, options.overlap_tokens)
    target = plan_target(store, collection, manifest, options.alias_policy)
    try:
        found = find_inputs(options.inputs, options.format, options.include, options.exclude)
    except InputError as exc:
        raise JobError(str(exc)) from exc
    files = found.files
    if (unsupported := found.unsupported_note()) is not None:
        log.warning("index_files_skipped", note=unsupported)
    identity = job_identity(target, files, options, chunking, manifest)
    job_id = options.job_id or job_id_for(collection, options.shard, identity)
    config = {
        **identity, "job_id": job_id, "alias": collection, "inputs": list(options.inputs),
        "format": options.format, "fingerprints": [f.fingerprint() for f in files],
        "include": list(options.include), "exclude": list(options.exclude),
        "prune": options.prune, "alias_policy": options.alias_policy, "force": options.pipeline.force,
        "milvus_uri": milvus_uri, "overlap_tokens": options.overlap_tokens, "max_tokens": options.max_tokens,
        "manifest": manifest.model_dump(mode="json", exclude={"metrics"}),
    }
    config["collection"] = collection

    info = store.ensure_collection(target.physical, manifest)
    store.load(target.physical)
    # The collection's text rules: a collection made before they were recorded keeps the legacy ones.
    planner = Planner(rules_of(info), token_counter(encoder), max_tokens, options.overlap_tokens)
    check_chunking(store, target.physical, manifest, chunking, options.pipeline.force)
    state = JobState(state_dir, job_id)
    try:
        resumed = _open_job(state, options, config, files)
        progress = state.progress()
        reject_path = (options.reject_file or state.reject_path_default).expanduser().resolve()
        _trim_rejects(reject_path, progress.reject_bytes)
        log.info("index_job_started", job_id=job_id, resumed=resumed, collection=target.physical,
                 alias=collection, alias_state=target.alias_state, files=len(files),
                 shard=f"{options.shard[0]}/{options.shard[1]}", position=progress.position.to_json())

        notes: list[str] = [unsupported] if unsupported else []
        status = "complete"
        busy: dict[str, float] = defaultdict(float)
        if progress.phase == "index":
            pipeline = Pipeline(
                files=files, fields=options.fields, limits=options.limits, planner=planner, encoder=encoder,
                store=store, collection=target.physical, state=state, progress=progress,
                reject_path=reject_path, config=options.pipeline,
            )
            progress, busy = _run_pipeline(pipeline, files, options), pipeline.busy_s
            state.set_phase(progress, "prune" if options.prune else "alias")
        notes += rejected_file_notes(reject_path, files)
        if progress.phase == "prune":
            note = _prune(store, target.physical, state, progress, options, prune_scope(files))
            if note:
                notes.append(note)
                status = "complete, prune skipped"
            state.set_phase(progress, "alias")
        if progress.phase == "alias":
            notes += _point_alias(store, target, options, identity, collection)
            state.finish(progress)
        elapsed = time.monotonic() - started
        totals = progress.totals
        return IndexResult(
            job_id=job_id, status=status, collection=target.physical, alias=target.alias or None,
            alias_state=target.alias_state, model_version=manifest.version, totals=totals,
            reasons=progress.reasons, reject_file=str(reject_path), state_file=str(state.path),
            elapsed_s=round(elapsed, 3),
            docs_per_s=round(totals.get("documents", 0) / elapsed, 2) if elapsed else 0.0,
            chunks_per_s=round(totals.get("chunks_written", 0) / elapsed, 2) if elapsed else 0.0,
            busy_s={k: round(v, 3) for k, v in busy.items()}, notes=notes,
        )
    finally:
        state.close()


def rejected_file_notes(reject_path: Path, files: Sequence[SourceFile], limit: int = 20) -> list[str]:
    """One line per document file that was not indexed (path and reason), the first `limit` of them."""
    document_files = {f.display for f in files if f.format in DOCUMENT_FORMATS}
    if not document_files:
        return []
    rejected = [r for r in rejects_in(reject_path) if r.get("file") in document_files]
    notes = [f"not indexed: {r['file']}: {r['reason']}" for r in rejected[:limit]]
    if len(rejected) > limit:
        notes.append(f"... and {len(rejected) - limit} more files not indexed (all in {reject_path})")
    return notes


def _open_job(state: JobState, options: IndexOptions, config: dict[str, Any], files: Sequence[SourceFile]) -> bool:
    """Continue the job's checkpoint (True) or start it afresh (False)."""
    if state.exists and state.status == STATUS_RUNNING and state.progress().totals:
        previous = state.get("config")
        if options.restart:
            log.warning("index_job_restarted", job_id=state.job_id)
        elif not options.resume:
            where = state.progress().position
            raise JobError(
                f"job {state.job_id} was interrupted (file {where.file_index + 1}/{len(files)}, "
                f"record {where.ordinal}); pass --resume to continue it or --restart to start over"
            )
        elif previous.get("fingerprints") != config["fingerprints"]:
            raise JobError(f"the input changed since job {state.job_id} started; pass --restart to start over")
        elif previous.get("milvus_uri") and config["milvus_uri"] and previous["milvus_uri"] != config["milvus_uri"]:
            raise JobError(f"job {state.job_id} writes to {previous['milvus_uri']}, not {config['milvus_uri']}")
        else:
            return True
    state.reset(config)
    return False


def options_from_config(options: IndexOptions, config: dict[str, Any]) -> IndexOptions:
    """The options a stored job was started with (for `--resume` without INPUT)."""
    fields = config["fields"]
    return IndexOptions(
        inputs=list(config["inputs"]), format=config["format"],
        include=tuple(config.get("include", ())), exclude=tuple(config.get("exclude", ())),
        fields=FieldMap(id=fields["id"], text=fields["text"], title=fields["title"],
                        metadata=tuple(fields["metadata"]), metadata_object=fields["metadata_object"]),
        limits=Limits(**config["limits"]), max_tokens=config.get("max_tokens"),
        overlap_tokens=int(config.get("overlap_tokens", 0)), shard=(int(config["shard"][0]), int(config["shard"][1])),
        resume=True, restart=False, prune=bool(config["prune"]), prune_max_reject_ratio=options.prune_max_reject_ratio,
        reject_file=options.reject_file, state_dir=options.state_dir, job_id=config["job_id"],
        alias_policy=config["alias_policy"],
        pipeline=PipelineConfig(**{**asdict(options.pipeline), "force": bool(config["force"]),
                                   "shard": (int(config["shard"][0]), int(config["shard"][1]))}),
        progress=options.progress, progress_every_s=options.progress_every_s,
    )


def _trim_rejects(path: Path, committed_bytes: int) -> None:
    """Rejects written by a crashed attempt after its last checkpoint are written again: drop them."""
    if path.exists() and path.stat().st_size > committed_bytes:
        with path.open("r+b") as handle:
            handle.truncate(committed_bytes)
    elif not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)


def _prune(store: MilvusStore, physical: str, state: JobState, progress: Progress,
           options: IndexOptions, roots: set[str] | None = None) -> str | None:
    """Delete this shard's documents that are no longer in the source (only those of `roots`, when
    given: metadata.root); a note when refused."""
    totals = progress.totals
    in_shard = totals.get("read", 0) - totals.get("other_shards", 0)
    if totals.get("documents", 0) == 0:
        return "prune skipped: the source produced no documents (check --text-field and the input)"
    ratio = totals.get("rejected", 0) / max(in_shard, 1)
    # A rejected document file (unreadable, no text) has its id, its path, so --prune keeps its stored
    # version: rejects cannot make prune delete what is still there, and need no ratio guard.
    if roots is None and ratio > options.prune_max_reject_ratio:
        return (f"prune skipped: {ratio:.1%} of rows were rejected (limit {options.prune_max_reject_ratio:.0%}, "
                "--prune-max-reject-ratio); fix the input first")
    shard, shards = options.shard
    pruned = 0
    pending: set[str] = set()

    def flush_pending() -> None:
        nonlocal pruned
        if not pending:
            return
        gone = sorted(pending - state.known(pending))
        pending.clear()
        for start in range(0, len(gone), 256):
            pruned += store.delete_documents(physical, gone[start : start + 256])

    for row in store.iter_rows(physical, ["doc_id", "metadata"] if roots is not None else ["doc_id"]):
        doc_id = str(row["doc_id"])
        if roots is not None and (row.get("metadata") or {}).get("root") not in roots:
            continue  # another folder's document, or one not from a file
        if shard_of(doc_id, shards) == shard:
            pending.add(doc_id)
        if len(pending) >= 1000:
            flush_pending()
    flush_pending()
    progress.totals["pruned"] = progress.totals.get("pruned", 0) + pruned
    log.info("index_pruned", collection=physical, documents=pruned)
    return None


def _point_alias(store: MilvusStore, target: Target, options: IndexOptions, identity: dict[str, Any],
                 name: str) -> list[str]:
    if target.alias is None:
        if target.alias_state not in ("plain collection", "registry's current pair"):
            return [f"alias {name!r} not moved ({target.alias_state}); readers still use it as before"]
        return []
    shard, shards = options.shard
    if shards > 1:
        # Only the last shard to finish points the alias: each records itself done, then looks.
        run = {k: v for k, v in identity.items() if k != "shard"}
        tag = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:12]
        store.set_collection_properties(target.physical, {f"{SHARD_PROPERTY_PREFIX}{tag}.{shard}": f"done/{shards}"})
        properties = store.collection_properties(target.physical)
        missing = [i for i in range(shards) if f"{SHARD_PROPERTY_PREFIX}{tag}.{i}" not in properties]
        if missing:
            return [f"alias {name!r} waits for shards {missing} to finish"]
    store.point_alias(target.alias, target.physical)
    log.info("alias_pointed", alias=target.alias, collection=target.physical)
    return []
