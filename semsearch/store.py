"""The Milvus store: one schema, model version recorded on every collection, typed filters only.

Rows are chunks of documents. A document of one chunk has one row; the row id is
`{doc_id}#{chunk_index}` so re-writing a document replaces its rows instead of adding new ones.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from pymilvus import DataType, MilvusClient, MilvusException

from semsearch.errors import BackendUnavailableError, InvalidInputError, ModelMismatchError, NotFoundError
from semsearch.filters import MetadataFilter, render_filters, render_string_in
from semsearch.lite import LiteEndpoint, is_local_uri
from semsearch.manifest import ModelManifest
from semsearch.metrics import STORE_LATENCY
from semsearch.text import LEGACY_TEXT_RULES, TEXT_RULES

log = structlog.get_logger(__name__)

# Milvus' VARCHAR max_length counts UTF-8 bytes: "中" * 171 is 171 characters but 513 bytes.
MAX_ID_BYTES = 512
# Bookkeeping reads (counts, chunk lists, hashes) must see every acknowledged write: Strong.
# Searches read this client's own writes (Session) and otherwise never wait on the server.
BOOKKEEPING_CONSISTENCY = "Strong"
SEARCH_CONSISTENCY = "Session"
# Creating and loading a collection may take far longer than a request's timeout.
ADMIN_TIMEOUT_S = 120.0
LITE_FLUSH_ROWS = 4096
MAX_TEXT_CHARS = 65535 // 4  # VARCHAR max_length counts bytes: 4 per character at worst
RECORD_TAG = "semsearch"
TEXT_RULES_PROPERTY = f"{RECORD_TAG}.text_rules"
OUTPUT_FIELDS = ["doc_id", "chunk_index", "char_offset", "text", "metadata", "content_hash"]


def versioned_name(name: str, model_version: str) -> str:
    """`{name}__{model version}`: the physical collection of one model's vectors, behind alias `name`."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", model_version).strip("_") or "model"
    full = f"{name}__{slug}"
    if len(full) > 255:  # Milvus' limit on collection names
        full = f"{full[:230]}_{hashlib.sha256(model_version.encode()).hexdigest()[:16]}"
    return full


def check_doc_id(doc_id: str, where: str = "document id") -> str:
    """An id the schema holds (1-512 UTF-8 bytes), valid Unicode, without control characters or
    surrounding space (ids end up inside filter literals)."""
    if not doc_id:
        raise InvalidInputError(f"{where} is empty")
    try:
        size = len(doc_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"{where} contains invalid Unicode (lone surrogates)") from None
    if size > MAX_ID_BYTES:
        raise InvalidInputError(f"{where} is longer than {MAX_ID_BYTES} bytes as UTF-8 ({size} bytes)")
    if doc_id != doc_id.strip() or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in doc_id):
        raise InvalidInputError(f"{where} has control characters or surrounding whitespace")
    return doc_id


def chunk_row_id(doc_id: str, chunk_index: int) -> str:
    return f"{doc_id}#{chunk_index}"


@dataclass
class ChunkRow:
    doc_id: str
    chunk_index: int
    text: str
    vector: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    char_offset: int = 0

    def to_entity(self) -> dict[str, Any]:
        return {
            "id": chunk_row_id(self.doc_id, self.chunk_index),
            "doc_id": self.doc_id,
            "chunk_index": self.chunk_index,
            "text": self.text,
            "metadata": self.metadata,
            "content_hash": self.content_hash,
            "char_offset": self.char_offset,
            # When the row was written: promotion replays rows written during a re-embed.
            "updated_at": int(time.time() * 1000),
            "vector": self.vector.astype(np.float32).tolist(),
        }


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_index: int
    score: float
    text: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class CollectionInfo:
    name: str  # the physical collection, aliases resolved
    model_version: str
    dimension: int
    manifest: dict[str, Any]
    text_rules: str = LEGACY_TEXT_RULES.version  # semsearch/text.py; collections made before it: legacy


