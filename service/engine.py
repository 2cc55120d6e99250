"""The search engine behind the gRPC API: encoding, storage and the serving (model, collection) pair.

Transport-free: the servicer converts protobuf messages to these types and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from semsearch.chunking import reassemble
from semsearch.config import Settings
from semsearch.encoders import Encoder
from semsearch.errors import InvalidInputError, NotFoundError
from semsearch.filters import MetadataFilter
from semsearch.ingest import Planner, rules_of
from semsearch.metrics import ENCODER_LATENCY
from semsearch.store import ChunkRow, CollectionInfo, Hit, MilvusStore
from semsearch.tracing import span
from service.batching import EncodeBatcher, SearchBatcher, SearchJob
from service.ordering import DocumentLocks

log = structlog.get_logger(__name__)

# When returning one hit per document, fetch more chunks than asked so that documents with
# several matching chunks still fill top_k.
DOCUMENT_OVERSAMPLE = 3


@dataclass(frozen=True)
class SearchQuery:
    text: str
    top_k: int
    filters: tuple[MetadataFilter, ...] = ()
    with_text: bool = True
    with_metadata: bool = True
    return_chunks: bool = False


@dataclass
class SearchResult:
    hits: list[Hit]
    model_version: str
    collection: str
    encode_ms: float
    store_ms: float
    total_ms: float


@dataclass(frozen=True)
class DocumentInput:
    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredDocument:
    doc_id: str
    text: str
    metadata: dict[str, Any]


@dataclass
class ServingPair:
    """The encoder and the collection its vectors match: swapped together, never apart."""

    encoder: Encoder
    batcher: EncodeBatcher
    collection: CollectionInfo
    planner: Planner  # the collection's text rules and the encoder's chunking
    in_flight: int = 0  # requests holding this pair; it is retired only at zero

    @property
    def model_version(self) -> str:
        return self.encoder.manifest.version

    def same_as(self, model_version: str, collection: str) -> bool:
        return (self.model_version, self.collection.name) == (model_version, collection)

    @contextlib.contextmanager
    def held(self) -> Iterator[ServingPair]:
        self.in_flight += 1
        try:
            yield self
        finally:
            self.in_flight -= 1


def build_pair(settings: Settings, encoder: Encoder, store: MilvusStore, collection: str) -> ServingPair:
    info = store.ensure_collection(collection, encoder.manifest)
    batcher = EncodeBatcher(
        encoder.encode_queries, max_batch=settings.microbatch_max_size,
        max_wait_s=settings.microbatch_max_wait_ms / 1000.0, queue_size=settings.microbatch_queue_size,
    )
    planner = Planner(rules_of(info), encoder.count_tokens, encoder.manifest.max_tokens)
    pair = ServingPair(encoder=encoder, batcher=batcher, collection=info, planner=planner)
    if collection != info.name:
        log.info("collection_alias", name=collection, collection=info.name)
    return pair


class SearchEngine:
    def __init__(self, settings: Settings, store: MilvusStore, pair: ServingPair) -> None:
        self.settings = settings
        self.store = store
        # Read once per request: a swap replaces this reference, in-flight requests keep theirs.
        self.pair = pair
        # A promotion in progress: writes go to this pair too, so nothing is lost at the swap.
        self.shadow: ServingPair | None = None
        self.search_batcher = SearchBatcher(
            store, max_batch=settings.microbatch_max_size * 4, max_wait_s=0.0,
            queue_size=settings.microbatch_queue_size,
        )
        # Writes of one document id run one at a time (upsert vs delete must not interleave).
        self.document_locks = DocumentLocks()

    async def start(self) -> None:
        self.pair.batcher.start()
        self.search_batcher.start()

    def swap(self, new: ServingPair) -> ServingPair:
        """Make `new` the serving pair in one reference change; returns the old one to retire."""
        new.batcher.start()
        old, self.pair = self.pair, new
        if self.shadow is new:
            self.shadow = None
        return old

    async def retire(self, old: ServingPair, timeout_s: float = 120.0) -> None:
        """Close a replaced pair once no request holds it (in-flight calls finish on it)."""
        deadline = time.monotonic() + timeout_s
        while old.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await old.batcher.close()
        if old.encoder is not self.pair.encoder and (self.shadow is None or old.encoder is not self.shadow.encoder):
            old.encoder.close()

    async def warm_up(self) -> None:
        """One real encode and search, so the first user call pays no lazy initialization."""
        await self.search([SearchQuery(text="预热", top_k=1)])

    async def search(self, queries: Sequence[SearchQuery], timeout_s: float | None = None) -> list[SearchResult]:
        with self.pair.held() as pair:
            return await self._search(pair, queries, timeout_s)

    async def _search(self, pair: ServingPair, queries: Sequence[SearchQuery],
                      timeout_s: float | None) -> list[SearchResult]:
        started = time.perf_counter()
        with span("semsearch.encode", queries=len(queries), model_version=pair.model_version):
            # Queries are normalised by the collection's rules, as its documents were.
            vectors = await pair.batcher.encode([pair.planner.normalize(q.text) for q in queries], timeout_s)
        encoded = time.perf_counter()
        encode_ms = (encoded - started) * 1e3
        # Queries with the same filters and limits share one Milvus call.
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, query in enumerate(queries):
            key = (query.filters, query.top_k, query.return_chunks, query.with_text, query.with_metadata)
            groups.setdefault(key, []).append(i)
        hits_per_query: list[list[Hit]] = [[] for _ in queries]
        store_ms: list[float] = [0.0] * len(queries)

        async def run_group(indices: list[int]) -> None:
            first = queries[indices[0]]
            limit = first.top_k if first.return_chunks else first.top_k * DOCUMENT_OVERSAMPLE
            fields = [name for name, wanted in (("text", first.with_text), ("metadata", first.with_metadata))
                      if wanted]
            group_started = time.perf_counter()
            remaining = None if timeout_s is None else max(0.05, timeout_s - (time.perf_counter() - started))
            with span("semsearch.search", collection=pair.collection.name, queries=len(indices), top_k=limit):
                results = await self.search_batcher.submit(SearchJob(
                    collection=pair.collection.name, vectors=np.asarray(vectors[indices]), top_k=limit,
                    filters=first.filters, fields=tuple(fields),
                ), remaining)
            elapsed = (time.perf_counter() - group_started) * 1e3
            for i, hits in zip(indices, results, strict=True):
                hits_per_query[i] = hits if first.return_chunks else best_chunk_per_document(hits, first.top_k)
                store_ms[i] = elapsed

        await asyncio.gather(*(run_group(indices) for indices in groups.values()))
        total_ms = (time.perf_counter() - started) * 1e3
        return [
            SearchResult(hits=hits_per_query[i], model_version=pair.model_version,
                         collection=pair.collection.name, encode_ms=encode_ms, store_ms=store_ms[i],
                         total_ms=total_ms)
            for i in range(len(queries))
        ]

    async def upsert(
        self, documents: Sequence[DocumentInput], timeout_s: float | None = None
    ) -> tuple[int, ServingPair]:
        async with self.document_locks.hold(doc.doc_id for doc in documents):
            return await self._upsert(documents, timeout_s)

    async def _upsert(
        self, documents: Sequence[DocumentInput], timeout_s: float | None
    ) -> tuple[int, ServingPair]:
        with self.pair.held() as pair:
            shadow = self.shadow
            for target in (pair, shadow):
                if target is None:
                    continue
                rows = await asyncio.to_thread(self._embed_documents, target, documents, timeout_s)
                await asyncio.to_thread(self.store.write_documents, target.collection.name, rows)
            return len(documents), pair

    def _embed_documents(self, pair: ServingPair, documents: Sequence[DocumentInput],
                         timeout_s: float | None = None) -> list[ChunkRow]:
        def encode(texts: list[str]) -> np.ndarray:
            with ENCODER_LATENCY.labels(kind="document").time():
                return pair.encoder.encode_documents(texts, timeout_s=timeout_s)

        return pair.planner.embed([(d.doc_id, d.text, d.metadata) for d in documents], encode)

    async def delete(self, doc_ids: Sequence[str]) -> int:
        async with self.document_locks.hold(doc_ids):
            with self.pair.held() as pair:
                shadow = self.shadow
                deleted = await asyncio.to_thread(self.store.delete_documents, pair.collection.name, doc_ids)
                if shadow is not None:
                    await asyncio.to_thread(self.store.delete_documents, shadow.collection.name, doc_ids)
                return deleted

    async def get(self, doc_id: str) -> tuple[StoredDocument, str]:
        collection = self.pair.collection.name  # reads need no model: no hold
        rows = whole_version(await asyncio.to_thread(self.store.document_rows, collection, [doc_id]))
        if not rows:
            raise NotFoundError(f"document {doc_id!r} not found")
        text = reassemble([(int(row["char_offset"]), str(row["text"])) for row in rows])
        return StoredDocument(doc_id=doc_id, text=text, metadata=dict(rows[0].get("metadata") or {})), collection

    async def close(self) -> None:
        await self.search_batcher.close()
        await self.pair.batcher.close()
        if self.shadow is not None:
            await self.shadow.batcher.close()
            self.shadow.encoder.close()


def whole_version(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks 0, 1, 2... of the version chunk 0 belongs to (rows sorted by chunk index).

    A reader racing a writer of another process may see a mix of two versions for a moment;
    it returns one version's prefix rather than a blend (no chunk 0: no document)."""
    if not rows or int(rows[0]["chunk_index"]) != 0:
        return []
    version = rows[0].get("content_hash")
    whole: list[dict[str, Any]] = []
    for expected, row in enumerate(rows):
        if int(row["chunk_index"]) != expected or row.get("content_hash") != version:
            break
        whole.append(row)
    return whole


def best_chunk_per_document(hits: Sequence[Hit], top_k: int) -> list[Hit]:
    seen: set[str] = set()
    best: list[Hit] = []
    for hit in hits:  # already sorted by score, best first
        if hit.doc_id in seen:
            continue
        seen.add(hit.doc_id)
        best.append(hit)
        if len(best) == top_k:
            break
    return best


def check_unique_ids(ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for doc_id in ids:
        if doc_id in seen:
            raise InvalidInputError(f"document id {doc_id!r} appears twice in one request")
        seen.add(doc_id)
