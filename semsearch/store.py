"""The Milvus store: one schema, model version recorded on every collection, typed filters only.

Rows are chunks of documents. A document of one chunk has one row; the row id is
`{doc_id}#{chunk_index}` so re-writing a document replaces its rows instead of adding new ones.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import grpc
import numpy as np
import structlog
from pymilvus import DataType, Function, FunctionType, MilvusClient, MilvusException
from pymilvus.exceptions import (
    AutoIDException,
    ConnectError,
    ConnectionNotExistException,
    DataNotMatchException,
    DataTypeNotMatchException,
    DataTypeNotSupportException,
    FieldsTypeException,
    FieldTypeException,
    MilvusUnavailableException,
    ParamError,
    PrimaryKeyException,
)

from semsearch.config import Settings
from semsearch.errors import (
    BackendUnavailableError,
    CollectionNotLoadedError,
    InvalidInputError,
    ModelMismatchError,
    NotFoundError,
    SemsearchError,
    StoreError,
    StoreRefusedError,
)
from semsearch.filters import TENANT_FIELD, Condition, TenantFilter, render_filters, render_literal, render_string_in
from semsearch.lite import LiteEndpoint, is_local_uri
from semsearch.manifest import ModelManifest
from semsearch.metrics import STORE_LATENCY
from semsearch.text import LEGACY_TEXT_RULES, TEXT_RULES

log = structlog.get_logger(__name__)

# Milvus' VARCHAR max_length counts UTF-8 bytes: "中" * 171 is 171 characters but 513 bytes.
MAX_ID_BYTES = 512
# Row ids of tenant-aware collections carry `@{tenant}` (at most 63 characters) after the chunk index.
MAX_TENANT_BYTES = 64
# Bookkeeping reads (counts, chunk lists, hashes) must see every acknowledged write: Strong.
# Searches read this client's own writes (Session) and otherwise never wait on the server.
BOOKKEEPING_CONSISTENCY = "Strong"
SEARCH_CONSISTENCY = "Session"
# Creating and loading a collection may take far longer than a request's timeout.
ADMIN_TIMEOUT_S = 120.0
LITE_FLUSH_ROWS = 4096
RECONNECT_INTERVAL_S = 1.0
# Reads (and repairs) a write makes to leave its documents whole beside concurrent writers.
SETTLE_ROUNDS = 4
MAX_TEXT_CHARS = 65535 // 4  # VARCHAR max_length counts bytes: 4 per character at worst
RECORD_TAG = "semsearch"
TEXT_RULES_PROPERTY = f"{RECORD_TAG}.text_rules"
OUTPUT_FIELDS = ["doc_id", "chunk_index", "char_offset", "text", "metadata", "content_hash"]
# Lexical retrieval: Milvus turns `text` into this BM25 sparse vector (a schema Function).
SPARSE_FIELD = "sparse"
BM25_FUNCTION = "text_bm25"
LEXICAL_PROPERTY = f"{RECORD_TAG}.lexical_analyzer"
# Milvus' largest search limit (topk); per-document searches never ask for more.
MAX_SEARCH_LIMIT = 16384
# Without native grouping, a per-document search first fetches this many chunks per document
# wanted, then 4x more while documents are missing and rows remain.
PER_DOCUMENT_OVERSAMPLE = 3
# Punctuation and particles that carry no meaning for BM25: a query made only of them has no hits.
LEXICAL_STOP_WORDS = sorted(
    set("，。！？、；：“”‘’「」『』（）《》〈〉【】…—～·．,.!?;:'\"()[]{}<>-_/\\|@#$%^&*+=~`")
    | {"……", "——", "的", "了", "吗", "呢", "吧", "啊", "呀", "哦", "嘛", "么"}
)


class TenantsUnavailableError(SemsearchError):
    """A tenant other than the default one, asked of a collection made before tenants existed."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


def no_tenants_reason(collection: str) -> str:
    return (f"collection {collection!r} was created before tenants existed and holds only the default "
            "tenant (tenant ''). To upgrade it, copy it into a collection with a tenant field: "
            "`semsearch promote <the same model> --collection <name> --force`")


