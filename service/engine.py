"""The search engine behind the gRPC API: encoding, storage and the serving (model, collection) pair.

Transport-free: the servicer converts protobuf messages to these types and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import structlog

from semsearch.chunking import reassemble
from semsearch.config import Settings
from semsearch.encoders import Encoder
from semsearch.errors import InvalidInputError, NotFoundError, RerankerNotConfiguredError, SemsearchError
from semsearch.filters import Condition, TenantFilter
from semsearch.fusion import MODES, Fusion, fuse, hybrid_candidates
from semsearch.ingest import Planner, rules_of
from semsearch.metrics import ENCODER_LATENCY
from semsearch.rerankers import Reranker
from semsearch.store import (
    MAX_SEARCH_LIMIT,
    ChunkRow,
    CollectionInfo,
    Hit,
    LexicalUnavailableError,
    MilvusStore,
    TenantsUnavailableError,
    no_tenants_reason,
)
from semsearch.tracing import span
from semsearch.tuning import TunedRetrieval, tuned_retrieval
from service.batching import EncodeBatcher, RerankBatcher, SearchBatcher, SearchJob, SearchSpec
from service.ordering import DocumentLocks

log = structlog.get_logger(__name__)


class PageTokenExpiredError(SemsearchError):
    """A page token issued by another serving (model, collection) pair: its offsets mean nothing here."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class SearchQuery:
    text: str
    top_k: int  # hits wanted (the page size when paging)
    filters: tuple[Condition, ...] = ()
    with_text: bool = True
    with_metadata: bool = True
    return_chunks: bool = False
    mode: str = ""  # "dense", "lexical", "hybrid"; "" = the `retrieval_mode` setting
    fusion: Fusion | None = None  # None = the fusion settings
    min_score: float | None = None  # hits scoring below it are dropped (the final score of each mode)
    tenant: str = ""  # '' = the default tenant
    offset: int = 0  # paging: hits of earlier pages, in the stable order (score desc, id, chunk)
    pinned: tuple[str, str] | None = None  # paging: the (model version, collection) of the first page
    paged: bool = False  # paging: find out whether hits beyond this page exist
    # Paging, hybrid: the depth the candidate pool is sized for, fixed by the first page (0: the
    # `max_page_depth` setting), so every page fuses the same pool and pages never repeat or skip.
    pool_depth: int = 0
    rerank: bool = False
    rerank_candidates: int = 0  # candidates retrieved for the reranker (validated: >= top_k)


@dataclass(frozen=True)
class Reranked:
    """What reranking says about one returned hit (its `score` is then the rerank score)."""

    retrieval_score: float
    retrieval_rank: int  # 1-based among the candidates
    rerank_score: float


@dataclass
class SearchResult:
    hits: list[Hit]
    model_version: str
    collection: str
    encode_ms: float
    store_ms: float
    total_ms: float
    mode: str = "dense"
    more: bool = False  # hits beyond these exist (paging)
    fusion: Fusion | None = None  # the fusion that ranked the hits (hybrid)
    retrieval_source: str = "default"  # where mode and fusion came from: request, tuned or default
    pool_depth: int = 0  # paging, hybrid: the depth the candidate pool was sized for
    rerank_ms: float = 0.0
    reranker_version: str = ""  # set when the hits were reranked
    reranked: list[Reranked] | None = None  # parallel to hits when reranked


@dataclass(frozen=True)
class DocumentInput:
    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tenant: str = ""


@dataclass(frozen=True)
class StoredDocument:
    doc_id: str
    text: str
    metadata: dict[str, Any]
    tenant: str = ""


@dataclass
class ServingPair:
    """The encoder and the collection its vectors match: swapped together, never apart."""

    encoder: Encoder
    batcher: EncodeBatcher
    collection: CollectionInfo
    planner: Planner  # the collection's text rules and the encoder's chunking
    in_flight: int = 0  # requests holding this pair; it is retired only at zero
    retrieval: TunedRetrieval | None = None  # the collection's tuned default mode and fusion, if tuned

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


@dataclass
class RerankStage:
    """The reranker and its micro-batcher: swapped as one reference, independently of the pair (a
    reranker needs no re-embedding); retired when no request holds it."""

    reranker: Reranker
    batcher: RerankBatcher
    in_flight: int = 0

    @property
    def version(self) -> str:
        return self.reranker.manifest.version

    @contextlib.contextmanager
    def held(self) -> Iterator[RerankStage]:
        self.in_flight += 1
        try:
            yield self
        finally:
            self.in_flight -= 1


