"""Writes: whole documents that settle beside concurrent writers, deletes, and Lite's flushing.

`StoreWrites.write_documents` upserts every chunk of each document, drops the chunks past its new
end and repairs what a concurrent writer broke (`_repair_versions`); on Milvus Lite, writes of every
process on a directory take turns under a file lock beside it (`_document_writes`). Deletes go by
document, by typed conditions or by primary key. Milvus Lite indexes only flushed rows, so writes
flush every LITE_FLUSH_ROWS rows and, in a service, once they pause (`IdleFlusher`).
"""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import structlog

from semsearch.filters import TENANT_FIELD, Condition, TenantFilter, render_filters, render_string_in
from semsearch.store.errors import TenantsUnavailableError, no_tenants_reason
from semsearch.store.reads import StoreReads
from semsearch.store.rows import ChunkRow, check_doc_id

log = structlog.get_logger(__name__)

LITE_FLUSH_ROWS = 4096
# Repair writes (rewritten chunks, or a take-over) a write may make to leave its documents whole.
SETTLE_ROUNDS = 4
# How long a write whose rows stand among a newer version's waits (re-reading every STRANDED_POLL_S)
# for that write to repair over them before it takes the document over: a write settles in a few
# Strong reads, upserts and deletes, which a busy machine can stretch past a second.
STRANDED_PATIENCE_S = 5.0
STRANDED_POLL_S = 0.5


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


class StoreWrites(StoreReads):
    """The write layer of MilvusStore (semsearch/store/milvus.py sets its state)."""

    _unflushed: dict[str, int]  # rows written to each Lite collection since its last flush
    _idle_flusher: IdleFlusher | None

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
        """Read back (Strong) what this write stored and settle each document to one whole version:
        - still the newest version (`updated_at`, then `content_hash`) but chunks lost (a concurrent
          delete's filter caught them, an older write's rows landed over them): write those again and
          drop older tails again;
        - superseded, none of its rows left: nothing to do, the newer write owns the document;
        - superseded, yet its rows stand among the newer version's: wait (re-reading) up to
          STRANDED_PATIENCE_S for the newer write to repair over them, as it does while it settles; if
          they still stand, they landed after that write had returned (over its first chunks: the ids are
          shared by every version), so take the document over: write all its chunks again stamped later
          than any version seen and drop every other tail, so it ends whole as this version.
        - Milvus holds duplicate rows of one of its chunk ids (two clients' upserts of the id raced; on a
          server only, `_duplicated_documents`): write all its chunks again, taking the document over if
          superseded (an upsert deletes every row of its id).
        At most SETTLE_ROUNDS writes. A superseded write deletes nothing otherwise: Milvus deletes by
        filter as "find the rows, delete their ids", so a loser's delete could remove the winner's chunks;
        the patience keeps the take-over for a newer write that is gone (a slow one still settling would
        otherwise trade take-overs with it, and their tail deletes would cut each other's chunks)."""
        wanted: dict[tuple[str, str], dict[int, ChunkRow]] = {}
        for row in rows:
            wanted.setdefault((row.tenant, row.doc_id), {})[row.chunk_index] = row
        stamps = dict.fromkeys(wanted, written_at)
        stranded_since: dict[tuple[str, str], float] = {}
        rounds = 0
        while True:
            stored = self._stored_versions(name, wanted)
            rewrite: dict[int, list[ChunkRow]] = {}  # stamp -> rows to write again
            whole: dict[int, list[ChunkRow]] = {}  # stamp -> every chunk of a repaired document (its tails go)
            waiting = False
            duplicated = self._duplicated_documents(name, wanted, stored)
            for key, chunks in wanted.items():
                step = _settle_step(chunks, stored.get(key, set()), stamps, key, stranded_since,
                                    duplicated=key in duplicated)
                if step is WAIT:
                    waiting = True
                elif step is not None:
                    rewrite.setdefault(stamps[key], []).extend(step)
                    whole.setdefault(stamps[key], []).extend(chunks.values())
            if not whole:
                if not waiting:
                    return
                time.sleep(STRANDED_POLL_S)
                continue
            rounds += 1
            if rounds > SETTLE_ROUNDS:
                log.warning("document_versions_unsettled", collection=name, rounds=SETTLE_ROUNDS)
                return
            for stamp, again in rewrite.items():
                log.info("document_version_repaired", collection=name, chunks=len(again))
                self.upsert(name, again, written_at=stamp)
                self._delete_tails(name, whole[stamp], stamp)

    def _duplicated_documents(self, name: str, wanted: Mapping[tuple[str, str], Any],
                              stored: Mapping[tuple[str, str], set[Any]]) -> set[tuple[str, str]]:
        """The documents of this write that Milvus holds more rows of than a query shows.

        Two upserts of one chunk id racing from two clients can both keep their row (both deletes ran
        before both inserts): queries then show one of the two, and which one depends on the query
        (with or without a limit), while count(*) counts both, so reads of one document disagree. One
        count for the whole write; one per document only when that count is off. Milvus Lite needs
        none of this: writes of every process on a directory take turns (`_document_writes`)."""
        if self._lite is not None:
            return set()
        doc_ids = sorted({doc_id for _, doc_id in wanted})
        # Session, not Strong: it reads at least what the Strong read-back just saw (the server caught up
        # to that) without waiting for another time tick (~0.2 s on 2.3.5); a row landing since can only
        # add a rewrite, never hide a duplicate.
        if self.count(name, render_string_in("doc_id", doc_ids), "Session") <= sum(map(len, stored.values())):
            return set()
        tenant_field = self.tenant_aware(name)
        duplicated = set()
        for tenant, doc_id in wanted:
            where = render_string_in("doc_id", [doc_id]) + (
                f" and {render_filters([TenantFilter(tenant)])}" if tenant_field else "")
            if self.count(name, where, "Session") > len(stored.get((tenant, doc_id), ())):
                duplicated.add((tenant, doc_id))
        if duplicated:
            log.warning("duplicate_rows_found", collection=name, documents=len(duplicated))
        return duplicated

    def _stored_versions(self, name: str, wanted: Mapping[tuple[str, str], Any]
                         ) -> dict[tuple[str, str], set[tuple[int, tuple[int, str]]]]:
        """(tenant, doc id) -> {(chunk index, (updated_at, content_hash))} of the stored rows (Strong)."""
        fields = ["content_hash", "updated_at", *([TENANT_FIELD] if self.tenant_aware(name) else [])]
        stored: dict[tuple[str, str], set[tuple[int, tuple[int, str]]]] = {}
        for row in self.document_rows(name, sorted({doc_id for _, doc_id in wanted}), fields, tenant=None):
            stored.setdefault((str(row.get(TENANT_FIELD, "")), str(row["doc_id"])), set()).add(
                (int(row["chunk_index"]), (int(row["updated_at"]), str(row["content_hash"]))))
        return stored

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

    def delete_rows(self, name: str, row_ids: Sequence[str]) -> None:
        """Delete rows by primary key (`chunk_row_id`: `{doc_id}#{chunk_index}`, with `@{tenant}` after it
        for a tenant other than the default one)."""
        if not row_ids:
            return
        with self._write_lock:
            # Not `delete(ids=...)`: pymilvus quotes those without escaping backslashes.
            self._call(self.client.delete, collection_name=name, filter=render_string_in("id", list(row_ids)))


