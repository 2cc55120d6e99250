"""`semsearch export` / `semsearch import`: move a collection between Milvus deployments without
re-encoding (Milvus Lite -> a server, or a backup restored into a new collection).

An export directory holds Parquet shards of every stored field (ids, tenant, chunk bookkeeping,
text, metadata, vectors; not the BM25 sparse field, which Milvus recomputes from the text) and,
written last, `export.json`: the model record, the lexical analyzer, the registry pair and a
SHA-256 and row count per shard. A directory without it, or whose shards do not match it, is an
export killed mid-way and is refused as a whole. Import creates the collection through MilvusStore
(same schema, model record and analyzer), skips rows already there (so a killed import resumes),
and verifies the row count and a sample of vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import structlog
import typer

from semsearch.cli import CollectionOption, ConfigOption, MilvusUriOption, fail, settings_from_cli
from semsearch.config import Settings
from semsearch.errors import InvalidInputError, ModelMismatchError, SemsearchError
from semsearch.filters import TENANT_FIELD, render_string_in
from semsearch.manifest import ModelManifest
from semsearch.registry import ModelRegistry
from semsearch.store import (
    LEXICAL_PROPERTY,
    RECORD_TAG,
    ChunkRow,
    MilvusStore,
    lexical_analyzer_params,
    versioned_name,
)

log = structlog.get_logger(__name__)

EXPORT_FORMAT = "semsearch-export/1"
MANIFEST_NAME = "export.json"  # written last: its presence marks a complete export
SHARD_ROWS = 10_000
WRITE_BATCH = 1_000
ID_LOOKUP_BATCH = 4_096  # primary keys per existence check (under Milvus' 16384 query window)
VERIFY_SAMPLE = 100
ANALYZER_NAMES = ("jieba", "jieba_exact", "standard")


class IncompleteExportError(InvalidInputError):
    """An export directory that is not a whole export (killed mid-way, edited, or not an export)."""


@dataclass
class ImportReport:
    collection: str
    rows: int
    written: int
    skipped: int
    seconds: float
    verified_vectors: int

    @property
    def rows_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _arrow_schema(dimension: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()), ("doc_id", pa.string()), (TENANT_FIELD, pa.string()), ("chunk_index", pa.int64()),
        ("text", pa.string()), ("metadata", pa.string()),  # JSON text: any shape round-trips
        ("content_hash", pa.string()), ("char_offset", pa.int64()), ("updated_at", pa.int64()),
        ("vector", pa.list_(pa.float32(), dimension)),
    ])


def _shard_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in rows:
        for name in schema.names:
            value = row.get(name, "" if name == TENANT_FIELD else None)
            if name == "metadata":
                value = json.dumps(value if value is not None else {}, ensure_ascii=False)
            elif name == "vector":
                value = np.asarray(value, dtype=np.float32)
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=schema)


# ------------------------------------------------------------------ export
def export_collection(store: MilvusStore, name: str, out: Path, *, shard_rows: int = SHARD_ROWS) -> dict[str, Any]:
    """Write every row of collection (or alias) `name` to `out` (an empty or new directory)."""
    if out.exists() and any(out.iterdir()):
        raise InvalidInputError(f"export directory {out} is not empty: choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    info = store.collection_info(name)
    properties = store.collection_properties(info.name)
    schema = _arrow_schema(info.dimension)
    fields = [f for f in schema.names if f != TENANT_FIELD or info.tenants]
    shards: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []

    def write_shard() -> None:
        path = out / f"rows-{len(shards):05d}.parquet"
        pq.write_table(_shard_table(batch, schema), path)
        shards.append({"file": path.name, "rows": len(batch), "sha256": _sha256(path)})
        batch.clear()

    for row in store.iter_rows(info.name, fields):
        batch.append(row)
        if len(batch) >= shard_rows:
            write_shard()
    if batch:
        write_shard()
    record = ModelRegistry(store).get(name)
    manifest = {
        "format": EXPORT_FORMAT, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"uri": store.uri, "name": name, "collection": info.name},
        "model_version": info.model_version, "dimension": info.dimension, "manifest": info.manifest,
        "text_rules": info.text_rules, "tenants": info.tenants,
        "lexical_analyzer": json.loads(properties[LEXICAL_PROPERTY]) if info.lexical else None,
        "properties": {k: v for k, v in properties.items() if k.startswith(f"{RECORD_TAG}.")},
        "registry_pair": record.current.model_dump(mode="json") if record and record.current else None,
        "rows": sum(s["rows"] for s in shards), "shards": shards,
    }
    partial = out / (MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(partial, out / MANIFEST_NAME)  # atomic: the export is whole from this moment on
    log.info("collection_exported", collection=info.name, rows=manifest["rows"], shards=len(shards), out=str(out))
    return manifest


# ------------------------------------------------------------------ import
def read_export(out: Path) -> dict[str, Any]:
    """The export's manifest, after checking every shard it lists is there, whole and unchanged."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise IncompleteExportError(
            f"{out} has no {MANIFEST_NAME}: not a complete export (was the export killed mid-way?); export again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise IncompleteExportError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != EXPORT_FORMAT:
        raise IncompleteExportError(f"{path}: format {manifest.get('format')!r}, expected {EXPORT_FORMAT!r}")
    for shard in manifest["shards"]:
        shard_path = out / shard["file"]
        if not shard_path.is_file():
            raise IncompleteExportError(f"{out}: shard {shard['file']} listed in {MANIFEST_NAME} is missing")
        if _sha256(shard_path) != shard["sha256"]:
            raise IncompleteExportError(f"{out}: shard {shard['file']} does not match its SHA-256 (truncated?)")
    if sum(s["rows"] for s in manifest["shards"]) != manifest["rows"]:
        raise IncompleteExportError(f"{path}: shard row counts do not add up to {manifest['rows']}")
    return manifest