def build_rerank_stage(settings: Settings, reranker: Reranker) -> RerankStage:
    batcher = RerankBatcher(reranker.score_pairs, max_batch=settings.rerank_microbatch_max_pairs,
                            max_wait_s=settings.rerank_microbatch_max_wait_ms / 1000.0,
                            queue_size=settings.microbatch_queue_size)
    return RerankStage(reranker=reranker, batcher=batcher)


def build_pair(settings: Settings, encoder: Encoder, store: MilvusStore, collection: str) -> ServingPair:
    info = store.ensure_collection(collection, encoder.manifest)
    batcher = EncodeBatcher(
        encoder.encode_queries, max_batch=settings.microbatch_max_size,
        max_wait_s=settings.microbatch_max_wait_ms / 1000.0, queue_size=settings.microbatch_queue_size,
    )
    planner = Planner(rules_of(info), encoder.count_tokens, encoder.manifest.max_tokens)
    pair = ServingPair(encoder=encoder, batcher=batcher, collection=info, planner=planner,
                       retrieval=collection_retrieval(store, info.name))
    if collection != info.name:
        log.info("collection_alias", name=collection, collection=info.name)
    if pair.retrieval is not None:
        log.info("tuned_retrieval", collection=info.name, retrieval=pair.retrieval.describe(),
                 tuned_at=pair.retrieval.tuned_at)
    return pair


# How often a running service re-reads its collection's tuned retrieval (a re-tune applies without a restart).
TUNING_POLL_S = 30.0


def collection_retrieval(store: MilvusStore, collection: str) -> TunedRetrieval | None:
    """The collection's tuned retrieval (`semsearch train tune-fusion`); a malformed record is logged and
    ignored (the server's defaults serve), never fatal."""
    try:
        return tuned_retrieval(store.collection_properties(collection))
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("tuned_retrieval_ignored", collection=collection, reason=str(exc))
        return None