WAIT: list[ChunkRow] = []  # `_settle_step`: stranded, still within its patience


def _settle_step(chunks: dict[int, ChunkRow], present: set[tuple[int, tuple[int, str]]],
                 stamps: dict[tuple[str, str], int], key: tuple[str, str],
                 stranded_since: dict[tuple[str, str], float], *, duplicated: bool = False) -> list[ChunkRow] | None:
    """What one document of a write needs now: the rows to write again (its stamp in `stamps`, moved
    on for a take-over), WAIT, or None (whole, or cleanly superseded).

    Rewritten whole, taken over if superseded: a document stranded past its patience, and one Milvus
    holds duplicate rows of (`duplicated`: an upsert deletes every row of its ids; the newer write may
    have returned before the duplicates formed). Either way one whole version a client sent."""
    mine = (stamps[key], chunks[0].content_hash if 0 in chunks else "")
    newest = max((version for _, version in present), default=mine)
    stranded = newest > mine and any(version == mine for _, version in present)
    if stranded and not duplicated:
        since = stranded_since.setdefault(key, time.monotonic())
        if time.monotonic() - since < STRANDED_PATIENCE_S:
            return WAIT
    stranded_since.pop(key, None)
    if stranded or duplicated:
        if newest > mine:
            stamps[key] = max(int(time.time() * 1000), newest[0] + 1)  # take the document over
        return list(chunks.values())
    if newest > mine:
        return None  # superseded cleanly: the newer write repairs its own version
    have = {index for index, version in present if version == mine}
    if len(have) == len(chunks) and all(index < len(chunks) for index, _ in present):
        return None
    return [row for index, row in chunks.items() if index not in have]