def analyzer_setting(params: dict[str, Any] | None) -> tuple[str, list[str]]:
    """The `lexical_analyzer` setting (and user dictionary) that produces these analyzer params."""
    if params is None:
        return "none", []
    tokenizer = params.get("tokenizer")
    user_dict = list(tokenizer.get("dict", [])[1:]) if isinstance(tokenizer, dict) else []
    for name in ANALYZER_NAMES:
        if lexical_analyzer_params(name, user_dict) == params:
            return name, user_dict
    raise InvalidInputError(f"export's lexical analyzer {json.dumps(params, ensure_ascii=False)} matches no "
                            "lexical_analyzer setting of this semsearch version")


def target_store(settings: Settings, uri: str, export: dict[str, Any]) -> MilvusStore:
    """A store at `uri` that creates collections with the export's lexical analyzer."""
    analyzer, user_dict = analyzer_setting(export["lexical_analyzer"])
    update = {"milvus_uri": uri, "lexical_analyzer": analyzer, "lexical_user_dict": user_dict}
    return MilvusStore.from_settings(settings.model_copy(update=update), min_timeout_s=60.0)


def prepare_target(store: MilvusStore, name: str, export: dict[str, Any]) -> str:
    """The physical collection to fill: the existing one behind `name` if it holds the export's model
    (a resumed import), else a new one with the export's schema, record and text rules."""
    manifest = ModelManifest.model_validate(export["manifest"])
    if store.resolve(name):
        info = store.collection_info(name)
        if (info.model_version, info.dimension) != (export["model_version"], export["dimension"]):
            raise ModelMismatchError(
                f"cannot import into {name!r}: it holds vectors of model {info.model_version} (dim {info.dimension}); "
                f"the export holds model {export['model_version']} (dim {export['dimension']}). "
                "Import into another --collection.")
        return info.name
    physical = versioned_name(name, manifest.version)
    store.create_collection(physical, manifest)
    store.set_collection_properties(physical, {
        k: v for k, v in export["properties"].items() if k not in (LEXICAL_PROPERTY,)})
    if physical != name:
        store.point_alias(name, physical)
    return physical


def _chunk_rows(table: pa.Table) -> Iterator[tuple[int, ChunkRow]]:
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    columns = table.to_pydict()
    for i in range(table.num_rows):
        yield int(columns["updated_at"][i]), ChunkRow(
            doc_id=columns["doc_id"][i], chunk_index=int(columns["chunk_index"][i]), text=columns["text"][i],
            vector=vectors[i], metadata=json.loads(columns["metadata"][i]), content_hash=columns["content_hash"][i],
            char_offset=int(columns["char_offset"][i]), tenant=columns[TENANT_FIELD][i] or "")


def _present_ids(store: MilvusStore, collection: str, ids: list[str]) -> set[str]:
    present: set[str] = set()
    for lo in range(0, len(ids), ID_LOOKUP_BATCH):
        present |= {chunk.row_id for chunk in store.rows_by_id(collection, ids[lo:lo + ID_LOOKUP_BATCH])}
    return present


def _write_shard(store: MilvusStore, collection: str, table: pa.Table) -> tuple[int, int]:
    """Upsert the shard's rows not yet in `collection`, keeping each row's `updated_at`; (written, skipped)."""
    present = _present_ids(store, collection, table.column("id").to_pylist())
    missing = [(at, row) for (at, row), row_id in zip(_chunk_rows(table), table.column("id").to_pylist(), strict=True)
               if row_id not in present]
    for lo in range(0, len(missing), WRITE_BATCH):
        by_time: dict[int, list[ChunkRow]] = {}
        for written_at, row in missing[lo:lo + WRITE_BATCH]:
            by_time.setdefault(written_at, []).append(row)
        for written_at, rows in by_time.items():
            store.upsert(collection, rows, written_at=written_at)
    return len(missing), len(present)


