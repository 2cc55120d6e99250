"""Micro-batching: concurrent Search calls share one encoder forward pass and one Milvus search call.

Two stages, each a `MicroBatcher`: callers submit work and await their own result; one worker per
stage takes whatever is queued (up to `max_batch` units, waiting at most `max_wait_s` for more once
one arrives), processes it in a thread, and resolves each caller's future. While a stage is busy,
new work queues up, so batches grow exactly when the service is loaded. A full queue answers at
once with OverloadedError. Callers that gave up (cancelled, deadline passed) cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import structlog

from semsearch.errors import OverloadedError
from semsearch.filters import Condition
from semsearch.metrics import (
    ENCODER_BATCH_SIZE,
    ENCODER_LATENCY,
    ENCODER_QUEUE_DEPTH,
    ENCODER_QUEUE_WAIT,
    RERANK_BATCH_SIZE,
    RERANK_LATENCY,
)
from semsearch.store import Hit, MilvusStore

log = structlog.get_logger(__name__)

P = TypeVar("P")
R = TypeVar("R")


@dataclass
class _Pending(Generic[P, R]):
    payload: P
    weight: int
    future: asyncio.Future[R]
    deadline: float | None  # time.monotonic() by which the caller gives up
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    batches: int = 0
    units: int = 0
    max_batch_seen: int = 0

    @property
    def mean_batch(self) -> float:
        return self.units / self.batches if self.batches else 0.0


class MicroBatcher(Generic[P, R]):
    """`process(payloads, timeout_s) -> results` (one per payload) runs on one worker thread."""

    def __init__(
        self, process: Callable[[list[P], float | None], list[R]], *, weight: Callable[[P], int] = lambda _: 1,
        max_batch: int = 32, max_wait_s: float = 0.002, queue_size: int = 1024, name: str = "batcher",
        on_batch: Callable[[list[_Pending[P, R]], int], None] | None = None,
    ) -> None:
        self._process = process
        self._weight = weight
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[P, R]] = asyncio.Queue(maxsize=queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._worker: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, payload: P, timeout_s: float | None = None) -> R:
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending: _Pending[P, R] = _Pending(payload, self._weight(payload), loop.create_future(), deadline)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise OverloadedError(f"{self.name} queue is full; retry with backoff") from None
        return await pending.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            size = first.weight
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(
                        self._queue.get(), timeout
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                batch.append(item)
                size += item.weight
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            units = sum(p.weight for p in live)
            if self._on_batch is not None:
                self._on_batch(live, self._queue.qsize())
            # The batch may run as long as its most patient caller waits; others leave on their own.
            deadlines = [p.deadline for p in live if p.deadline is not None]
            timeout_s = None if len(deadlines) < len(live) else max(0.0, max(deadlines) - time.monotonic())
            call = functools.partial(self._process, [p.payload for p in live], timeout_s)
            try:
                results = await loop.run_in_executor(self._executor, call)
            except Exception as exc:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.units += units
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, units)
            for p, result in zip(live, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(OverloadedError("service is shutting down"))
        self._executor.shutdown(wait=True)


class EncodeBatcher(MicroBatcher[list[str], np.ndarray]):
    """Stage 1: query texts of concurrent calls in one forward pass (units: texts)."""

    def __init__(self, encode_queries: Callable[..., np.ndarray], **options: Any) -> None:
        def process(payloads: list[list[str]], timeout_s: float | None) -> list[np.ndarray]:
            with ENCODER_LATENCY.labels(kind="query").time():
                vectors = encode_queries([text for texts in payloads for text in texts], timeout_s=timeout_s)
            bounds = np.cumsum([0, *(len(texts) for texts in payloads)])
            return [vectors[start:end] for start, end in itertools.pairwise(bounds)]

        def observe(batch: list[_Pending[list[str], np.ndarray]], depth: int) -> None:
            now = time.perf_counter()
            for p in batch:
                ENCODER_QUEUE_WAIT.observe(now - p.enqueued_at)
            ENCODER_BATCH_SIZE.observe(sum(p.weight for p in batch))
            ENCODER_QUEUE_DEPTH.set(depth)

        super().__init__(process, weight=len, name="encoder", on_batch=observe, **options)

    async def encode(self, texts: Sequence[str], timeout_s: float | None = None) -> np.ndarray:
        return await self.submit(list(texts), timeout_s)


@dataclass(frozen=True)
class SearchSpec:
    """What one Milvus search call is, apart from its queries: queries with equal specs share a call
    (the engine groups a request's queries by it, the batcher concurrent requests' jobs)."""

    collection: str
    retriever: str  # "dense" (vectors) or "lexical" (BM25 over chunk text)
    top_k: int
    filters: tuple[Condition, ...]
    fields: tuple[str, ...]
    per_document: bool = False
    min_score: float | None = None
    # per_document: fewer than top_k documents suffice (a hybrid pool needs only its own depth).
    documents_needed: int | None = None


@dataclass(frozen=True)
class SearchJob:
    """One caller's queries for one search spec: `vectors` (dense) or `texts` (lexical)."""

    spec: SearchSpec
    vectors: np.ndarray | None = None
    texts: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.texts) if self.vectors is None else len(self.vectors)


class SearchBatcher(MicroBatcher[SearchJob, list[list[Hit]]]):
    """Stage 2: jobs with the same collection, retriever, limit, filters and fields share one Milvus call."""

    def __init__(self, store: MilvusStore, **options: Any) -> None:
        def process(jobs: list[SearchJob], timeout_s: float | None) -> list[list[list[Hit]]]:
            results: list[list[list[Hit]]] = [[] for _ in jobs]
            groups: dict[SearchSpec, list[int]] = {}
            for i, job in enumerate(jobs):
                groups.setdefault(job.spec, []).append(i)
            for spec, indices in groups.items():
                lexical = spec.retriever == "lexical"
                hits = store.search(
                    spec.collection, None if lexical else np.concatenate([jobs[i].vectors for i in indices]),
                    texts=[text for i in indices for text in jobs[i].texts] if lexical else None,
                    top_k=spec.top_k, filters=spec.filters, output_fields=spec.fields, timeout_s=timeout_s,
                    per_document=spec.per_document, min_score=spec.min_score, enough=spec.documents_needed)
                offset = 0
                for i in indices:
                    count = jobs[i].size
                    results[i] = hits[offset : offset + count]
                    offset += count
            return results

        options.setdefault("name", "store-search")
        super().__init__(process, weight=lambda job: job.size, **options)


class RerankBatcher(MicroBatcher[list[tuple[str, str]], list[float]]):
    """(query, passage) pairs of concurrent reranked searches in one cross-encoder pass (units: pairs)."""

    def __init__(self, score_pairs: Callable[..., list[float]], **options: Any) -> None:
        def process(payloads: list[list[tuple[str, str]]], timeout_s: float | None) -> list[list[float]]:
            with RERANK_LATENCY.time():
                scores = score_pairs([pair for pairs in payloads for pair in pairs], timeout_s=timeout_s)
            bounds = np.cumsum([0, *(len(pairs) for pairs in payloads)])
            return [list(scores[start:end]) for start, end in itertools.pairwise(bounds)]

        def observe(batch: list[_Pending[list[tuple[str, str]], list[float]]], depth: int) -> None:
            RERANK_BATCH_SIZE.observe(sum(p.weight for p in batch))

        options.setdefault("name", "reranker")
        super().__init__(process, weight=len, on_batch=observe, **options)

    async def score(self, pairs: Sequence[tuple[str, str]], timeout_s: float | None = None) -> list[float]:
        return await self.submit(list(pairs), timeout_s)
