"""The write race two replicas on one Milvus server can still meet: an older write whose rows land after
a newer write of the same document has settled and returned. Chunk ids are shared by every version, so
its rows overwrite the newer version's first chunks; without a take-over the document stays a mix."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from semsearch.store import ChunkRow, MilvusStore
from tests.test_store import MANIFEST, unit


def version(doc_id: str, name: str, chunks: int, seed: int) -> list[ChunkRow]:
    return [ChunkRow(doc_id=doc_id, chunk_index=i, text=f"{name} 第{i}段", vector=unit(seed + i),
                     content_hash=name) for i in range(chunks)]


def delayed_first_upsert(store: MilvusStore,
                         monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """The store's first upsert waits (after the write has taken its time stamp) until released."""
    stamped, release = threading.Event(), threading.Event()
    real_upsert = store.upsert

    def upsert(name: str, rows: Any, *, written_at: int | None = None) -> int:
        if not stamped.is_set():
            stamped.set()
            assert release.wait(60)
        return real_upsert(name, rows, written_at=written_at)

    monkeypatch.setattr(store, "upsert", upsert)
    return stamped, release


@pytest.mark.milvus_server
@pytest.mark.parametrize(("older_chunks", "newer_chunks"), [(2, 4), (4, 2)])
def test_an_older_write_landing_after_a_newer_one_settled_leaves_one_whole_version(
        milvus_server_uri: str, collection_name: str, monkeypatch: pytest.MonkeyPatch,
        older_chunks: int, newer_chunks: int) -> None:
    late = MilvusStore(milvus_server_uri, timeout_s=30)
    prompt = MilvusStore(milvus_server_uri, timeout_s=30)
    try:
        prompt.ensure_collection(collection_name, MANIFEST)
        stamped, release = delayed_first_upsert(late, monkeypatch)
        with ThreadPoolExecutor(1) as pool:
            older = pool.submit(late.write_documents, collection_name, version("d", "older", older_chunks, 10))
            assert stamped.wait(30)
            time.sleep(0.01)  # the newer write's stamp is a later millisecond
            prompt.write_documents(collection_name, version("d", "newer", newer_chunks, 20))  # settles, returns
            release.set()
            older.result(120)
        stored = prompt.document_rows(collection_name, ["d"], ["doc_id", "chunk_index", "content_hash"], tenant=None)
        versions = {str(row["content_hash"]) for row in stored}
        assert len(versions) == 1, sorted((int(r["chunk_index"]), r["content_hash"]) for r in stored)
        whole = older_chunks if versions == {"older"} else newer_chunks
        assert sorted(int(row["chunk_index"]) for row in stored) == list(range(whole))
        # Search reads the same rows: no chunk of the other version is a hit.
        probe = np.stack([unit(10), unit(20)])
        hits = prompt.search(collection_name, probe, top_k=10)
        assert {hit.chunk_index for per_query in hits for hit in per_query} == set(range(whole))
    finally:
        late.close()
        prompt.close()


@pytest.mark.milvus_server
def test_duplicate_rows_of_one_chunk_id_are_found_and_rewritten(
        milvus_server_uri: str, collection_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two upserts of one chunk id racing from two clients can both keep their row (both deletes before
    both inserts): queries then show one, count(*) both, and reads of the document disagree. Here the
    other client's row lands between this write's upsert and its read-back (as such an insert does):
    the write finds the extra row by counting and rewrites its version, leaving one row per id."""
    store = MilvusStore(milvus_server_uri, timeout_s=30)
    try:
        store.ensure_collection(collection_name, MANIFEST)
        real_delete_tails = store._delete_tails

        def delete_tails_then_a_racing_insert(name: str, rows: Any, written_at: int) -> None:
            real_delete_tails(name, rows, written_at)
            if not getattr(delete_tails_then_a_racing_insert, "done", False):
                delete_tails_then_a_racing_insert.done = True  # type: ignore[attr-defined]
                older = version("d", "older", 3, 10)[1]  # chunk 1 of another client's version
                entity = older.to_entity(written_at - 5, tenant_field=store.tenant_aware(collection_name))
                store.client.insert(collection_name, [entity])

        monkeypatch.setattr(store, "_delete_tails", delete_tails_then_a_racing_insert)
        store.write_documents(collection_name, version("d", "newer", 3, 20))
        assert store.count(collection_name, 'doc_id == "d"') == 3  # one row per chunk id
        rows = store.document_rows(collection_name, ["d"], ["chunk_index", "content_hash"], tenant=None)
        assert [(int(r["chunk_index"]), r["content_hash"]) for r in rows] == [(i, "newer") for i in range(3)]
        unlimited = store.client.query(collection_name, filter='doc_id == "d"',  # the other query path agrees
                                       output_fields=["chunk_index", "content_hash"], consistency_level="Strong")
        assert sorted((int(r["chunk_index"]), r["content_hash"]) for r in unlimited) == [(i, "newer") for i in range(3)]
    finally:
        store.close()