class LexicalUnavailableError(SemsearchError):
    """Lexical or hybrid retrieval asked of a backend or collection without a BM25 field."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


def lexical_analyzer_params(analyzer: str, user_dict: Sequence[str] = ()) -> dict[str, Any] | None:
    """Milvus `analyzer_params` for the `lexical_analyzer` setting (None: no BM25 field).

    Milvus Lite 3.2 knows the `jieba` and `standard` tokenizers and the `stop` filter (it skips
    filters given by name); Milvus >= 2.5 also applies `cnalphanumonly`, which drops punctuation.
    """
    if analyzer == "none":
        return None
    stop = {"type": "stop", "stop_words": LEXICAL_STOP_WORDS}
    if analyzer == "standard":
        return {"tokenizer": "standard", "filter": ["lowercase", stop]}
    if analyzer in ("jieba", "jieba_exact"):
        tokenizer: dict[str, Any] = {"type": "jieba", "mode": "search" if analyzer == "jieba" else "exact"}
        if user_dict:
            tokenizer["dict"] = ["_default_", *user_dict]  # keep jieba's own dictionary too
        return {"tokenizer": tokenizer, "filter": ["cnalphanumonly", stop]}
    raise InvalidInputError(f"lexical_analyzer {analyzer!r}: expected jieba, jieba_exact, standard or none")


def warm_jieba() -> None:
    """Load jieba's dictionary now (1-15 s) in this process, where Milvus Lite's server runs.

    Lazily it would load inside the first write or lexical search, under that call's timeout.
    """
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # its progress lines are not ours to print
    jieba.initialize()


@dataclass(frozen=True)
class Capabilities:
    """What the connected Milvus can do beyond dense search."""

    server_version: str  # as Milvus reports it: "milvus_lite-3.2.2", "v2.3.5", "v2.5.4"
    bm25: bool  # BM25 Functions and sparse inverted indexes: Milvus Lite, Milvus >= 2.5
    grouping: bool  # native search(group_by_field=...): Milvus >= 2.4
    # Partition keys that upsert honours: Milvus 2.3.5 routes upserted rows to the wrong partition
    # (a search for `tenant == "acme"` then misses them), so there the tenant field is a plain one.
    partition_key: bool = True


def capabilities_of(server_version: str) -> Capabilities:
    if server_version.startswith("milvus_lite"):
        # Lite "groups" by over-fetching 10x top_k in Python and projecting every fetched row: on the
        # 104-entry FAQ 45-66 ms against 6-8 ms for a plain search that semsearch dedupes itself.
        return Capabilities(server_version, bm25=True, grouping=False, partition_key=True)
    match = re.match(r"v?(\d+)\.(\d+)", server_version.strip())
    if match is None:  # a managed service that does not say: assume a current Milvus
        return Capabilities(server_version, bm25=True, grouping=True)
    version = (int(match.group(1)), int(match.group(2)))
    return Capabilities(server_version, bm25=version >= (2, 5), grouping=version >= (2, 4),
                        partition_key=version >= (2, 4))


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


def chunk_row_id(doc_id: str, chunk_index: int, tenant: str = "") -> str:
    """`{doc_id}#{chunk_index}`, and `@{tenant}` after it for a tenant other than the default one:
    ids are unique per tenant. Unambiguous: a default-tenant id ends in `#<digits>`, and tenant
    names hold no `#`."""
    return f"{doc_id}#{chunk_index}@{tenant}" if tenant else f"{doc_id}#{chunk_index}"


@dataclass
class ChunkRow:
    doc_id: str
    chunk_index: int
    text: str
    vector: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    char_offset: int = 0
    tenant: str = ""  # '' = the default tenant

    def to_entity(self, written_at: int | None = None, *, tenant_field: bool = False) -> dict[str, Any]:
        entity = {
            "id": chunk_row_id(self.doc_id, self.chunk_index, self.tenant),
            "doc_id": self.doc_id,
            "chunk_index": self.chunk_index,
            "text": self.text,
            "metadata": self.metadata,
            "content_hash": self.content_hash,
            "char_offset": self.char_offset,
            # When the row was written: promotion replays rows written during a re-embed.
            "updated_at": int(time.time() * 1000) if written_at is None else written_at,
            "vector": self.vector.astype(np.float32).tolist(),
        }
        if tenant_field:
            entity[TENANT_FIELD] = self.tenant
        return entity


class StoredChunk(NamedTuple):
    """What bookkeeping needs of a stored chunk (a tuple: unpacks as before)."""

    row_id: str
    doc_id: str
    chunk_index: int
    content_hash: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> StoredChunk:
        return cls(str(row["id"]), str(row["doc_id"]), int(row["chunk_index"]), str(row.get("content_hash", "")))


@dataclass(frozen=True)
class RetrieverScore:
    retriever: str  # "dense" or "lexical"
    score: float  # cosine similarity, or BM25 score
    rank: int  # 1-based, among that retriever's results


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_index: int
    score: float
    text: str
    metadata: dict[str, Any]
    retrievers: tuple[RetrieverScore, ...] = ()


@dataclass(frozen=True)
class CollectionInfo:
    name: str  # the physical collection, aliases resolved
    model_version: str
    dimension: int
    manifest: dict[str, Any]
    text_rules: str = LEGACY_TEXT_RULES.version  # semsearch/text.py; collections made before it: legacy
    lexical: bool = False  # has the BM25 sparse field (lexical and hybrid retrieval)
    tenants: bool = False  # has the tenant partition-key field (collections made before it: no)


class IdleFlusher:
    """Flushes a Milvus Lite collection once writes to it pause for `idle_s` seconds.

    Lite indexes only flushed segments and converts every unflushed row on every search (a
    service that took 100 upserts searches 3-5x slower until a flush); its background compaction
    merges the small segments this makes.
    """

    def __init__(self, flush: Callable[[str], None], idle_s: float) -> None:
        self._flush = flush
        self.idle_s = idle_s
        self._due: dict[str, float] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def wrote(self, name: str) -> None:
        with self._wake:
            if self._closed:
                return
            self._due[name] = time.monotonic() + self.idle_s
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lite-idle-flush", daemon=True)
                self._thread.start()
            self._wake.notify()

    def flushed(self, name: str) -> None:
        with self._wake:
            self._due.pop(name, None)

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._closed:
                    return
                if not self._due:
                    self._wake.wait()
                    continue
                name, due = min(self._due.items(), key=lambda item: item[1])
                if due > time.monotonic():
                    self._wake.wait(due - time.monotonic())
                    continue
                del self._due[name]
            try:
                self._flush(name)
                log.debug("lite_idle_flush", collection=name)
            except Exception as exc:  # a dropped collection, a closing store: the next write re-arms it
                log.debug("lite_idle_flush_skipped", collection=name, reason=str(exc))

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)


class MilvusStore:
    """A thin, typed layer over pymilvus' MilvusClient for local (Milvus Lite) and server URIs."""

    @classmethod
    def from_settings(cls, settings: Settings, *, min_timeout_s: float = 0.0) -> MilvusStore:
        """The store every command opens: `min_timeout_s` raises the per-call timeout for batch jobs."""
        return cls(
            settings.milvus_uri,
            token=settings.milvus_token.get_secret_value() if settings.milvus_token else None,
            timeout_s=max(settings.milvus_timeout_s, min_timeout_s), hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction, search_ef=settings.search_ef,
            lexical_analyzer=settings.lexical_analyzer, lexical_user_dict=settings.lexical_user_dict,
            lite_idle_flush_s=settings.lite_idle_flush_s,
        )

    def __init__(self, uri: str, *, token: str | None = None, timeout_s: float = 10.0,
                 hnsw_m: int = 16, hnsw_ef_construction: int = 200, search_ef: int = 128,
                 lexical_analyzer: str = "jieba", lexical_user_dict: Sequence[str] = (),
                 lite_idle_flush_s: float = 0.0) -> None:
        self.uri = uri
        self.lexical_analyzer = lexical_analyzer
        self.lexical_user_dict = tuple(lexical_user_dict)
        self._capabilities: Capabilities | None = None
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
        if self.is_lite and lexical_analyzer.startswith("jieba"):
            warm_jieba()
        self._token = token or ""
        self._client_lock = threading.Lock()
        self._last_reconnect = 0.0
        self.client = self._connect(connect_uri)
        # Milvus Lite's engine is single-writer per collection: serialize our own writes.
        self._write_lock = threading.Lock()
        self._unflushed: dict[str, int] = {}
        self._idle_flusher = (IdleFlusher(self.flush, lite_idle_flush_s)
                              if self.is_lite and lite_idle_flush_s > 0 else None)
        self._tenant_aware: dict[str, bool] = {}
        self._loading = threading.Lock()  # one load at a time; other callers do not wait for it

    def _connect(self, connect_uri: str) -> MilvusClient:
        # Dedicated: pymilvus otherwise shares one handler per URI in the process, and after a
        # server restart that handler never recovers ("Fail connecting to server" for good).
        # A channel argument unique to this connection: gRPC shares subchannels between channels
        # with equal arguments, and a new client would inherit the dead one's reconnect backoff.
        options = {"grpc.primary_user_agent": f"semsearch/{uuid.uuid4().hex}"}
        try:
            return MilvusClient(uri=connect_uri, token=self._token, timeout=self.timeout_s, dedicated=True,
                                grpc_options=options)
        except MilvusException as exc:
            raise BackendUnavailableError(f"cannot connect to Milvus at {self.uri}: {exc.message}") from exc

    def reconnect(self) -> bool:
        """Replace the client with a fresh connection (at most every RECONNECT_INTERVAL_S).

        A Milvus server killed and restarted on the same address is reachable again, but the old
        client's channel is not; a Lite directory whose owner process exited is re-attached (this
        process may become its owner). True when a new client is in place.
        """
        with self._client_lock:
            now = time.monotonic()
            if now - self._last_reconnect < RECONNECT_INTERVAL_S:
                return False
            self._last_reconnect = now
            old = self.client
            try:
                if self._lite is not None and not self._lite.owner:
                    self._lite.release()
                    self._lite = LiteEndpoint.attach(self.uri)
                    url = self._lite.url
                else:
                    url = self._lite.url if self._lite is not None else self.uri
                self.client = self._connect(url)
            except Exception as exc:
                log.warning("milvus_reconnect_failed", uri=self.uri, reason=str(exc)[:300])
                return False
        try:
            old.close()
        except Exception as exc:  # the old channel may be half-dead: closing it must not fail us
            log.debug("milvus_old_client_close_failed", reason=str(exc))
        log.info("milvus_reconnected", uri=self.uri)
        return True

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
            lexical=has_bm25_field(description), tenants=has_tenant_field(description),
        )

    def capabilities(self) -> Capabilities:
        """What this Milvus supports, from the version it reports (asked once)."""
        if self._capabilities is None:
            self._capabilities = capabilities_of(str(self._call(self.client.get_server_version)))
        return self._capabilities

    def ensure_collection(self, name: str, manifest: ModelManifest, *, create: bool = True) -> CollectionInfo:
        """Open `name` for `manifest`'s model, creating it if allowed; refuse a model mismatch."""
        if self.resolve(name):
            info = self.collection_info(name)
            check_same_model(info, manifest)
            self.ensure_loaded(info.name)
            return info
        if not create:
            raise NotFoundError(f"collection {name!r} does not exist")
        self.create_collection(name, manifest)
        return self.collection_info(name)

    def create_collection(self, name: str, manifest: ModelManifest) -> None:
        # The BM25 field only where the backend computes it (Milvus 2.3 has no Functions); the
        # collection's schema then records whether lexical retrieval is possible.
        analyzer = lexical_analyzer_params(self.lexical_analyzer, self.lexical_user_dict)
        if analyzer is not None and not self.capabilities().bm25:
            log.warning("lexical_unsupported", server_version=self.capabilities().server_version,
                        reason="BM25 needs Milvus Lite or Milvus >= 2.5; the collection serves dense only")
            analyzer = None
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES + 16 + MAX_TENANT_BYTES)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
        # One collection serves many tenants: Milvus hashes this field to partitions, and a search
        # filtered on one tenant reads only its partition (a plain field where upsert mis-routes keys).
        schema.add_field(TENANT_FIELD, DataType.VARCHAR, max_length=MAX_TENANT_BYTES,
                         is_partition_key=self.capabilities().partition_key)
        schema.add_field("chunk_index", DataType.INT64)
        if analyzer is None:
            schema.add_field("text", DataType.VARCHAR, max_length=65535)
        else:
            schema.add_field("text", DataType.VARCHAR, max_length=65535, enable_analyzer=True,
                             analyzer_params=analyzer)
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
        properties = model_record(manifest)
        if analyzer is not None:
            schema.add_field(SPARSE_FIELD, DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(
                name=BM25_FUNCTION, function_type=FunctionType.BM25, input_field_names=["text"],
                output_field_names=[SPARSE_FIELD],
            ))
            index_params.add_index(field_name=SPARSE_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            properties[LEXICAL_PROPERTY] = json.dumps(analyzer, ensure_ascii=False, sort_keys=True)
        self._call(
            self.client.create_collection, collection_name=name, schema=schema, index_params=index_params,
            description=f"{RECORD_TAG} model {manifest.version}", properties=properties,
            # Session: a client reads its own writes; others see them within the bounded staleness.
            consistency_level="Session", timeout=ADMIN_TIMEOUT_S,
        )
        self._call(self.client.load_collection, collection_name=name, timeout=ADMIN_TIMEOUT_S)
        log.info("collection_created", collection=name, model_version=manifest.version, lexical=analyzer is not None)

    def drop_collection(self, name: str) -> None:
        self._call(self.client.drop_collection, collection_name=name)

    # ------------------------------------------------------------------ writes
    def tenant_aware(self, name: str) -> bool:
        """Whether `name` (a collection or alias) has the tenant field; physical names are cached."""
        cached = self._tenant_aware.get(name)
        if cached is not None:
            return cached
        description = self._call(self.client.describe_collection, collection_name=name)
        aware = has_tenant_field(description)
        if description.get("collection_name") == name:  # an alias may move to another schema
            self._tenant_aware[name] = aware
        return aware

    def tenant_condition(self, name: str, tenant: str | None) -> list[Condition]:
        """The condition that keeps a read or delete inside `tenant` (None: every tenant)."""
        if tenant is None:
            return []
        if self.tenant_aware(name):
            return [TenantFilter(tenant)]
        if tenant:
            raise TenantsUnavailableError(no_tenants_reason(name))
        return []  # a collection without tenants holds only the default tenant

    def upsert(self, name: str, rows: Sequence[ChunkRow], *, written_at: int | None = None) -> int:
        if not rows:
            return 0
        tenant_field = self.tenant_aware(name)
        if not tenant_field and any(row.tenant for row in rows):
            raise TenantsUnavailableError(no_tenants_reason(name))
        entities = [row.to_entity(written_at, tenant_field=tenant_field) for row in rows]
        with self._write_lock:
            result = self._call(self.client.upsert, collection_name=name, data=entities)
            if self.is_lite:
                self._unflushed[name] = self._unflushed.get(name, 0) + len(entities)
        if self.is_lite:
            self._flush_lite_when_due(name)
        return int(result.get("upsert_count", len(entities)))

    def _flush_lite_when_due(self, name: str) -> None:
        # Milvus Lite indexes only flushed segments and converts unflushed rows one by one on every
        # search (bench/STORE_NOTES.md): flush every few thousand rows instead of at 128 MiB, and
        # (a service) once writes pause.
        if self._unflushed.get(name, 0) >= LITE_FLUSH_ROWS:
            self.flush(name)
        elif self._idle_flusher is not None:
            self._idle_flusher.wrote(name)

    def write_documents(self, name: str, rows: Sequence[ChunkRow]) -> int:
        """Upsert whole documents (all of each one's chunks), drop chunks past their new end, then
        repair what a concurrent writer of another process broke (`_repair_versions`).

        New rows land before stale ones go, so a document is never absent mid-write. The stale
        tail is deleted by a filter Milvus evaluates at delete time, limited to rows written
        before this write (`updated_at`): a newer, longer version written meanwhile by another
        process keeps all its chunks (no list-then-delete window).
        """
        for row in rows:  # all checks before any write: a rejected call changes nothing
            check_doc_id(row.doc_id)
        with self._document_writes():
            written_at = int(time.time() * 1000)
            written = self.upsert(name, rows, written_at=written_at)
            self._delete_tails(name, rows, written_at)
            self._repair_versions(name, rows, written_at)
        return written

    @contextmanager
    def _document_writes(self) -> Iterator[None]:
        """On Milvus Lite, document writes of every process on the directory one at a time (a file
        lock beside it), each stamped inside the lock: an older write can no longer land over a newer
        one after that one has settled (shared chunk ids leave such a mix unrepairable). A server has
        no shared directory: there, writes settle by `_repair_versions` alone."""
        if self._lite is None:
            yield
            return
        lock_path = self._lite.data_dir.parent / f".{self._lite.data_dir.name}.writes.lock"
        with lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _delete_tails(self, name: str, rows: Sequence[ChunkRow], written_at: int) -> None:
        chunk_count: dict[tuple[str, str], int] = {}
        for row in rows:
            key = (row.tenant, row.doc_id)
            chunk_count[key] = max(chunk_count.get(key, 0), row.chunk_index + 1)
        by_count: dict[tuple[str, int], list[str]] = {}
        for (tenant, doc_id), count in chunk_count.items():
            by_count.setdefault((tenant, count), []).append(doc_id)
        tenant_field = self.tenant_aware(name)
        # Ids are unique per tenant: another tenant's document of the same id is not this one's tail.
        tails = [f"({render_string_in('doc_id', ids)} and chunk_index >= {int(count)}"
                 + (f" and {render_filters([TenantFilter(tenant)])})" if tenant_field else ")")
                 for (tenant, count), ids in sorted(by_count.items())]
        self._delete_where(name, f"({' or '.join(tails)}) and updated_at <= {written_at}")

    def _repair_versions(self, name: str, rows: Sequence[ChunkRow], written_at: int) -> None:
        """Read back (Strong) what this write stored; where it is still the newest version of a
        document (`updated_at`, then `content_hash`) but lost chunks (a concurrent delete's
        filter caught them, an older write's rows landed over them), write those again and drop
        older tails again; repeated until whole (at most SETTLE_ROUNDS reads). A write that a newer
        one superseded deletes nothing: Milvus deletes by filter as "find the rows, delete their
        ids", and the ids are shared by every version of a document, so a loser's delete could
        remove the winner's chunks."""
        tenant_field = self.tenant_aware(name)
        wanted: dict[tuple[str, str], dict[int, ChunkRow]] = {}
        for row in rows:
            wanted.setdefault((row.tenant, row.doc_id), {})[row.chunk_index] = row
        fields = ["content_hash", "updated_at", *([TENANT_FIELD] if tenant_field else [])]
        for _ in range(SETTLE_ROUNDS):
            stored: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for stored_row in self.document_rows(name, sorted({doc_id for _, doc_id in wanted}), fields, tenant=None):
                key = (str(stored_row.get(TENANT_FIELD, "")), str(stored_row["doc_id"]))
                stored.setdefault(key, []).append(stored_row)
            missing: list[ChunkRow] = []
            broken: list[ChunkRow] = []  # every chunk of each document to repair: its tail starts after them
            for key, chunks in wanted.items():
                mine = (written_at, chunks[0].content_hash if 0 in chunks else "")
                present = {(int(row["chunk_index"]), (int(row["updated_at"]), str(row["content_hash"])))
                           for row in stored.get(key, [])}
                if any(version > mine for _, version in present):
                    continue  # superseded: the newer write repairs its own version
                have = {index for index, version in present if version == mine}
                if len(have) < len(chunks) or any(index >= len(chunks) for index, _ in present):
                    missing += [row for index, row in chunks.items() if index not in have]
                    broken += chunks.values()
            if not broken:
                return
            log.info("document_version_repaired", collection=name, chunks=len(missing))
            self.upsert(name, missing, written_at=written_at)
            self._delete_tails(name, broken, written_at)
        log.warning("document_versions_unsettled", collection=name, rounds=SETTLE_ROUNDS)

    def delete_documents(self, name: str, doc_ids: Sequence[str], tenant: str = "", *, dry_run: bool = False) -> int:
        """Delete every chunk of these documents of `tenant`; returns how many documents existed
        (dry_run: only count them).

        One delete by filter (evaluated by Milvus at delete time) rather than listing chunk ids
        first: a version written between a listing and the delete would lose some chunks only.
        """
        if not doc_ids:
            return 0
        where = render_filters(self.tenant_condition(name, tenant))
        by_id = render_string_in("doc_id", list(doc_ids)) + (f" and {where}" if where else "")
        existing = self._query(  # a stored document always has its chunk 0
            collection_name=name, filter=by_id + " and chunk_index == 0", output_fields=["doc_id"],
        )
        if not dry_run:
            with self._document_writes():
                deleted_at = int(time.time() * 1000)
                self._delete_where(name, by_id)
                # A concurrent upsert's rows still landing escaped the filter: delete them as well, up to
                # the versions written before this delete (a later upsert settles its own version whole).
                for _ in range(SETTLE_ROUNDS):
                    left = self._query(collection_name=name, filter=f"{by_id} and updated_at <= {deleted_at}",
                                       output_fields=["id"], limit=1)
                    if not left:
                        break
                    self._delete_where(name, f"{by_id} and updated_at <= {deleted_at}")
        return len({str(row["doc_id"]) for row in existing})

    def count_documents(self, name: str, conditions: Sequence[Condition]) -> int:
        """Documents (their chunk 0) matching typed conditions."""
        where = render_filters(conditions)
        return self.count(name, f"({where}) and chunk_index == 0" if where else "chunk_index == 0")

    def delete_matching(self, name: str, conditions: Sequence[Condition], *, dry_run: bool = False) -> int:
        """Delete every document matching typed conditions (filters.py renders them); returns how many
        documents matched. Metadata is the same on every chunk of a document, so whole documents go."""
        matched = self.count_documents(name, conditions)
        if not dry_run and matched:
            self._delete_where(name, render_filters(conditions) or "chunk_index >= 0")
        return matched

    def _delete_where(self, name: str, expression: str) -> None:
        """Delete by an expression built only from typed values by this module (never user text)."""
        with self._write_lock:
            self._call(self.client.delete, collection_name=name, filter=expression)

    def flush(self, name: str) -> None:
        with self._write_lock:
            self._call(self.client.flush, collection_name=name)
            self._unflushed[name] = 0
        if self._idle_flusher is not None:
            self._idle_flusher.flushed(name)

    # ------------------------------------------------------------------ reads
    # Bookkeeping reads decide what to write (indexer plans, stale chunks, promotion copies), so they
    # default to Strong: they see every write Milvus has acknowledged (Bounded may lag seconds on a
    # server). `consistency="Session"` is enough once this client has itself written: it then sees
    # every write acknowledged before its own last one, without Strong's wait (~0.3 s).
    QUERY_WINDOW = 16384  # Milvus' largest query result (offset + limit)

    def count(self, name: str, filter: str = "") -> int:
        """Rows matching `filter` (a rendered expression, never a user string; '' = all rows)."""
        rows = self._query(collection_name=name, filter=filter, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def iter_rows(self, name: str, fields: Sequence[str], filter: str = "",
                  batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every row matching `filter`, in pages: no query window limits a scan."""
        iterator = self._call(
            self.client.query_iterator, collection_name=name, batch_size=batch_size, filter=filter,
            output_fields=list(fields), consistency_level=BOOKKEEPING_CONSISTENCY,
        )
        try:
            while batch := iterator.next():
                yield from batch
        finally:
            iterator.close()

    def document_rows(self, name: str, doc_ids: Sequence[str], fields: Sequence[str] = OUTPUT_FIELDS,
                      consistency: str = BOOKKEEPING_CONSISTENCY, tenant: str | None = "") -> list[dict[str, Any]]:
        """`fields` of every stored chunk of these documents of `tenant` (None: of every tenant), by
        (doc id, chunk index).

        The one chunk listing: a query returns at most QUERY_WINDOW rows, so a truncated answer is
        asked again in halves, and one document with more chunks than that is scanned in pages.
        """
        if not doc_ids:
            return []
        fields = list(dict.fromkeys(["id", "doc_id", "chunk_index", *fields]))
        where = render_string_in("doc_id", list(doc_ids))
        in_tenant = render_filters(self.tenant_condition(name, tenant))
        if in_tenant:
            where = f"{where} and {in_tenant}"
        rows = self._query(collection_name=name, filter=where, output_fields=fields, limit=self.QUERY_WINDOW,
                           consistency_level=consistency)
        if len(rows) >= self.QUERY_WINDOW and len(doc_ids) > 1:  # truncated: ask in halves
            half = len(doc_ids) // 2
            rows = (self.document_rows(name, doc_ids[:half], fields, consistency, tenant)
                    + self.document_rows(name, doc_ids[half:], fields, consistency, tenant))
        elif len(rows) >= self.QUERY_WINDOW:
            rows = list(self.iter_rows(name, fields, where))
        return sorted((dict(row) for row in rows), key=lambda row: (str(row["doc_id"]), int(row["chunk_index"])))

    def stored_chunks(self, name: str, doc_ids: Sequence[str],
                      consistency: str = BOOKKEEPING_CONSISTENCY, tenant: str | None = "") -> list[StoredChunk]:
        """(row id, doc id, chunk index, content hash) of every stored chunk of these documents."""
        return [StoredChunk.of(row)
                for row in self.document_rows(name, doc_ids, ["content_hash"], consistency, tenant)]

    def rows_by_id(self, name: str, row_ids: Sequence[str],
                   consistency: str = BOOKKEEPING_CONSISTENCY) -> list[StoredChunk]:
        """The stored chunks among these primary keys (`{doc_id}#{chunk_index}`).

        A primary-key lookup costs the same however large the collection; a `doc_id in [...]`
        filter (stored_chunks) scans every row. At most QUERY_WINDOW ids per call."""
        if not row_ids:
            return []
        rows = self._query(collection_name=name, ids=list(row_ids),
                           output_fields=["id", "doc_id", "chunk_index", "content_hash"], consistency_level=consistency)
        return [StoredChunk.of(row) for row in rows]

    def list_collections(self) -> list[str]:
        return [str(name) for name in self._call(self.client.list_collections)]

    def list_aliases(self) -> list[str]:
        return [str(alias) for alias in self._call(self.client.list_aliases).get("aliases", [])]

    def search(
        self, name: str, vectors: np.ndarray | None = None, *, top_k: int, filters: Sequence[Condition] = (),
        output_fields: Iterable[str] = ("doc_id", "chunk_index", "text", "metadata"),
        timeout_s: float | None = None, texts: Sequence[str] | None = None, per_document: bool = False,
        min_score: float | None = None, enough: int | None = None,
    ) -> list[list[Hit]]:
        """Dense search (`vectors`) or BM25 search over the chunk text (`texts`), best first.

        `per_document`: at most one hit (its best chunk) per document, and `top_k` documents whenever
        the collection holds that many after filters: Milvus grouping search where the backend has
        it (Milvus >= 2.4), then, for queries still short (Milvus Lite and 2.3 have no native
        grouping), searches with growing limits until enough documents or no more rows.
        `enough` (per_document, below top_k): up to top_k documents are welcome but `enough` suffice, so
        the first search fetches top_k rows, not PER_DOCUMENT_OVERSAMPLE times more (hybrid candidates:
        Milvus Lite builds every fetched row in Python, and the rows are most of a search's cost).

        `min_score`: no hit scores below it. Dense searches are Milvus range searches (`radius`:
        rows below it are never fetched); BM25 scores are cut here (best first: a cut row means
        no later row qualifies, so the growing-limit loop stops).
        """
        lexical = texts is not None
        data: list[Any] = list(texts) if texts is not None else np.asarray(vectors, dtype=np.float32).tolist()
        if not data:
            return []
        fields = list(dict.fromkeys(["doc_id", "chunk_index", *output_fields]))
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        retriever = "lexical" if lexical else "dense"

        def run(batch: list[Any], limit: int, group: bool) -> list[list[Hit]]:
            options: dict[str, Any] = {"group_by_field": "doc_id"} if group else {}
            if lexical:
                params: dict[str, Any] = {"metric_type": "BM25"}
            else:
                params = {"metric_type": "COSINE", "params": {"ef": max(self.search_ef, limit)}}
                if min_score is not None:
                    # Milvus keeps similarities strictly above the radius: equal ones pass the cut below.
                    params["params"]["radius"] = max(-1.0, float(min_score) - 1e-6)
                    params["params"]["range_filter"] = 1.0 + 1e-6
            results = self._call(
                self.client.search, collection_name=name, data=batch, limit=limit, filter=render_filters(filters),
                output_fields=fields, anns_field=SPARSE_FIELD if lexical else "vector", search_params=params,
                timeout=timeout, consistency_level=SEARCH_CONSISTENCY, **options,
            )
            found = [_hits(per_query, retriever, lexical) for per_query in results]
            if min_score is not None:
                found = [[hit for hit in hits if hit.score >= min_score] for hits in found]
            return found

        if not per_document:
            return self._checked_complete(name, run(data, top_k, False), top_k)
        found: list[list[Hit]] = [[] for _ in data]
        todo = list(range(len(data)))
        wanted = top_k if enough is None else min(enough, top_k)
        if self.capabilities().grouping:
            grouped = run(data, top_k, True)
            for i in todo:
                found[i] = best_chunk_per_document(grouped[i], top_k)
            todo = [i for i in todo if len(found[i]) < wanted]
        limit = min(top_k * (PER_DOCUMENT_OVERSAMPLE if enough is None else 1), MAX_SEARCH_LIMIT)
        while todo:
            results = run([data[i] for i in todo], limit, False)
            short = []
            for i, hits in zip(todo, results, strict=True):
                found[i] = best_chunk_per_document(hits, top_k)
                if len(found[i]) < wanted and len(hits) >= limit and limit < MAX_SEARCH_LIMIT:
                    short.append(i)  # more rows may hold more documents
            todo = short
            limit = min(limit * 4, MAX_SEARCH_LIMIT)
        return self._checked_complete(name, found, wanted)

    def _checked_complete(self, name: str, found: list[list[Hit]], wanted: int) -> list[list[Hit]]:
        """`found`, once a short answer (fewer hits than wanted: a filter, a threshold, a small
        collection, or a collection still loading after a restart) is known to come from a fully
        loaded collection: an empty OK would tell a RAG application "nothing found"."""
        if any(len(hits) < wanted for hits in found):
            self.require_loaded(name)
        return found

    # ------------------------------------------------------------------ aliases
    def point_alias(self, alias: str, collection: str) -> None:
        """Create or move `alias` to `collection` in one step."""
        if alias in self._call(self.client.list_aliases).get("aliases", []):
            self._call(self.client.alter_alias, collection_name=collection, alias=alias)
        else:
            self._call(self.client.create_alias, collection_name=collection, alias=alias)

    def close(self) -> None:
        if self._idle_flusher is not None:
            self._idle_flusher.close()
        for name, pending in list(self._unflushed.items()):
            if pending:  # leave Lite's data indexed for the next process
                try:
                    self.flush(name)
                except Exception as exc:  # closing must not fail on a dropped collection
                    log.debug("flush_on_close_skipped", collection=name, reason=str(exc))
        self.client.close()
        if self._lite is not None:
            self._lite.release()

    def _query(self, **kwargs: Any) -> Any:
        kwargs.setdefault("consistency_level", BOOKKEEPING_CONSISTENCY)
        return self._call(self.client.query, **kwargs)

    # ------------------------------------------------------------------ errors
    def _call(self, method: Any, /, **kwargs: Any) -> Any:
        """Call a MilvusClient method, translating errors; heal the two states a restart leaves.

        A collection found not loaded (a new Lite process, a restarted server) is loaded and the
        call repeated once; a dead connection is replaced and the call repeated once.
        """
        kwargs.setdefault("timeout", self.timeout_s)
        name = method.__name__
        try:
            return self._call_once(method, kwargs)
        except CollectionNotLoadedError:
            collection = kwargs.get("collection_name")
            if not collection or name in ("load_collection", "get_load_state"):
                raise
            log.info("collection_not_loaded", collection=collection, operation=name)
            if not self.load_if_released(str(collection)):
                raise  # Milvus (or another thread) is loading it: UNAVAILABLE now, not a wait past the deadline
        except BackendUnavailableError as exc:
            if not is_connection_failure(exc) or not self.reconnect():
                raise
        return self._call_once(getattr(self.client, name), kwargs)

    def _call_once(self, method: Any, kwargs: dict[str, Any]) -> Any:
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

    # ------------------------------------------------------------------ maintenance
    def delete_rows(self, name: str, row_ids: Sequence[str]) -> None:
        """Delete rows by primary key (`{doc_id}#{chunk_index}`)."""
        if not row_ids:
            return
        with self._write_lock:
            # Not `delete(ids=...)`: pymilvus quotes those without escaping backslashes.
            self._call(self.client.delete, collection_name=name, filter=render_string_in("id", list(row_ids)))

    def collection_properties(self, name: str) -> dict[str, str]:
        description = self._call(self.client.describe_collection, collection_name=self.resolve(name) or name)
        return {str(k): str(v) for k, v in (description.get("properties") or {}).items()}

    def set_collection_properties(self, name: str, properties: dict[str, str]) -> None:
        """Add or replace these collection properties (others are kept)."""
        with self._write_lock:
            self._call(self.client.alter_collection_properties, collection_name=name, properties=properties)

    def load(self, name: str) -> None:
        """Load a collection for queries (a collection reopened by a new Lite process is 'released')."""
        self._call(self.client.load_collection, collection_name=self.resolve(name) or name,
                   timeout=ADMIN_TIMEOUT_S)

    def load_state(self, name: str) -> str:
        """Milvus' load state of the collection `name` (not an alias): Loaded, Loading, NotLoad or NotExist."""
        state = self._call(self.client.get_load_state, collection_name=name)
        return str(state.get("state", ""))  # pymilvus' LoadState prints its bare name

    def load_if_released(self, name: str) -> bool:
        """Load `name` when it is released (a new Lite process, a release); True when it is loaded.

        False at once when it is still loading (a restarted server reloads what was loaded by
        itself) or another thread of this process is loading it: callers answer UNAVAILABLE then,
        rather than hold a request (and a thread) for the whole load."""
        if not self._loading.acquire(blocking=False):
            return False
        try:
            state = self.load_state(name)
            if state == "NotLoad":
                self.load(name)
                state = self.load_state(name)
            return state == "Loaded"
        finally:
            self._loading.release()

    def require_loaded(self, name: str) -> None:
        """Raise CollectionNotLoadedError (UNAVAILABLE) unless every row of `name` is searchable: an
        answer with fewer hits than asked must not come from a collection that is still loading."""
        state = self.load_state(name)
        if state != "Loaded":
            raise CollectionNotLoadedError(f"Milvus unavailable: collection {name!r} is {state or 'not loaded'}, "
                                           "its answers would be incomplete; retry shortly")

    def ensure_loaded(self, name: str) -> None:
        """Load `name` unless it is loaded: whoever opens an existing collection can serve it.

        Milvus Lite reopens every collection 'released' in a new process; a Milvus server may
        still be loading after a restart, or someone released it."""
        physical = self.resolve(name) or name
        state = self._call(self.client.get_load_state, collection_name=physical)
        if str(state.get("state", "")).endswith("Loaded") and "NotLoad" not in str(state.get("state", "")):
            return
        log.info("collection_loading", collection=physical, state=str(state.get("state", "")))
        self.load(physical)

    def ping(self) -> bool:
        """Whether Milvus answers at all (tells an outage from a request it refuses)."""
        try:
            self._call(self.client.list_collections)
        except Exception:
            return False
        return True

    # ------------------------------------------------------------------ small record tables (registry)
    # A key -> text table in Milvus (one VARCHAR primary key, one VARCHAR value; Milvus insists on a
    # vector field, so a 2-d dummy). Always Strong: these records decide what gets written.
    RECORD_KEY_FIELD = "name"

    def ensure_record_table(self, name: str) -> None:
        if self.has_collection(name):
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(self.RECORD_KEY_FIELD, DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("record", DataType.VARCHAR, max_length=65535)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
        index = MilvusClient.prepare_index_params()
        index.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        self._call(self.client.create_collection, collection_name=name, schema=schema, index_params=index,
                   consistency_level="Strong", timeout=ADMIN_TIMEOUT_S)
        self._call(self.client.load_collection, collection_name=name, timeout=ADMIN_TIMEOUT_S)

    def read_records(self, name: str, keys: Sequence[str]) -> dict[str, str]:
        if not keys:
            return {}
        rows = self._query(collection_name=name, ids=list(keys), output_fields=[self.RECORD_KEY_FIELD, "record"],
                           consistency_level="Strong")
        return {str(row[self.RECORD_KEY_FIELD]): str(row["record"]) for row in rows}

    def scan_records(self, name: str, prefix: str = "") -> dict[str, str]:
        """Every record whose key starts with `prefix`."""
        where = f"{self.RECORD_KEY_FIELD} like {render_literal(prefix + '%')}" if prefix else ""
        rows = self.iter_rows(name, [self.RECORD_KEY_FIELD, "record"], where)
        # `like` may treat `_` as a wildcard on some versions: the prefix is checked here exactly.
        return {str(row[self.RECORD_KEY_FIELD]): str(row["record"]) for row in rows
                if str(row[self.RECORD_KEY_FIELD]).startswith(prefix)}

    def write_record(self, name: str, key: str, value: str) -> None:
        with self._write_lock:
            self._call(self.client.upsert, collection_name=name, data=[{
                self.RECORD_KEY_FIELD: key, "record": value, "vector": [0.0, 0.0]}])

    def delete_records(self, name: str, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._write_lock:
            self._call(self.client.delete, collection_name=name,
                       filter=render_string_in(self.RECORD_KEY_FIELD, list(keys)))



def _hits(results: Iterable[dict[str, Any]], retriever: str, lexical: bool) -> list[Hit]:
    hits = []
    for rank, hit in enumerate(results, start=1):
        entity = hit["entity"]
        # BM25 scores are >= 0; Milvus Lite 3.2 reports them negated (its internal distance).
        score = abs(float(hit["distance"])) if lexical else float(hit["distance"])
        hits.append(Hit(
            doc_id=str(entity["doc_id"]), chunk_index=int(entity["chunk_index"]), score=score,
            text=str(entity.get("text", "")), metadata=dict(entity.get("metadata") or {}),
            retrievers=(RetrieverScore(retriever, score, rank),),
        ))
    return hits


def best_chunk_per_document(hits: Sequence[Hit], top_k: int) -> list[Hit]:
    """The first (best) hit of each document, at most top_k of them; ranks renumbered per document."""
    seen: set[str] = set()
    best: list[Hit] = []
    for hit in hits:  # sorted by score, best first
        if hit.doc_id in seen:
            continue
        seen.add(hit.doc_id)
        best.append(replace(hit, retrievers=tuple(replace(r, rank=len(best) + 1) for r in hit.retrievers)))
        if len(best) == top_k:
            break
    return best


def has_tenant_field(description: dict[str, Any]) -> bool:
    return any(f.get("name") == TENANT_FIELD for f in description.get("fields") or [])


def has_bm25_field(description: dict[str, Any]) -> bool:
    """Whether a collection computes the BM25 sparse field that lexical retrieval searches."""
    for function in description.get("functions") or []:
        kind = function.get("type")
        if (kind == FunctionType.BM25 or str(kind).upper().endswith("BM25")) and \
                SPARSE_FIELD in (function.get("output_field_names") or []):
            return True
    return False


def is_connection_failure(exc: BaseException) -> bool:
    """The connection itself failed (server gone, restarted, channel broken), not the request."""
    text = str(exc).lower()
    return any(marker in text for marker in ("fail connecting", "connect", "no channel", "rpcerror", "unavailable:"))


# Milvus error codes (merr, 2.3+) that mean "not now": not ready, unavailable, memory/request/disk
# limits, rate limit, collection/partition/segment not loaded, channel or query node not available.
_TRANSIENT_CODES = frozenset({1, 2, 3, 4, 7, 8, 101, 103, 201, 503, 601, 602, 901, 902, 903, 904, 905})
_INPUT_CODES = frozenset({1100, 1101})  # ParameterInvalid, ParameterMissing
_REFUSED_TYPES = (ParamError, DataTypeNotMatchException, DataNotMatchException, DataTypeNotSupportException,
                  PrimaryKeyException, FieldTypeException, FieldsTypeException, AutoIDException)
_UNAVAILABLE_TYPES = (ConnectError, MilvusUnavailableException, ConnectionNotExistException)
_NOT_LOADED_MARKERS = ("not loaded", "state 'released'", "not fully loaded")
_UNAVAILABLE_MARKERS = ("unavailable", "deadline", "timeout", "connect", "not ready", "rate limit", "too many",
                        "node not match", "node not found", "recovering")
_REFUSED_MARKERS = ("exceed", "invalid", "illegal", "expected dim", "parse", "malformed", "too long",
                    "out of range", "filter", "expr")


def translate_milvus_error(exc: MilvusException) -> SemsearchError:
    """A typed error: transient (BackendUnavailableError, retried), refused (StoreRefusedError,
    INVALID_ARGUMENT, never retried) or unknown (StoreError, INTERNAL)."""
    message = str(exc.message)
    text = message.lower()
    code = getattr(exc, "code", None)
    if any(marker in text for marker in _NOT_LOADED_MARKERS) or code in (101, 103, 201, 601):
        return CollectionNotLoadedError(f"Milvus unavailable: {message}")
    if isinstance(exc, _REFUSED_TYPES) or code in _INPUT_CODES or getattr(exc, "is_input_error", False):
        return StoreRefusedError(f"Milvus refused the request: {message}")
    if (isinstance(exc, _UNAVAILABLE_TYPES) or code in _TRANSIENT_CODES or getattr(exc, "retriable", False)
            or any(marker in text for marker in _UNAVAILABLE_MARKERS)):
        return BackendUnavailableError(f"Milvus unavailable: {message}")
    if any(marker in text for marker in _REFUSED_MARKERS):
        return StoreRefusedError(f"Milvus refused the request: {message}")
    return StoreError(f"Milvus error: {message}")


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
