"""Per-document ordering of writes inside one service process.

An upsert and a delete of the same document id must not interleave (a delete listing the old
chunks while an upsert writes new ones left fragments). Each write call holds the locks of all its
document ids, taken in sorted order so two calls never wait on each other in a cycle. Across
processes the store's delete-by-filter and `updated_at`-bounded tail deletes keep a document whole
(semsearch/store/writes.py `write_documents`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable


class DocumentLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, doc_ids: Iterable[str]) -> AsyncIterator[None]:
        ids = sorted(set(doc_ids))
        for doc_id in ids:  # register interest first, so no lock is dropped while awaited
            self._holders[doc_id] = self._holders.get(doc_id, 0) + 1
            self._locks.setdefault(doc_id, asyncio.Lock())
        taken: list[asyncio.Lock] = []
        try:
            for doc_id in ids:
                lock = self._locks[doc_id]
                await lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
            for doc_id in ids:
                left = self._holders[doc_id] - 1
                if left:
                    self._holders[doc_id] = left
                else:  # the table holds only ids with a write in progress
                    del self._holders[doc_id]
                    del self._locks[doc_id]

    def __len__(self) -> int:
        return len(self._locks)
