"""Bookkeeping reads: counts, scans and the chunk listings that decide what gets written.

Indexer plans, stale chunks and promotion copies are decided from these reads, so they default to
Strong consistency: they see every write Milvus has acknowledged (Bounded may lag seconds on a
server). `consistency="Session"` is enough once this client has itself written: it then sees every
write acknowledged before its own last one, without Strong's wait (~0.3 s).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from semsearch.filters import Condition, render_filters, render_string_in
from semsearch.store.rows import OUTPUT_FIELDS, StoredChunk
from semsearch.store.schema import StoreCollections

BOOKKEEPING_CONSISTENCY = "Strong"


class StoreReads(StoreCollections):
    """The bookkeeping-read layer of MilvusStore."""

    QUERY_WINDOW = 16384  # Milvus' largest query result (offset + limit)

    def _query(self, **kwargs: Any) -> Any:
        kwargs.setdefault("consistency_level", BOOKKEEPING_CONSISTENCY)
        return self._call(self.client.query, **kwargs)

    def count(self, name: str, filter: str = "", consistency: str = BOOKKEEPING_CONSISTENCY) -> int:
        """Rows matching `filter` (a rendered expression, never a user string; '' = all rows)."""
        rows = self._query(collection_name=name, filter=filter, output_fields=["count(*)"],
                           consistency_level=consistency)
        return int(rows[0]["count(*)"])

    def count_documents(self, name: str, conditions: Sequence[Condition]) -> int:
        """Documents (their chunk 0) matching typed conditions."""
        where = render_filters(conditions)
        return self.count(name, f"({where}) and chunk_index == 0" if where else "chunk_index == 0")

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
        """The stored chunks among these primary keys (`chunk_row_id`: `{doc_id}#{chunk_index}`, with
        `@{tenant}` after it for a tenant other than the default one).

        A primary-key lookup costs the same however large the collection; a `doc_id in [...]`
        filter (stored_chunks) scans every row. At most QUERY_WINDOW ids per call."""
        if not row_ids:
            return []
        rows = self._query(collection_name=name, ids=list(row_ids),
                           output_fields=["id", "doc_id", "chunk_index", "content_hash"], consistency_level=consistency)
        return [StoredChunk.of(row) for row in rows]