class SearchEngine:
    def __init__(self, settings: Settings, store: MilvusStore, pair: ServingPair,
                 rerank: RerankStage | None = None) -> None:
        self.settings = settings
        self.store = store
        # Read once per request: a swap replaces this reference, in-flight requests keep theirs.
        self.pair = pair
        # The reranker (None: rerank requests get FAILED_PRECONDITION); swapped on its own.
        self.rerank = rerank
        # A promotion in progress: writes go to this pair too, so nothing is lost at the swap.
        self.pending_pair: ServingPair | None = None
        self.search_batcher = SearchBatcher(
            store, max_batch=settings.microbatch_max_size * 4, max_wait_s=0.0,
            queue_size=settings.microbatch_queue_size,
        )
        # Writes of one document id run one at a time (upsert vs delete must not interleave).
        self.document_locks = DocumentLocks()
        self._tuning_follower: asyncio.Task[None] | None = None
        # BM25 searches on their own worker: a hybrid query's lexical half overlaps its encoding.
        self.lexical_batcher = SearchBatcher(
            store, max_batch=settings.microbatch_max_size * 4, max_wait_s=0.0,
            queue_size=settings.microbatch_queue_size, name="store-lexical",
        )

    async def start(self) -> None:
        self.pair.batcher.start()
        if self.rerank is not None:
            self.rerank.batcher.start()
        self.search_batcher.start()
        self.lexical_batcher.start()
        self._tuning_follower = asyncio.create_task(self._follow_tuning(), name="tuning-follower")

    async def _follow_tuning(self) -> None:
        """Re-read the serving collection's tuned retrieval now and then: `tune-fusion` writes it while
        services run. A failed read keeps what the pair has."""
        while True:
            await asyncio.sleep(TUNING_POLL_S)
            pair = self.pair
            try:
                tuned = await asyncio.to_thread(collection_retrieval, self.store, pair.collection.name)
            except SemsearchError as exc:
                log.warning("tuned_retrieval_unread", collection=pair.collection.name, reason=str(exc))
                continue
            if tuned != pair.retrieval:
                log.info("tuned_retrieval", collection=pair.collection.name,
                         retrieval=tuned.describe() if tuned is not None else "untuned")
                pair.retrieval = tuned

    def swap(self, new: ServingPair) -> ServingPair:
        """Make `new` the serving pair in one reference change; returns the old one to retire."""
        new.batcher.start()
        old, self.pair = self.pair, new
        if self.pending_pair is new:
            self.pending_pair = None
        return old

    async def retire(self, old: ServingPair, timeout_s: float = 120.0) -> None:
        """Close a replaced pair once no request holds it (in-flight calls finish on it)."""
        deadline = time.monotonic() + timeout_s
        while old.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await old.batcher.close()
        pending = self.pending_pair
        if old.encoder is not self.pair.encoder and (pending is None or old.encoder is not pending.encoder):
            old.encoder.close()

    def swap_reranker(self, new: RerankStage | None) -> RerankStage | None:
        """Make `new` the reranker in one reference change; returns the old one to retire."""
        if new is not None:
            new.batcher.start()
        old, self.rerank = self.rerank, new
        return old

    async def retire_reranker(self, old: RerankStage, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while old.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await old.batcher.close()
        old.reranker.close()

    async def warm_up(self) -> None:
        """One real encode and search, so the first user call pays no lazy initialization."""
        await self.search([SearchQuery(text="预热", top_k=1, mode="dense")])
        if self.pair.collection.lexical:  # loads the analyzer (jieba's dictionary) before any user call
            await self.search([SearchQuery(text="预热", top_k=1, mode="lexical")])
        if self.rerank is not None:
            await self.rerank.batcher.score([("预热", "预热")])

    def resolve_mode(self, pair: ServingPair, mode: str) -> str:
        """The mode a query runs in; FAILED_PRECONDITION when it needs a BM25 field that is absent."""
        if not mode:
            # The default follows the collection: its tuned mode, else hybrid ("auto"); one without a
            # BM25 field keeps serving dense.
            mode = self.settings.retrieval_mode
            if mode == "auto":
                mode = pair.retrieval.mode if pair.retrieval is not None else "hybrid"
            mode = mode if pair.collection.lexical else "dense"
        if mode not in MODES:
            raise InvalidInputError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        if mode != "dense" and not pair.collection.lexical:
            raise LexicalUnavailableError(self._no_lexical_reason(pair, mode))
        return mode

    def _no_lexical_reason(self, pair: ServingPair, mode: str) -> str:
        capabilities = self.store.capabilities()
        if not capabilities.bm25:
            return (f"{mode} retrieval needs BM25 full-text search, which this Milvus server "
                    f"({capabilities.server_version}) does not have (Milvus Lite or Milvus >= 2.5 has it); "
                    "dense retrieval works")
        return (f"collection {pair.collection.name!r} has no BM25 field (it was created before lexical "
                "retrieval or with lexical_analyzer=none); dense retrieval works. To upgrade it, re-create "
                "it with the current schema: `semsearch promote <the same model> --collection <name> --force`")

    async def search(self, queries: Sequence[SearchQuery], timeout_s: float | None = None) -> list[SearchResult]:
        stage = self.rerank
        if stage is None and any(query.rerank for query in queries):
            raise RerankerNotConfiguredError(
                "rerank was requested, but this service has no reranker: set reranker_model "
                "(and reranker_url for a rerank server), or promote one with `semsearch promote --reranker DIR`")
        if stage is None or not any(query.rerank for query in queries):
            with self.pair.held() as pair:
                return await self._search(pair, queries, timeout_s)
        started = time.perf_counter()
        with self.pair.held() as pair, stage.held():
            # Retrieve the candidates (with their text: it is what the cross-encoder reads).
            # A threshold applies to the final (rerank) score: not pushed down to retrieval.
            retrieval = [dataclasses.replace(q, top_k=q.rerank_candidates, with_text=True, min_score=None)
                         if q.rerank else q for q in queries]
            results = await self._search(pair, retrieval, timeout_s)
            remaining = None if timeout_s is None else max(0.05, timeout_s - (time.perf_counter() - started))
            await asyncio.gather(*(self._rerank(stage, query, pair.planner.normalize(query.text), result, remaining)
                                   for query, result in zip(queries, results, strict=True) if query.rerank))
        return results

    @staticmethod
    async def _rerank(stage: RerankStage, query: SearchQuery, text: str, result: SearchResult,
                      timeout_s: float | None) -> None:
        """Order `result`'s candidates by the reranker and keep the top_k (in place)."""
        started = time.perf_counter()
        candidates = result.hits
        with span("semsearch.rerank", pairs=len(candidates), reranker_version=stage.version):
            scores = await stage.batcher.score([(text, hit.text) for hit in candidates], timeout_s)
        order = sorted(range(len(candidates)),
                       key=lambda i: (-scores[i], candidates[i].doc_id, candidates[i].chunk_index))
        if query.min_score is not None:
            order = [i for i in order if scores[i] >= query.min_score]
        order = order[: query.top_k]
        result.hits = [dataclasses.replace(candidates[i], score=scores[i],
                                           text=candidates[i].text if query.with_text else "")
                       for i in order]
        result.reranked = [Reranked(retrieval_score=candidates[i].score, retrieval_rank=i + 1,
                                    rerank_score=scores[i]) for i in order]
        result.rerank_ms = (time.perf_counter() - started) * 1e3
        result.total_ms += result.rerank_ms
        result.reranker_version = stage.version

    async def _search(self, pair: ServingPair, queries: Sequence[SearchQuery],
                      timeout_s: float | None) -> list[SearchResult]:
        started = time.perf_counter()
        # Queries are normalised by the collection's rules, as its documents were.
        queries = [dataclasses.replace(q, text=pair.planner.normalize(q.text), filters=q.filters
                                       + self.tenant_filter(pair, q.tenant)) for q in queries]
        for query in queries:
            if query.pinned is not None and not pair.same_as(*query.pinned):
                raise PageTokenExpiredError(
                    "page_token was issued before the serving model or collection changed "
                    f"(now {pair.model_version}, {pair.collection.name}): search again from the first page"
                )
        modes = [self.resolve_mode(pair, query.mode) for query in queries]
        dense = [i for i, mode in enumerate(modes) if mode != "lexical"]
        vectors: dict[int, np.ndarray] = {}
        groups = self._search_groups(pair, queries, modes)
        rankings: list[dict[str, list[Hit]]] = [{} for _ in queries]
        store_ms: list[float] = [0.0] * len(queries)

        async def run_group(spec: SearchSpec, indices: list[int]) -> None:
            group_started = time.perf_counter()
            remaining = None if timeout_s is None else max(0.05, timeout_s - (time.perf_counter() - started))
            lexical = spec.retriever == "lexical"
            job = SearchJob(spec, vectors=None if lexical else np.asarray([vectors[i] for i in indices]),
                            texts=tuple(queries[i].text for i in indices) if lexical else ())
            batcher = self.lexical_batcher if lexical else self.search_batcher
            with span("semsearch.search", collection=spec.collection, queries=len(indices), top_k=spec.top_k,
                      retriever=spec.retriever):
                results = await batcher.submit(job, remaining)
            elapsed = (time.perf_counter() - group_started) * 1e3
            for i, hits in zip(indices, results, strict=True):
                rankings[i][spec.retriever] = hits
                store_ms[i] = max(store_ms[i], elapsed)

        # Lexical searches need no vector: they run while the encoder works (their own worker).
        lexical = [asyncio.ensure_future(run_group(spec, indices)) for spec, indices in groups.items()
                   if spec.retriever == "lexical"]
        try:
            if dense:  # lexical-only requests never wait for the encoder
                with span("semsearch.encode", queries=len(dense), model_version=pair.model_version):
                    encoded = await pair.batcher.encode([queries[i].text for i in dense], timeout_s)
                vectors = {i: encoded[row] for row, i in enumerate(dense)}
            encode_ms = (time.perf_counter() - started) * 1e3
            await asyncio.gather(*lexical, *(run_group(spec, indices) for spec, indices in groups.items()
                                             if spec.retriever == "dense"))
        finally:
            for task in lexical:  # an encoder failure must not leave searches behind
                task.cancel()
        total_ms = (time.perf_counter() - started) * 1e3
        results = []
        for i, (query, mode) in enumerate(zip(queries, modes, strict=True)):
            depth = self.depth(query)
            fusion = self.fusion_for(pair, query) if mode == "hybrid" else None
            if fusion is not None:
                hits = fuse(rankings[i], fusion, depth, per_document=not query.return_chunks)
                if query.min_score is not None:
                    hits = [hit for hit in hits if hit.score >= query.min_score]
            else:
                hits = rankings[i][mode]
            # One stable order for paging: ties in score broken by id, then chunk.
            hits = sorted(hits, key=lambda h: (-h.score, h.doc_id, h.chunk_index))
            results.append(SearchResult(
                hits=hits[query.offset : query.offset + query.top_k], model_version=pair.model_version,
                collection=pair.collection.name, encode_ms=encode_ms, store_ms=store_ms[i], total_ms=total_ms,
                mode=mode, more=len(hits) > query.offset + query.top_k, fusion=fusion,
                retrieval_source=self.retrieval_source(pair, query, mode),
                pool_depth=self.pool_depth(query) if query.paged and fusion is not None else 0,
            ))
        await asyncio.gather(*(self._fill_page_fields(pair, query, result)
                               for query, result in zip(queries, results, strict=True)
                               if query.paged and result.mode == "hybrid"))
        return results

    def _search_groups(self, pair: ServingPair, queries: Sequence[SearchQuery],
                       modes: Sequence[str]) -> dict[SearchSpec, list[int]]:
        """Query indices by Milvus call: one retriever's queries with the same spec share one."""
        groups: dict[SearchSpec, list[int]] = {}
        for i, (query, mode) in enumerate(zip(queries, modes, strict=True)):
            hybrid = mode == "hybrid"
            # Hybrid fuses up to `limit` documents per retriever; `pool_depth` of them suffice.
            limit = hybrid_candidates(self.pool_depth(query)) if hybrid else self.depth(query)
            # A paged hybrid pool is deep: ids and scores only; the page's text and metadata follow.
            slim = hybrid and query.paged
            fields = tuple(name for name, wanted in (("text", query.with_text), ("metadata", query.with_metadata))
                           if wanted and not slim)
            for retriever in (("dense", "lexical") if hybrid else (mode,)):
                spec = SearchSpec(
                    collection=pair.collection.name, retriever=retriever, top_k=limit, filters=query.filters,
                    fields=fields, per_document=not query.return_chunks,
                    # A threshold on a fused score cannot be pushed down to one retriever.
                    min_score=None if hybrid else query.min_score,
                    documents_needed=self.pool_depth(query) if hybrid else None)
                groups.setdefault(spec, []).append(i)
        return groups

    async def _fill_page_fields(self, pair: ServingPair, query: SearchQuery, result: SearchResult) -> None:
        """The text and metadata of a page whose candidates were fetched without them (in place)."""
        fields = [name for name, wanted in (("text", query.with_text), ("metadata", query.with_metadata)) if wanted]
        if not result.hits or not fields:
            return
        rows = await asyncio.to_thread(self.store.document_rows, pair.collection.name,
                                       sorted({hit.doc_id for hit in result.hits}), fields, tenant=query.tenant)
        stored = {(str(row["doc_id"]), int(row["chunk_index"])): row for row in rows}
        result.hits = [dataclasses.replace(hit, text=str(row.get("text", "")), metadata=dict(row.get("metadata") or {}))
                       if (row := stored.get((hit.doc_id, hit.chunk_index))) is not None else hit
                       for hit in result.hits]

    def fusion_for(self, pair: ServingPair, query: SearchQuery) -> Fusion:
        """A hybrid query's fusion: the request's, else the collection's tuned one, else the fusion
        settings (by default the safest measured one, SAFE_FUSION)."""
        if query.fusion is not None:
            return query.fusion
        if pair.retrieval is not None and pair.retrieval.mode == "hybrid":
            return pair.retrieval.fusion
        return Fusion.from_settings(self.settings)

    def retrieval_source(self, pair: ServingPair, query: SearchQuery, mode: str) -> str:
        """Where the mode and fusion that served `query` came from: request, tuned or default."""
        tuned = pair.retrieval
        if not query.mode and tuned is not None and self.settings.retrieval_mode == "auto":
            return "tuned" if mode == tuned.mode else "default"
        if mode == "hybrid" and query.fusion is None:
            return "tuned" if tuned is not None and tuned.mode == "hybrid" else "default"
        return "request" if query.mode else "default"

    @staticmethod
    def depth(query: SearchQuery) -> int:
        """Hits to fetch: those of earlier pages, this page, and one to tell whether more follow."""
        if not query.paged:
            return query.top_k
        return min(query.offset + query.top_k + 1, MAX_SEARCH_LIMIT)

    def pool_depth(self, query: SearchQuery) -> int:
        """The depth a hybrid query's candidate pool is sized for. Pages fuse one pool, sized for the
        deepest page (`max_page_depth`, or what their first page's token says): a pool growing with
        the page would change the fused scores between pages (hits repeated, others skipped). So the
        pages equal one request of `top_k` = that depth."""
        if not query.paged:
            return query.top_k
        return query.pool_depth or self.settings.max_page_depth

    def tenant_filter(self, pair: ServingPair, tenant: str) -> tuple[Condition, ...]:
        """The condition that keeps a request inside its tenant; FAILED_PRECONDITION for a tenant
        other than the default one on a collection made before tenants existed."""
        if pair.collection.tenants:
            return (TenantFilter(tenant),)
        if tenant:
            raise TenantsUnavailableError(no_tenants_reason(pair.collection.name))
        return ()

    async def upsert(
        self, documents: Sequence[DocumentInput], timeout_s: float | None = None
    ) -> tuple[int, ServingPair]:
        async with self.document_locks.hold(doc.doc_id for doc in documents):
            return await self._upsert(documents, timeout_s)

    async def _upsert(
        self, documents: Sequence[DocumentInput], timeout_s: float | None
    ) -> tuple[int, ServingPair]:
        with self.pair.held() as pair:
            for tenant in {d.tenant for d in documents}:  # refused before any encoding
                self.tenant_filter(pair, tenant)
            pending = self.pending_pair
            for target in (pair, pending):
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

        rows = pair.planner.embed([(d.doc_id, d.text, d.metadata) for d in documents], encode)
        tenants = {d.doc_id: d.tenant for d in documents}
        return [dataclasses.replace(row, tenant=tenants[row.doc_id]) for row in rows]

    async def delete(self, doc_ids: Sequence[str], tenant: str = "", *, dry_run: bool = False) -> int:
        async with self.document_locks.hold(doc_ids):
            with self.pair.held() as pair:
                self.tenant_filter(pair, tenant)
                pending = self.pending_pair
                deleted = await asyncio.to_thread(self.store.delete_documents, pair.collection.name, doc_ids, tenant,
                                                  dry_run=dry_run)
                if pending is not None and not dry_run:
                    await asyncio.to_thread(self.store.delete_documents, pending.collection.name, doc_ids, tenant)
                return deleted

    async def delete_matching(self, conditions: Sequence[Condition], tenant: str, *, dry_run: bool) -> int:
        """Delete (or with dry_run count) the tenant's documents matching typed conditions, in the
        serving collection and, during a promotion, its candidate too; returns the serving count."""
        with self.pair.held() as pair:
            where = (*conditions, *self.tenant_filter(pair, tenant))
            pending = self.pending_pair
            matched = await asyncio.to_thread(self.store.delete_matching, pair.collection.name, where, dry_run=dry_run)
            if pending is not None and not dry_run:
                pending_where = (*conditions, *self.tenant_filter(pending, tenant))
                await asyncio.to_thread(self.store.delete_matching, pending.collection.name, pending_where)
            return matched

    async def get(self, doc_id: str, tenant: str = "") -> tuple[StoredDocument, str]:
        pair = self.pair  # reads need no model: no hold
        collection = pair.collection.name
        self.tenant_filter(pair, tenant)
        rows = whole_version(await asyncio.to_thread(self.store.document_rows, collection, [doc_id], tenant=tenant))
        if not rows:
            raise NotFoundError(f"document {doc_id!r} not found")
        text = reassemble([(int(row["char_offset"]), str(row["text"])) for row in rows])
        return StoredDocument(doc_id=doc_id, text=text, metadata=dict(rows[0].get("metadata") or {}),
                              tenant=tenant), collection

    async def close(self) -> None:
        if self._tuning_follower is not None:
            self._tuning_follower.cancel()
        if self.rerank is not None:
            await self.rerank.batcher.close()
            self.rerank.reranker.close()
        await self.search_batcher.close()
        await self.lexical_batcher.close()
        await self.pair.batcher.close()
        if self.pending_pair is not None:
            await self.pending_pair.batcher.close()
            self.pending_pair.encoder.close()


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


def check_unique_ids(ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for doc_id in ids:
        if doc_id in seen:
            raise InvalidInputError(f"document id {doc_id!r} appears twice in one request")
        seen.add(doc_id)
