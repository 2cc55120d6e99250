"""Re-embed a collection's stored chunks with another model into another collection.

Used by promotion and rollback: the texts come from the live collection itself (the source files
may be gone). Rows keep their ids, offsets, metadata and content hashes, so both collections hold
the same documents, each with its own model's vectors.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from semsearch.encoders import Encoder
from semsearch.filters import TENANT_FIELD
from semsearch.store import OUTPUT_FIELDS, ChunkRow, MilvusStore, chunk_row_id

log = structlog.get_logger(__name__)

ROW_FIELDS = ["id", "doc_id", "chunk_index", "char_offset", "text", "metadata", "content_hash", "updated_at"]


@dataclass
class CopyStats:
    read: int = 0
    skipped: int = 0
    written: int = 0
    removed: int = 0
    seconds: float = 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


@dataclass
class Validation:
    source_count: int
    target_count: int
    sampled: int
    max_vector_error: float
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.source_count == self.target_count and not self.mismatched


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def copy_rows(
    store: MilvusStore, source: str, target: str, encoder: Encoder, *, since_ms: int | None = None,
    skip_existing: bool = True, batch_size: int = 256, on_batch: Callable[[CopyStats], None] | None = None,
) -> CopyStats:
    """Re-encode source rows (all, or those written since `since_ms`) into `target`.

    `skip_existing` skips rows already in the target with the same content hash, so a re-run after
    a crash continues instead of starting over.
    """
    stats = CopyStats()
    started = time.perf_counter()
    where = "" if since_ms is None else f"updated_at >= {int(since_ms)}"
    # Every tenant's rows, each keeping its tenant (a source made before tenants holds only the default one).
    fields = [*ROW_FIELDS, TENANT_FIELD] if store.tenant_aware(source) else ROW_FIELDS
    for batch in _batches(store.iter_rows(source, fields, where), batch_size):
        stats.read += len(batch)
        if skip_existing:
            present = {
                (chunk.row_id, chunk.content_hash)
                for chunk in store.stored_chunks(target, sorted({r["doc_id"] for r in batch}), tenant=None)
            }
            todo = [r for r in batch if (r["id"], r["content_hash"]) not in present]
            stats.skipped += len(batch) - len(todo)
        else:
            todo = batch
        if todo:
            vectors = encoder.encode_documents([str(r["text"]) for r in todo])
            store.upsert(target, [
                ChunkRow(doc_id=str(r["doc_id"]), chunk_index=int(r["chunk_index"]), text=str(r["text"]),
                         vector=vector, metadata=dict(r.get("metadata") or {}),
                         content_hash=str(r["content_hash"]), char_offset=int(r["char_offset"]),
                         tenant=str(r.get(TENANT_FIELD) or ""))
                for r, vector in zip(todo, vectors, strict=True)
            ])
            stats.written += len(todo)
        stats.seconds = time.perf_counter() - started
        if on_batch is not None:
            on_batch(stats)
    stats.seconds = time.perf_counter() - started
    return stats


def row_ids(store: MilvusStore, name: str) -> set[str]:
    return {str(row["id"]) for row in store.iter_rows(name, ["id"])}


def remove_orphans(store: MilvusStore, source: str, target: str) -> int:
    """Delete target rows whose source row is gone (deleted while the copy ran).

    The target is read first: a row written to both after that read is in the source list too.
    """
    in_target = row_ids(store, target)
    in_source = row_ids(store, source)
    orphans = sorted(in_target - in_source)
    for start in range(0, len(orphans), 1000):
        store.delete_rows(target, orphans[start : start + 1000])
    return len(orphans)


def validate(store: MilvusStore, source: str, target: str, encoder: Encoder, *, sample: int = 32,
             tolerance: float = 1e-3, seed: int = 0) -> Validation:
    """Count parity, and a random sample of target rows re-encoded and compared with what is stored."""
    ids = sorted(row_ids(store, target))
    chosen = random.Random(seed).sample(ids, min(sample, len(ids)))
    doc_ids = sorted({row_id.rsplit("#", 1)[0] for row_id in chosen})
    rows = {str(r["id"]): r for r in store.document_rows(target, doc_ids, [*OUTPUT_FIELDS, "vector"], tenant=None)}
    picked = [rows[row_id] for row_id in chosen if row_id in rows]
    worst = 0.0
    mismatched = [row_id for row_id in chosen if row_id not in rows]
    if picked:
        fresh = encoder.encode_documents([str(r["text"]) for r in picked])
        for row, vector in zip(picked, fresh, strict=True):
            error = float(np.max(np.abs(np.asarray(row["vector"], dtype=np.float32) - vector)))
            worst = max(worst, error)
            if error > tolerance:
                mismatched.append(str(row["id"]))
    source_count, target_count = _settled_counts(store, source, target)
    return Validation(source_count=source_count, target_count=target_count, sampled=len(chosen),
                      max_vector_error=worst, mismatched=mismatched)


def _settled_counts(store: MilvusStore, source: str, target: str, *, reads: int = 5,
                    wait_s: float = 0.2) -> tuple[int, int]:
    """Both counts, read again while they differ: under load a write lands in the live collection a
    moment before its dual-write reaches the target, so one pair of reads can catch it in flight."""
    counts = store.count(source), store.count(target)
    for _ in range(reads - 1):
        if counts[0] == counts[1]:
            break
        time.sleep(wait_s)
        counts = store.count(source), store.count(target)
    return counts


__all__ = ["CopyStats", "Validation", "chunk_row_id", "copy_rows", "remove_orphans", "row_ids", "validate"]