class MilvusStore:
    """A thin, typed layer over pymilvus' MilvusClient for local (Milvus Lite) and server URIs."""

    def __init__(self, uri: str, *, token: str | None = None, timeout_s: float = 10.0,
                 hnsw_m: int = 16, hnsw_ef_construction: int = 200, search_ef: int = 128) -> None:
        self.uri = uri
        self.timeout_s = timeout_s
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self.search_ef = search_ef
        self._lite: LiteEndpoint | None = None
        if is_local_uri(uri):
            # One process owns a Milvus Lite directory; others reach it over loopback.
            self._lite = LiteEndpoint.attach(uri)
            connect_uri = self._lite.url
        else:
            connect_uri = uri
        self.is_lite = self._lite is not None
        try:
            self.client = MilvusClient(uri=connect_uri, token=token or "", timeout=timeout_s)
        except MilvusException as exc:
            raise BackendUnavailableError(f"cannot connect to Milvus at {uri}: {exc.message}") from exc
        # Milvus Lite's engine is single-writer per collection: serialize our own writes.
        self._write_lock = threading.Lock()
        self._unflushed: dict[str, int] = {}

    # ------------------------------------------------------------------ collections
    def resolve(self, name: str) -> str:
        """The physical collection behind a name that may be an alias ('' when neither exists)."""
        if not self._call(self.client.has_collection, collection_name=name):
            return ""
        return str(self._call(self.client.describe_collection, collection_name=name)["collection_name"])

    def has_collection(self, name: str) -> bool:
        return bool(self._call(self.client.has_collection, collection_name=name))

    def collection_info(self, name: str) -> CollectionInfo:
        physical = self.resolve(name)
        if not physical:
            raise NotFoundError(f"collection {name!r} does not exist")
        description = self._call(self.client.describe_collection, collection_name=physical)
        record = read_model_record(description)
        if record is None:
            raise ModelMismatchError(f"collection {physical!r} was not created by semsearch (no model record)")
        return CollectionInfo(
            name=physical, model_version=record["model_version"], dimension=int(record["dimension"]),
            manifest=record.get("manifest", {}), text_rules=record["text_rules"],
        )

    def ensure_collection(self, name: str, manifest: ModelManifest, *, create: bool = True) -> CollectionInfo:
        """Open `name` for `manifest`'s model, creating it if allowed; refuse a model mismatch."""
        if self.resolve(name):
            info = self.collection_info(name)
            check_same_model(info, manifest)
            return info
        if not create:
            raise NotFoundError(f"collection {name!r} does not exist")
        self.create_collection(name, manifest)
        return self.collection_info(name)

    def create_collection(self, name: str, manifest: ModelManifest) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES + 16)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("text", DataType.VARCHAR, max_length=65535)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("char_offset", DataType.INT64)
        schema.add_field("updated_at", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=manifest.dimension)
        index_params = MilvusClient.prepare_index_params()
        index_params.add_index(
            field_name="vector", index_type="HNSW", metric_type="COSINE",
            params={"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction},
        )
        self._call(
            self.client.create_collection, collection_name=name, schema=schema, index_params=index_params,
            description=f"{RECORD_TAG} model {manifest.version}", properties=model_record(manifest),
            # Session: a client reads its own writes; others see them within the bounded staleness.
            consistency_level="Session", timeout=ADMIN_TIMEOUT_S,
        )
        self._call(self.client.load_collection, collection_name=name, timeout=ADMIN_TIMEOUT_S)
        log.info("collection_created", collection=name, model_version=manifest.version)

    def drop_collection(self, name: str) -> None:
        self._call(self.client.drop_collection, collection_name=name)

    def count(self, name: str) -> int:
        rows = self._query(collection_name=name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    # ------------------------------------------------------------------ writes
    def upsert(self, name: str, rows: Sequence[ChunkRow]) -> int:
        if not rows:
            return 0
        entities = [row.to_entity() for row in rows]
        with self._write_lock:
            result = self._call(self.client.upsert, collection_name=name, data=entities)
        if self.is_lite:
            self._flush_lite_when_due(name, len(entities))
        return int(result.get("upsert_count", len(entities)))

    def _flush_lite_when_due(self, name: str, written: int) -> None:
        # Milvus Lite indexes only flushed segments and converts unflushed rows one by one on every
        # search (bench/STORE_NOTES.md): flush every few thousand rows instead of at 128 MiB.
        pending = self._unflushed.get(name, 0) + written
        if pending >= LITE_FLUSH_ROWS:
            self.flush(name)
            pending = 0
        self._unflushed[name] = pending

    def write_documents(self, name: str, rows: Sequence[ChunkRow]) -> int:
        """Upsert whole documents (all of each one's chunks), then drop chunks past their new end.

        New rows land before stale ones go, so a document is never absent mid-write.
        """
        for row in rows:  # all checks before any write: a rejected call changes nothing
            check_doc_id(row.doc_id)
        written = self.upsert(name, rows)
        chunk_count: dict[str, int] = {}
        for row in rows:
            chunk_count[row.doc_id] = max(chunk_count.get(row.doc_id, 0), row.chunk_index + 1)
        stale = [
            row_id for row_id, doc_id, index in self.chunk_ids(name, list(chunk_count))
            if index >= chunk_count[doc_id]
        ]
        self.delete_rows(name, stale)
        return written

    def delete_documents(self, name: str, doc_ids: Sequence[str]) -> int:
        """Delete every chunk of these documents; returns how many documents existed."""
        existing = self.chunk_ids(name, doc_ids)
        if not existing:
            return 0
        self.delete_rows(name, [row_id for row_id, _, _ in existing])
        return len({doc_id for _, doc_id, _ in existing})

    def flush(self, name: str) -> None:
        with self._write_lock:
            self._call(self.client.flush, collection_name=name)

    # ------------------------------------------------------------------ reads
    def chunk_ids(self, name: str, doc_ids: Sequence[str]) -> list[tuple[str, str, int]]:
        """(row id, doc id, chunk index) of every stored chunk of these documents."""
        if not doc_ids:
            return []
        rows = self._query(
            collection_name=name, filter=render_string_in("doc_id", list(doc_ids)),
            output_fields=["id", "doc_id", "chunk_index"],
        )
        return [(str(row["id"]), str(row["doc_id"]), int(row["chunk_index"])) for row in rows]

    def get_document_chunks(self, name: str, doc_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            collection_name=name, filter=render_string_in("doc_id", [doc_id]),
            output_fields=OUTPUT_FIELDS,
        )
        return sorted(rows, key=lambda row: int(row["chunk_index"]))

    def content_hashes(self, name: str, doc_ids: Sequence[str]) -> dict[str, str]:
        """doc_id -> content hash stored with its first chunk, for documents present."""
        if not doc_ids:
            return {}
        rows = self._query(
            collection_name=name,
            filter=render_string_in("doc_id", list(doc_ids)) + " and chunk_index == 0",
            output_fields=["doc_id", "content_hash"],
        )
        return {str(row["doc_id"]): str(row["content_hash"]) for row in rows}

    def iter_rows(self, name: str, output_fields: Sequence[str], batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        iterator = self.client.query_iterator(
            collection_name=name, batch_size=batch_size, filter="", output_fields=list(output_fields),
            consistency_level=BOOKKEEPING_CONSISTENCY,
        )
        try:
            while batch := iterator.next():
                yield from batch
        finally:
            iterator.close()

    def search(
        self, name: str, vectors: np.ndarray, *, top_k: int, filters: Sequence[MetadataFilter] = (),
        output_fields: Iterable[str] = ("doc_id", "chunk_index", "text", "metadata"),
        timeout_s: float | None = None,
    ) -> list[list[Hit]]:
        fields = list(dict.fromkeys(["doc_id", "chunk_index", *output_fields]))
        results = self._call(
            self.client.search, collection_name=name, data=vectors.astype(np.float32).tolist(),
            limit=top_k, filter=render_filters(filters), output_fields=fields, anns_field="vector",
            search_params={"metric_type": "COSINE", "params": {"ef": max(self.search_ef, top_k)}},
            timeout=self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s),
            consistency_level=SEARCH_CONSISTENCY,
        )
        return [
            [
                Hit(
                    doc_id=str(hit["entity"]["doc_id"]), chunk_index=int(hit["entity"]["chunk_index"]),
                    score=float(hit["distance"]), text=str(hit["entity"].get("text", "")),
                    metadata=dict(hit["entity"].get("metadata") or {}),
                )
                for hit in per_query
            ]
            for per_query in results
        ]

    # ------------------------------------------------------------------ aliases
    def point_alias(self, alias: str, collection: str) -> None:
        """Create or move `alias` to `collection` in one step."""
        if alias in self._call(self.client.list_aliases).get("aliases", []):
            self._call(self.client.alter_alias, collection_name=collection, alias=alias)
        else:
            self._call(self.client.create_alias, collection_name=collection, alias=alias)

    def close(self) -> None:
        for name, pending in self._unflushed.items():
            if pending:  # leave Lite's data indexed for the next process
                try:
                    self.flush(name)
                except Exception as exc:  # closing must not fail on a dropped collection
                    log.debug("flush_on_close_skipped", collection=name, reason=str(exc))
        self.client.close()
        if self._lite is not None:
            self._lite.release()

    def _query(self, **kwargs: Any) -> Any:
        return self._call(self.client.query, consistency_level=BOOKKEEPING_CONSISTENCY, **kwargs)

    # ------------------------------------------------------------------ errors
    def _call(self, method: Any, /, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self.timeout_s)
        started = time.perf_counter()
        outcome = "error"
        try:
            result = method(**kwargs)
            outcome = "ok"
            return result
        except MilvusException as exc:
            raise translate_milvus_error(exc) from exc
        except Exception as exc:  # grpc connection errors surface as many types in pymilvus
            if "grpc" in type(exc).__module__ or isinstance(exc, ConnectionError | TimeoutError):
                raise BackendUnavailableError(f"Milvus unavailable: {type(exc).__name__}") from exc
            raise
        finally:
            STORE_LATENCY.labels(operation=method.__name__, outcome=outcome).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ batch indexer (indexer/)
    # Reads here use Strong consistency: the indexer decides what to write from them, so they must
    # see every write Milvus has acknowledged (the default, Bounded, may lag by seconds on a server).
    QUERY_WINDOW = 16384  # Milvus' largest query result (offset + limit)

    def stored_chunks(self, name: str, doc_ids: Sequence[str],
                      consistency: str = "Strong") -> list[tuple[str, str, int, str]]:
        """(row id, doc id, chunk index, content hash) of every stored chunk of these documents.

        `consistency="Session"` is enough once this client has written to the collection: it then
        sees every write acknowledged before its own last one, without Strong's wait (~0.3 s).
        """
        if not doc_ids:
            return []
        rows = self._call(
            self.client.query, collection_name=name, filter=render_string_in("doc_id", list(doc_ids)),
            output_fields=["id", "doc_id", "chunk_index", "content_hash"], limit=self.QUERY_WINDOW,
            consistency_level=consistency,
        )
        if len(rows) >= self.QUERY_WINDOW and len(doc_ids) > 1:  # truncated: ask in halves
            half = len(doc_ids) // 2
            return (self.stored_chunks(name, doc_ids[:half], consistency)
                    + self.stored_chunks(name, doc_ids[half:], consistency))
        if len(rows) >= self.QUERY_WINDOW:  # one document with more chunks than a query returns
            return [
                (str(row["id"]), str(row["doc_id"]), int(row["chunk_index"]), str(row["content_hash"]))
                for row in self.iter_rows_where(
                    name, ["id", "doc_id", "chunk_index", "content_hash"], render_string_in("doc_id", doc_ids)
                )
            ]
        return [
            (str(row["id"]), str(row["doc_id"]), int(row["chunk_index"]), str(row["content_hash"]))
            for row in rows
        ]

    def rows_by_id(self, name: str, row_ids: Sequence[str],
                   consistency: str = "Strong") -> list[tuple[str, str, int, str]]:
        """(row id, doc id, chunk index, content hash) of the rows among these primary keys.

        A primary-key lookup costs the same however large the collection; a `doc_id in [...]`
        filter (stored_chunks) scans every row."""
        if not row_ids:
            return []
        rows = self._call(
            self.client.query, collection_name=name, ids=list(row_ids),
            output_fields=["id", "doc_id", "chunk_index", "content_hash"], consistency_level=consistency,
        )
        return [
            (str(row["id"]), str(row["doc_id"]), int(row["chunk_index"]), str(row["content_hash"]))
            for row in rows
        ]

    def delete_rows(self, name: str, row_ids: Sequence[str]) -> None:
        """Delete rows by primary key (`{doc_id}#{chunk_index}`)."""
        if not row_ids:
            return
        with self._write_lock:
            # Not `delete(ids=...)`: pymilvus quotes those without escaping backslashes.
            self._call(self.client.delete, collection_name=name, filter=render_string_in("id", list(row_ids)))

    def count_where(self, name: str, filter: str = "") -> int:
        rows = self._call(self.client.query, collection_name=name, filter=filter, output_fields=["count(*)"],
                          consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def iter_rows_where(self, name: str, output_fields: Sequence[str], filter: str = "",
                        batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        iterator = self._call(
            self.client.query_iterator, collection_name=name, batch_size=batch_size, filter=filter,
            output_fields=list(output_fields), consistency_level="Strong",
        )
        try:
            while batch := iterator.next():
                yield from batch
        finally:
            iterator.close()

    def chunks_with_vectors(self, name: str, doc_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Every stored field, vector included, of these documents' chunks."""
        if not doc_ids:
            return []
        rows = self._call(
            self.client.query, collection_name=name, filter=render_string_in("doc_id", list(doc_ids)),
            output_fields=[*OUTPUT_FIELDS, "vector"], limit=self.QUERY_WINDOW, consistency_level="Strong",
        )
        return sorted((dict(row) for row in rows), key=lambda row: (str(row["doc_id"]), int(row["chunk_index"])))

    def collection_properties(self, name: str) -> dict[str, str]:
        description = self._call(self.client.describe_collection, collection_name=self.resolve(name) or name)
        return {str(k): str(v) for k, v in (description.get("properties") or {}).items()}

    def set_collection_properties(self, name: str, properties: dict[str, str]) -> None:
        """Add or replace these collection properties (others are kept)."""
        with self._write_lock:
            self._call(self.client.alter_collection_properties, collection_name=name, properties=properties)

    def load(self, name: str) -> None:
        """Load a collection for queries (a collection reopened by a new Lite process is 'released')."""
        self._call(self.client.load_collection, collection_name=name)

    def ping(self) -> bool:
        """Whether Milvus answers at all (tells an outage from a request it refuses)."""
        try:
            self._call(self.client.list_collections)
        except Exception:
            return False
        return True


def translate_milvus_error(exc: MilvusException) -> Exception:
    message = str(exc.message)
    code = getattr(exc, "code", None)
    unavailable_markers = ("unavailable", "deadline", "timeout", "connect", "not ready")
    if code in (1, 2) or any(marker in message.lower() for marker in unavailable_markers):
        return BackendUnavailableError(f"Milvus unavailable: {message}")
    if "filter" in message.lower() or "expr" in message.lower():
        return InvalidInputError(f"filter rejected by Milvus: {message}")
    return BackendUnavailableError(f"Milvus error: {message}")


def model_record(manifest: ModelManifest, text_rules: str = TEXT_RULES.version) -> dict[str, str]:
    """Collection properties that record which model made its vectors and which text rules
    (normalisation and sentence splitting, semsearch/text.py) made its chunks (strings only)."""
    return {
        f"{RECORD_TAG}.model_version": manifest.version,
        f"{RECORD_TAG}.dimension": str(manifest.dimension),
        f"{RECORD_TAG}.manifest": manifest.model_dump_json(exclude={"metrics"}),
        TEXT_RULES_PROPERTY: text_rules,
    }


def read_model_record(description: dict[str, Any]) -> dict[str, Any] | None:
    properties = description.get("properties") or {}
    version = properties.get(f"{RECORD_TAG}.model_version")
    if not version:
        return None
    manifest_json = properties.get(f"{RECORD_TAG}.manifest") or "{}"
    return {
        "model_version": version, "dimension": int(properties[f"{RECORD_TAG}.dimension"]),
        "manifest": json.loads(manifest_json),
        # Absent on collections made before text rules were recorded: they keep the legacy rules.
        "text_rules": properties.get(TEXT_RULES_PROPERTY) or LEGACY_TEXT_RULES.version,
    }


def check_same_model(info: CollectionInfo, manifest: ModelManifest) -> None:
    """The core invariant: a query vector only meets vectors of the same model version."""
    if info.model_version != manifest.version or info.dimension != manifest.dimension:
        raise ModelMismatchError(
            f"collection {info.name!r} holds vectors of model {info.model_version} (dim {info.dimension}); "
            f"the encoder is {manifest.version} (dim {manifest.dimension}). Re-index into a new collection "
            "and swap (model, collection) together."
        )
