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
    """What validation compared. `missing`, `extra` and `changed` are the divergent row ids (sorted):
    live rows absent from the target, target rows whose live row is gone, rows with another content
    hash. `in_flight`: rows that differed but were written during validation (dual-written)."""

    source_count: int
    target_count: int
    sampled: int
    max_vector_error: float
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    in_flight: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed or self.mismatched)

    def examples(self, limit: int = 5) -> list[str]:
        """A few divergent ids of each kind, for a message a user can act on."""
        return [*self.missing[:limit], *self.extra[:limit], *self.changed[:limit]]

    def report(self) -> dict[str, Any]:
        """The fields a promotion report (and the CLI) shows: counts, and a few ids of each kind."""
        return {"source_count": self.source_count, "target_count": self.target_count, "sampled": self.sampled,
                "max_vector_error": self.max_vector_error, "mismatched": self.mismatched[:10],
                "missing": len(self.missing), "extra": len(self.extra), "changed": len(self.changed),
                "in_flight": self.in_flight, "examples": self.examples()}

    def summary(self) -> str:
        """The divergence in a sentence: counts, then a few example ids."""
        found = (f"{len(self.missing)} live rows missing there, {len(self.extra)} there whose live row is gone, "
                 f"{len(self.changed)} with another content hash")
        examples = self.examples(3)
        return found + (f" (e.g. {', '.join(examples)})" if examples else "")


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


# Rows that differ are read again for up to this long: a write acknowledged by the live collection
# reaches the candidate (dual-write) a moment later, longer on a busy machine.
SETTLE_S = 5.0
SETTLE_POLL_S = 0.2
RECHECK_BATCH = 1000  # ids per re-read: one `doc_id in [...]` filter each


def validate(store: MilvusStore, source: str, target: str, encoder: Encoder, *, sample: int = 32,
             tolerance: float = 1e-3, seed: int = 0, settle_s: float = SETTLE_S) -> Validation:
    """Every row's id and content hash compared in both collections, and a random sample of target
    rows re-encoded and compared with what is stored.

    Exact while instances keep writing: rows that differ are read again (only those) until they
    agree or `settle_s` passes, so in-flight dual writes land. A live row rewritten since this
    validation first read it was written by an instance that dual-writes (promotion waits for all
    of them before copying): in flight, not divergence. Whatever else still differs is divergence."""
    in_target = {str(row["id"]): str(row["content_hash"]) for row in store.iter_rows(target, ["id", "content_hash"])}
    in_source = {str(row["id"]): (str(row["content_hash"]), int(row["updated_at"]))
                 for row in store.iter_rows(source, ["id", "content_hash", "updated_at"])}
    differing = {row_id for row_id in in_source.keys() | in_target.keys()
                 if not _agree(in_source.get(row_id), in_target.get(row_id))}
    check = Validation(source_count=len(in_source), target_count=len(in_target), sampled=0, max_vector_error=0.0)
    _settle(store, source, target, differing, in_source, check, settle_s)
    _check_vectors(store, target, sorted(in_target), encoder, check, sample=sample, tolerance=tolerance, seed=seed)
    return check


def _settle(store: MilvusStore, source: str, target: str, differing: set[str],
            first_read: dict[str, tuple[str, int]], check: Validation, settle_s: float) -> None:
    """Read the differing rows again until they agree or `settle_s` passes; file what still differs
    in `check` as in flight or divergent. A row that agreed once is done: any later write to it is
    dual-written."""
    deadline = time.monotonic() + settle_s
    reread = len(differing)
    source_now: dict[str, tuple[str, int]] = {}
    target_now: dict[str, str] = {}
    # Rows seen rewritten in the live collection since the first read, at any re-read: while a row is
    # being upserted, Milvus 2.3 may answer with an older version of it now and then.
    rewritten: set[str] = set()
    while differing:
        # Live first: a dual write lands there first, so the target read that follows sees it sooner.
        source_now = {row_id: (str(row["content_hash"]), int(row["updated_at"]))
                      for row_id, row in _rows(store, source, differing, ["content_hash", "updated_at"]).items()}
        target_now = {row_id: str(row["content_hash"])
                      for row_id, row in _rows(store, target, differing, ["content_hash"]).items()}
        rewritten |= {row_id for row_id, (_, written) in source_now.items()
                      if row_id not in first_read or first_read[row_id][1] != written}
        differing = {row_id for row_id in differing if not _agree(source_now.get(row_id), target_now.get(row_id))}
        if not differing or time.monotonic() >= deadline:
            break
        time.sleep(SETTLE_POLL_S)
    for row_id in sorted(differing):
        if row_id in rewritten:
            check.in_flight += 1  # written during validation: its dual write is on its way
        elif row_id not in source_now:
            check.extra.append(row_id)  # deleted live, still in the target after the settle window
        elif row_id not in target_now:
            check.missing.append(row_id)
        else:
            check.changed.append(row_id)
    if reread:
        log.info("validation_reread", rows=reread, in_flight=check.in_flight, still_differing=len(differing))


def _agree(live: tuple[str, int] | None, candidate: str | None) -> bool:
    """The same content hash in both collections, or absent from both (a hash may be '')."""
    return (None if live is None else live[0]) == candidate


def _rows(store: MilvusStore, name: str, row_ids: set[str], fields: list[str]) -> dict[str, dict[str, Any]]:
    """These rows of `name` (those that exist) by id, read through their documents' rows (ids are
    `{doc_id}#{chunk_index}[@tenant]`; tenant names hold no `#`)."""
    ids = sorted(row_ids)
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), RECHECK_BATCH):
        doc_ids = sorted({row_id.rsplit("#", 1)[0] for row_id in ids[start : start + RECHECK_BATCH]})
        for row in store.document_rows(name, doc_ids, fields, tenant=None):
            if str(row["id"]) in row_ids:
                found[str(row["id"])] = row
    return found


def _check_vectors(store: MilvusStore, target: str, ids: list[str], encoder: Encoder, check: Validation, *,
                   sample: int, tolerance: float, seed: int) -> None:
    """Re-encode a random sample of target rows and compare with the stored vectors. A sampled row
    deleted meanwhile is skipped: presence is what the id comparison checks."""
    chosen = random.Random(seed).sample(ids, min(sample, len(ids)))
    doc_ids = sorted({row_id.rsplit("#", 1)[0] for row_id in chosen})
    rows = {str(r["id"]): r for r in store.document_rows(target, doc_ids, [*OUTPUT_FIELDS, "vector"], tenant=None)}
    picked = [rows[row_id] for row_id in chosen if row_id in rows]
    check.sampled = len(picked)
    if not picked:
        return
    fresh = encoder.encode_documents([str(r["text"]) for r in picked])
    for row, vector in zip(picked, fresh, strict=True):
        error = float(np.max(np.abs(np.asarray(row["vector"], dtype=np.float32) - vector)))
        check.max_vector_error = max(check.max_vector_error, error)
        if error > tolerance:
            check.mismatched.append(str(row["id"]))


__all__ = ["CopyStats", "Validation", "chunk_row_id", "copy_rows", "remove_orphans", "row_ids", "validate"]