def verify_import(store: MilvusStore, collection: str, out: Path, export: dict[str, Any], sample: int) -> int:
    """Row count equal to the export's, and a random sample of vectors equal (float32) to the exported ones."""
    store.flush(collection)
    count = store.count(collection)
    if count != export["rows"]:
        raise SemsearchError(f"import into {collection!r} holds {count} rows, the export {export['rows']}")
    if not export["shards"] or sample <= 0:
        return 0
    shard = random.Random(0).choice(export["shards"])
    table = pq.read_table(out / shard["file"], columns=["id", "vector"])
    picked = random.Random(1).sample(range(table.num_rows), min(sample, table.num_rows))
    wanted = {table.column("id")[i].as_py(): np.asarray(table.column("vector")[i].as_py(), np.float32) for i in picked}
    stored = {str(row["id"]): np.asarray(row["vector"], np.float32)
              for row in store.iter_rows(collection, ["id", "vector"], render_string_in("id", list(wanted)))}
    differing = [row_id for row_id, vector in wanted.items()
                 if row_id not in stored or not np.array_equal(stored[row_id], vector)]
    if differing:
        raise SemsearchError(
            f"import into {collection!r}: {len(differing)} sampled vectors differ, e.g. {differing[0]!r}")
    return len(wanted)


def import_collection(store: MilvusStore, out: Path, name: str | None = None, *,
                      sample: int = VERIFY_SAMPLE) -> ImportReport:
    """Fill collection `name` (default: the exported name) from export directory `out`; resumable."""
    export = read_export(out)  # all checks before anything is created
    name = name or export["source"]["name"]
    started = time.perf_counter()
    collection = prepare_target(store, name, export)
    written = skipped = 0
    for shard in export["shards"]:
        shard_written, shard_skipped = _write_shard(store, collection, pq.read_table(out / shard["file"]))
        written, skipped = written + shard_written, skipped + shard_skipped
        log.info("import_shard_done", shard=shard["file"], written=shard_written, skipped=shard_skipped)
    verified = verify_import(store, collection, out, export, sample)
    _record_pair(store, name, collection, export)
    return ImportReport(collection, export["rows"], written, skipped, time.perf_counter() - started, verified)


def _record_pair(store: MilvusStore, name: str, collection: str, export: dict[str, Any]) -> None:
    """Give `name` a registry record serving the imported pair, unless it already has one."""
    registry = ModelRegistry(store)
    if registry.get(name) is not None:
        return
    manifest = ModelManifest.model_validate(export["manifest"])
    source_pair = export.get("registry_pair") or {}
    record = registry.bootstrap(name, manifest, collection, source_pair.get("encoder_url"), persist=False)
    assert record.current is not None
    record.current.retrieval = source_pair.get("retrieval")  # same rows: the tuned fusion still applies
    record.current.metrics = source_pair.get("metrics") or {}
    registry.put(record)


# ------------------------------------------------------------------ CLI
def export_command(
    out: Annotated[Path, typer.Argument(help="New (or empty) directory for the export")],
    collection: CollectionOption = None, milvus_uri: MilvusUriOption = None, config: ConfigOption = None,
) -> None:
    """Write a collection's rows (vectors included), model record and serving pair to Parquet files."""
    settings = settings_from_cli(config, collection=collection, milvus_uri=milvus_uri)
    store = MilvusStore.from_settings(settings, min_timeout_s=60.0)
    try:
        manifest = export_collection(store, settings.collection, out)
    except SemsearchError as exc:
        raise fail(str(exc)) from exc
    finally:
        store.close()
    typer.echo(f"exported {manifest['rows']} rows of {manifest['source']['collection']} "
               f"(model {manifest['model_version']}) to {out}")


def import_command(
    out: Annotated[Path, typer.Argument(help="Directory written by `semsearch export`")],
    milvus_uri: MilvusUriOption = None, collection: Annotated[str | None, typer.Option(
        "--collection", help="Collection or alias to fill (default: the exported name)")] = None,
    config: ConfigOption = None,
) -> None:
    """Create the collection from an export (same schema and model) and fill it; re-run to resume."""
    settings = settings_from_cli(config, milvus_uri=milvus_uri)
    try:
        export = read_export(out)
        store = target_store(settings, settings.milvus_uri, export)
        try:
            report = import_collection(store, out, collection)
        finally:
            store.close()
    except SemsearchError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"imported {report.rows} rows into {report.collection}: {report.written} written, "
               f"{report.skipped} already there, {report.rows_per_s:.0f} rows/s; "
               f"{report.verified_vectors} sampled vectors verified")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("import")(import_command)
