"""The indexing pipeline: read+chunk → plan → encode → write → checkpoint, one thread per stage.

Stages hand batches over bounded queues, so memory stays flat however large the input is, and
the encoder keeps working while Milvus writes the previous batch. Batches flow in input order,
which is what lets the checkpoint be a single position: "everything before here is durable".

    reader        parse, validate, dedupe, shard, chunk; groups documents into batches of about
                  `batch_chunks` chunks (the encoder sorts each batch by length)
    planner       asks Milvus what is stored: unchanged documents are skipped, stale chunks found
    encoder       one encode_documents call per batch (length-sorted mini-batches inside)
    writer        upserts rows (whole documents per request), deletes stale chunks; retries
                  while Milvus is down, isolates rows Milvus refuses
    checkpointer  every `checkpoint_interval` s: flush (Milvus makes acknowledged writes
                  durable), then commits the position, ids and totals to the job state
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog

from indexer.checkpoint import JobState, Progress
from indexer.sources import FieldMap, Limits, Position, Reject, SourceDoc, SourceFile, read_all, shard_of
from semsearch.chunking import Chunk
from semsearch.encoders.base import Encoder
from semsearch.errors import CollectionNotLoadedError, StoreRefusedError, retryable
from semsearch.ingest import IngestError, PlannedDocument, Planner, chunk_texts, rows_of
from semsearch.retry import retry_call
from semsearch.store import ChunkRow, MilvusStore, chunk_row_id

log = structlog.get_logger(__name__)

T = TypeVar("T")
PLAN_QUERY_IDS = 2048  # primary keys per "what is stored" lookup
PLAN_QUERY_DOCS = 256  # documents per doc_id filter query
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # one upsert call; Milvus' default gRPC limit is 64 MiB
KEEPALIVE_S = 5.0
MAX_CHUNK_BYTES = 65535  # the text field's VARCHAR limit (Milvus Lite does not even check it)


class StrictModeError(Exception):
    def __init__(self, reject: Reject) -> None:
        super().__init__(f"{reject.file}:{reject.line}: {reject.reason}")
        self.reject = reject


class Interrupted(Exception):
    """The job was asked to stop (Ctrl-C, SIGTERM); what was durable is checkpointed."""


class _Abort(Exception):
    pass


@dataclass
class PlannedDoc:
    doc: SourceDoc
    document: PlannedDocument  # normalised and chunked by the collection's rules (semsearch/ingest.py)
    stale: list[str] = field(default_factory=list)  # row ids past the document's new last chunk

    @property
    def chunks(self) -> list[Chunk]:
        return self.document.chunks

    @property
    def content_hash(self) -> str:
        return self.document.content_hash


@dataclass
class Batch:
    end: Position
    docs: list[PlannedDoc] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    chunk_total: int = 0
    to_write: list[PlannedDoc] = field(default_factory=list)
    vectors: np.ndarray | None = None


@dataclass
class Acked:
    """A batch Milvus acknowledged: what its checkpoint needs, texts and vectors dropped."""

    end: Position
    seen: list[tuple[str, int, int, int]]
    rejects: list[Reject]
    counts: Counter[str]
    wrote: bool  # upserted or deleted rows (else there is nothing to flush)


@dataclass(frozen=True)
class PipelineConfig:
    shard: tuple[int, int] = (0, 1)
    batch_chunks: int = 512
    max_batch_docs: int = 2048
    max_batch_records: int = 20000
    queue_depth: int = 2
    checkpoint_interval_s: float = 30.0
    max_rate: float = 0.0  # documents/s read into this worker; 0 = unlimited
    retry_timeout_s: float = 600.0
    force: bool = False  # rewrite unchanged documents too
    strict: bool = False


def token_counter(encoder: Encoder) -> Callable[[Sequence[str]], list[int]]:
    """`encoder.count_tokens` safe to call while the encoder runs in another thread.

    A transformers fast tokenizer is not thread-safe: encoding re-sets its truncation and padding
    state, and a concurrent call fails with "Already borrowed". The chunker (reader thread) gets
    its own copy of the Rust tokenizer, which also counts whole lists without holding the GIL.
    """
    tokenizer = getattr(encoder, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        lock = threading.Lock()

        def count_locked(texts: Sequence[str]) -> list[int]:
            with lock:
                return encoder.count_tokens(texts)

        return count_locked
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()

    encode = getattr(own, "encode_batch_fast", own.encode_batch)  # _fast: no offsets, same ids

    def count(texts: Sequence[str]) -> list[int]:
        return [len(encoding.ids) for encoding in encode(list(texts), add_special_tokens=True)]

    return count


def plan_document(planner: Planner, doc: SourceDoc) -> PlannedDoc:
    return PlannedDoc(doc=doc, document=planner.plan(doc.doc_id, doc.text, doc.metadata, doc.page_starts,
                                                                  doc.unhashed))


def is_unchanged(planned: PlannedDoc, stored: Sequence[tuple[str, str, int, str]]) -> bool:
    """Stored exactly as we would write it: chunks 0..n-1 present, not chunk n, all the same content hash."""
    if len(stored) != len(planned.chunks):
        return False
    return sorted(index for _, _, index, _ in stored) == list(range(len(planned.chunks))) and all(
        stored_hash == planned.content_hash for _, _, _, stored_hash in stored
    )


class Pipeline:
    def __init__(
        self, *, files: Sequence[SourceFile], fields: FieldMap, limits: Limits, planner: Planner,
        encoder: Encoder, store: MilvusStore, collection: str, state: JobState, progress: Progress,
        reject_path: Path, config: PipelineConfig,
    ) -> None:
        self.files = list(files)
        self.fields = fields
        self.limits = limits
        self.planner = planner
        self.encoder = encoder
        self.store = store
        self.collection = collection
        self.state = state
        self.progress = progress  # committed; updated by the checkpointer only
        self.reject_path = reject_path
        self.config = config
        self._abort = threading.Event()
        self._interrupted = threading.Event()
        self._errors: list[BaseException] = []
        self._to_plan: queue.Queue[Batch | None] = queue.Queue(config.queue_depth)
        self._to_encode: queue.Queue[Batch | None] = queue.Queue(config.queue_depth)
        self._to_write: queue.Queue[Batch | None] = queue.Queue(config.queue_depth)
        self._acked: list[Acked] = []
        self._acked_lock = threading.Lock()
        self._writer_done = threading.Event()
        self._wrote = threading.Event()  # this process has had a write acknowledged
        self._wake_checkpointer = threading.Event()
        # Read but not yet committed: duplicates inside the uncommitted window are caught here.
        self._inflight: dict[str, tuple[int, int]] = {}
        self._inflight_lock = threading.Lock()
        # What the progress display shows (committed + acknowledged), and the stage timings.
        self.live: Counter[str] = Counter(progress.totals)
        self.live_position = progress.position
        self.busy_s: defaultdict[str, float] = defaultdict(float)
        self.completed = False
        self.reader_position = progress.position

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Stop soon: abandon batches not yet written, checkpoint what Milvus acknowledged."""
        self._interrupted.set()
        self._abort.set()
        self._wake_checkpointer.set()

    def run(self, tick: Callable[[], None] | None = None, tick_s: float = 0.25) -> None:
        stages = [("reader", self._reader), ("planner", self._planner), ("encoder", self._encoder),
                  ("writer", self._writer), ("checkpointer", self._checkpointer)]
        threads = [threading.Thread(target=self._guard, args=(name, fn), name=f"index-{name}", daemon=True)
                   for name, fn in stages]
        for thread in threads:
            thread.start()
        while alive := [thread for thread in threads if thread.is_alive()]:
            alive[-1].join(tick_s)
            if tick is not None:
                tick()
        for thread in threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        if self._interrupted.is_set():
            raise Interrupted("interrupted")
        self.completed = True

    def _guard(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except _Abort:
            pass
        except BaseException as exc:
            if not self._errors:
                log.error("index_stage_failed", stage=name, error=f"{type(exc).__name__}: {exc}")
            self._errors.append(exc)
            self._abort.set()
            self._wake_checkpointer.set()
        finally:
            if name == "writer":
                self._writer_done.set()
                self._wake_checkpointer.set()

    def _put(self, q: queue.Queue[T], item: T) -> None:
        while True:
            if self._abort.is_set():
                raise _Abort
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue[T]) -> T:
        while True:
            if self._abort.is_set():
                raise _Abort
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def _items(self, q: queue.Queue[Batch | None]) -> Iterator[Batch]:
        while (item := self._get(q)) is not None:
            yield item

    # ------------------------------------------------------------------ stages
    def _reader(self) -> None:
        start = self.progress.position
        shard, shards = self.config.shard
        batch = Batch(end=start)
        started = time.monotonic()
        accepted = 0
        for record in read_all(self.files, self.fields, self.limits, start):
            if self._abort.is_set():
                raise _Abort
            batch.counts["read"] += 1
            batch.end = self.reader_position = record.position
            # Each record belongs to one shard: by its id, or (a bad row without one) by where it is.
            if isinstance(record, Reject):
                owner = record.doc_id if record.doc_id is not None else f"{record.file}:{record.line}"
            else:
                owner = record.doc_id
            if shard_of(owner, shards) != shard:
                batch.counts["other_shards"] += 1
            elif isinstance(record, Reject):
                self._reject(batch, record)
            elif (first := self._first_seen(record)) is not None:
                self._reject(batch, Reject(
                    record.file, record.line, "duplicate_id",
                    f"duplicate id {record.doc_id!r} (first at {self.files[first[0]].display}:{first[1]})",
                    "", record.doc_id, record.position,
                ))
            else:
                began = time.perf_counter()
                try:
                    planned = plan_document(self.planner, record)
                except IngestError as exc:  # e.g. nothing left once normalised
                    self._reject(batch, Reject(record.file, record.line, exc.kind, exc.reason, "", record.doc_id,
                                               record.position))
                    continue
                finally:
                    self.busy_s["chunk"] += time.perf_counter() - began
                longest = max(len(chunk.text.encode("utf-8")) for chunk in planned.chunks)
                if longest > MAX_CHUNK_BYTES:  # e.g. a run of [UNK]s: few tokens, many characters
                    self._reject(batch, Reject(
                        record.file, record.line, "chunk_too_long",
                        f"a chunk is {longest} bytes; Milvus stores at most {MAX_CHUNK_BYTES}",
                        "", record.doc_id, record.position,
                    ))
                    continue
                batch.docs.append(planned)
                batch.chunk_total += len(planned.chunks)
                accepted += 1
                if self.config.max_rate > 0:
                    wait = started + accepted / self.config.max_rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
            if (batch.chunk_total >= self.config.batch_chunks or len(batch.docs) >= self.config.max_batch_docs
                    or batch.counts["read"] >= self.config.max_batch_records):
                self._put(self._to_plan, batch)
                batch = Batch(end=batch.end)
        if batch.counts or batch.docs:
            self._put(self._to_plan, batch)
        self._put(self._to_plan, None)

    def _reject(self, batch: Batch, reject: Reject) -> None:
        if self.config.strict:
            raise StrictModeError(reject)
        batch.rejects.append(reject)

    def _first_seen(self, doc: SourceDoc) -> tuple[int, int] | None:
        with self._inflight_lock:
            if doc.doc_id in self._inflight:
                return self._inflight[doc.doc_id]
        committed = self.state.written([doc.doc_id])
        if doc.doc_id in committed:
            return committed[doc.doc_id]
        with self._inflight_lock:
            self._inflight[doc.doc_id] = (doc.position.file_index, doc.line)
        return None

    def _planner(self) -> None:
        for batch in self._items(self._to_plan):
            began = time.perf_counter()
            self._plan(batch)
            self.busy_s["plan"] += time.perf_counter() - began
            self._put(self._to_encode, batch)
        self._put(self._to_encode, None)

    def _plan(self, batch: Batch) -> None:
        """Skip documents stored exactly as they would be written; find the stale tail of the others.

        Every writer (this one, the service) upserts all of a document's chunks and then deletes
        those past its end, so a document's rows are always the prefix 0..k-1. Looking up the
        primary keys `doc#0`..`doc#n` (n = its chunk count now) therefore tells: unchanged (0..n-1
        present with the same hash), new (none), or changed; `doc#n` present means the stored
        version is longer, and only then is its tail searched by doc_id (a scan of the collection).
        """
        # Strong until our first write is acknowledged; from then on Session sees every write
        # acknowledged before our last one (all earlier jobs included) without Strong's wait.
        consistency = "Session" if self._wrote.is_set() else "Strong"
        ids = [chunk_row_id(p.doc.doc_id, index) for p in batch.docs for index in range(len(p.chunks) + 1)]
        found: dict[str, list[tuple[str, str, int, str]]] = {}
        for start in range(0, len(ids), PLAN_QUERY_IDS):
            part = ids[start : start + PLAN_QUERY_IDS]
            for row in self._retry(partial(self.store.rows_by_id, self.collection, part, consistency)):
                found.setdefault(row[1], []).append(row)
        longer: list[PlannedDoc] = []
        for planned in batch.docs:
            rows = found.get(planned.doc.doc_id, [])
            if not self.config.force and is_unchanged(planned, rows):
                batch.counts["skipped"] += 1
                continue
            if any(index == len(planned.chunks) for _, _, index, _ in rows):
                longer.append(planned)
            batch.to_write.append(planned)
        for start in range(0, len(longer), PLAN_QUERY_DOCS):
            group = longer[start : start + PLAN_QUERY_DOCS]
            ends = {p.doc.doc_id: len(p.chunks) for p in group}
            tails = self._retry(partial(self.store.stored_chunks, self.collection, list(ends), consistency))
            stale: dict[str, list[str]] = {}
            for row_id, doc_id, index, _ in tails:
                if index >= ends[doc_id]:
                    stale.setdefault(doc_id, []).append(row_id)
            for planned in group:
                planned.stale = stale.get(planned.doc.doc_id, [])

    def _encoder(self) -> None:
        for batch in self._items(self._to_encode):
            texts = chunk_texts([planned.document for planned in batch.to_write])
            if texts:
                began = time.perf_counter()
                batch.vectors = self.encoder.encode_documents(texts)
                self.busy_s["encode"] += time.perf_counter() - began
                self.live["chunks_encoded"] += len(texts)
            self._put(self._to_write, batch)
        self._put(self._to_write, None)

    def _writer(self) -> None:
        for batch in self._items(self._to_write):
            began = time.perf_counter()
            failed = self._write(batch)
            self.busy_s["write"] += time.perf_counter() - began
            failed_ids = {reject.doc_id for reject in failed}
            written = [p for p in batch.to_write if p.doc.doc_id not in failed_ids]
            counts = Counter(batch.counts)
            counts["documents"] += len(batch.docs)
            counts["written"] += len(written)
            counts["chunks_written"] += sum(len(p.chunks) for p in written)
            counts["split_documents"] += sum(1 for p in written if len(p.chunks) > 1)
            counts["stale_chunks_deleted"] += sum(len(p.stale) for p in written)
            rejects = [*batch.rejects, *failed]
            counts["rejected"] += len(rejects)
            seen = [(p.doc.doc_id, p.doc.position.file_index, p.doc.line, 0 if p.doc.doc_id in failed_ids else 1)
                    for p in batch.docs]
            seen += [(r.doc_id, r.position.file_index, r.line, 0) for r in rejects
                     if r.doc_id is not None and r.kind != "milvus_rejected"]
            with self._acked_lock:
                self._acked.append(Acked(batch.end, seen, rejects, counts, bool(batch.to_write)))
                self.live.update(counts)
                self.live_position = batch.end
            self._wake_checkpointer.set()

    def _write(self, batch: Batch) -> list[Reject]:
        """Upsert the batch's documents and delete their stale chunks; returns documents Milvus refused."""
        if not batch.to_write:
            return []
        assert batch.vectors is not None
        sized: list[tuple[PlannedDoc, list[ChunkRow], int]] = []
        documents = rows_of([planned.document for planned in batch.to_write], batch.vectors)
        for planned, rows in zip(batch.to_write, documents, strict=True):
            size = sum(len(row.text) * 3 + row.vector.size * 4 + 128 for row in rows)
            size += len(json.dumps(planned.doc.metadata, ensure_ascii=False)) * len(rows)
            sized.append((planned, rows, size))
        failed: list[Reject] = []
        group: list[tuple[PlannedDoc, list[ChunkRow], int]] = []
        for item in sized:  # whole documents per request, requests under MAX_REQUEST_BYTES
            if group and sum(size for _, _, size in group) + item[2] > MAX_REQUEST_BYTES:
                failed += self._upsert(group)
                group = []
            group.append(item)
        if group:
            failed += self._upsert(group)
        refused = {reject.doc_id for reject in failed}
        stale = [row_id for planned in batch.to_write if planned.doc.doc_id not in refused
                 for row_id in planned.stale]
        if stale:
            self._retry(lambda: self.store.delete_rows(self.collection, stale))
        return failed

    def _upsert(self, group: list[tuple[PlannedDoc, list[ChunkRow], int]]) -> list[Reject]:
        rows = [row for _, doc_rows, _ in group for row in doc_rows]
        try:
            self._retry(lambda: self.store.upsert(self.collection, rows))
            self._wrote.set()
            return []
        except StoreRefusedError as exc:
            if len(group) > 1:  # find the documents Milvus refuses; write the others
                half = len(group) // 2
                return self._upsert(group[:half]) + self._upsert(group[half:])
            doc = group[0][0].doc
            log.warning("document_refused", doc_id=doc.doc_id, file=doc.file, line=doc.line, error=str(exc))
            return [Reject(doc.file, doc.line, "milvus_rejected", f"Milvus refused the document: {exc}", "",
                           doc.doc_id, doc.position)]

    def _retry(self, call: Callable[[], T], *, deadline_s: float | None = None, abortable: bool = True) -> T:
        """Call, retrying (jittered backoff) whatever is not a refusal of the request itself for up to
        `deadline_s` (--retry-timeout): Milvus down, restarting, recovering. Past it the job fails,
        resumable; a refused request is raised at once."""

        def before_retry(exc: BaseException, attempt: int, wait_s: float) -> None:
            if isinstance(exc, CollectionNotLoadedError):  # a restarted Milvus, a reopened Lite
                with contextlib.suppress(Exception):
                    self.store.load(self.collection)
            log.warning("milvus_retry", error=str(exc)[:500], attempt=attempt, retry_in_s=round(wait_s, 2))

        def sleep(seconds: float) -> None:
            if not abortable:
                time.sleep(seconds)
            elif self._abort.wait(seconds):
                raise _Abort

        return retry_call(call, retry_on=retryable, sleep=sleep, before_retry=before_retry,
                          deadline_s=self.config.retry_timeout_s if deadline_s is None else deadline_s)

    # ------------------------------------------------------------------ checkpoints
    def _checkpointer(self) -> None:
        last = last_ping = time.monotonic()
        while True:
            self._wake_checkpointer.wait(timeout=min(self.config.checkpoint_interval_s, KEEPALIVE_S))
            self._wake_checkpointer.clear()
            if time.monotonic() - last_ping >= KEEPALIVE_S:
                # While the encoder works on a long batch the connection idles, and a gRPC server
                # with default settings (Milvus Lite's) answers the client's keepalive pings with
                # GOAWAY "too many pings"; a cheap call now and then keeps it open.
                self.store.ping()
                last_ping = time.monotonic()
            finishing = self._writer_done.is_set() or self._abort.is_set()
            if not finishing and time.monotonic() - last < self.config.checkpoint_interval_s:
                continue
            if finishing:
                self._writer_done.wait()  # the write in flight, if any, ends first
            with self._acked_lock:
                acked, self._acked = self._acked, []
            if acked:
                try:
                    self._commit(acked)
                except Exception as exc:
                    if finishing and self._errors:  # Milvus is down and the job is failing anyway
                        log.warning("final_checkpoint_skipped", error=str(exc))
                        return
                    raise
                last = time.monotonic()
            if finishing:
                return

    def _commit(self, acked: list[Acked]) -> None:
        began = time.perf_counter()
        # Acknowledged is not yet durable: flush makes Milvus persist everything acknowledged so far.
        if any(item.wrote for item in acked):
            # The last checkpoint also runs after an abort: it may not be cut short by it, but after
            # a failure (Milvus down) it does not wait out the whole retry timeout either.
            final = self._abort.is_set()
            self._retry(lambda: self.store.flush(self.collection), abortable=not final,
                        deadline_s=min(self.config.retry_timeout_s, 30.0) if self._errors else None)
        rejects = [reject for item in acked for reject in item.rejects]
        reject_bytes = self.progress.reject_bytes
        if rejects:
            with self.reject_path.open("ab") as handle:
                handle.truncate(reject_bytes)  # drop lines of a crashed attempt past the last commit
                handle.seek(reject_bytes)
                for reject in rejects:
                    handle.write((json.dumps(reject.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
                reject_bytes = handle.tell()
        totals = Counter(self.progress.totals)
        reasons = Counter(self.progress.reasons)
        for item in acked:
            totals.update(item.counts)
            reasons.update(reject.kind for reject in item.rejects)
        progress = Progress(acked[-1].end, dict(totals), dict(reasons), reject_bytes, "index")
        self.state.commit([row for item in acked for row in item.seen], progress)
        self.progress = progress
        with self._inflight_lock:
            for item in acked:
                for doc_id, *_ in item.seen:
                    self._inflight.pop(doc_id, None)
        self.busy_s["checkpoint"] += time.perf_counter() - began
        log.debug("checkpoint", position=progress.position.to_json(), documents=totals["documents"])


def rejects_in(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
