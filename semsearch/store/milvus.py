"""MilvusStore: the store's layers put together, its state, and its lifecycle (open, close).

Each layer is one concern in its own module: connection.py (calls, healing, load state),
schema.py (collections, aliases, tenants), reads.py (bookkeeping reads), search.py, writes.py.
The constructor here sets the state all of them use.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import structlog

from semsearch.config import Settings
from semsearch.lite import LiteEndpoint, is_local_uri
from semsearch.store.connection import Capabilities
from semsearch.store.records import RECORD_KEY_FIELD, RecordTable
from semsearch.store.schema import warm_jieba
from semsearch.store.search import StoreSearch
from semsearch.store.writes import IdleFlusher, StoreWrites

log = structlog.get_logger(__name__)


class MilvusStore(StoreWrites, StoreSearch):
    """semsearch's use of Milvus (Milvus Lite directories and server URIs): collections that record
    their model, tenant-aware document writes that settle beside concurrent writers, Strong
    bookkeeping reads and per-document search, over one connection that heals after a restart."""

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

    # ------------------------------------------------------------------ record tables (records.py)
    # The registry uses RecordTable itself; these name the table per call, as before.
    RECORD_KEY_FIELD = RECORD_KEY_FIELD

    def ensure_record_table(self, name: str) -> None:
        RecordTable(self, name).ensure()

    def read_records(self, name: str, keys: Sequence[str]) -> dict[str, str]:
        return RecordTable(self, name).read(keys)

    def scan_records(self, name: str, prefix: str = "") -> dict[str, str]:
        """Every record whose key starts with `prefix`."""
        return RecordTable(self, name).scan(prefix)

    def write_record(self, name: str, key: str, value: str) -> None:
        RecordTable(self, name).write(key, value)

    def delete_records(self, name: str, keys: Sequence[str]) -> None:
        RecordTable(self, name).delete(keys)
