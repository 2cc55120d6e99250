"""The Milvus store on Milvus Lite and on the real Milvus server."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from semsearch.errors import InvalidInputError, ModelMismatchError, NotFoundError
from semsearch.filters import MetadataFilter, Operator, render_string_in
from semsearch.manifest import ModelManifest
from semsearch.store import ChunkRow, MilvusStore

DIM = 8
MANIFEST = ModelManifest(name="t", version="t-v1", pooling="cls", dimension=DIM, max_tokens=64)


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def row(doc_id: str, seed: int, chunk: int = 0, **metadata: object) -> ChunkRow:
    return ChunkRow(doc_id=doc_id, chunk_index=chunk, text=f"文本 {doc_id} {chunk}", vector=unit(seed),
                    metadata=dict(metadata))


@pytest.fixture
def store(milvus_uri: str, store_factory: Callable[[str], MilvusStore]) -> MilvusStore:
    return store_factory(milvus_uri)


def test_collection_records_its_model_and_refuses_another(store: MilvusStore, collection_name: str) -> None:
    info = store.ensure_collection(collection_name, MANIFEST)
    assert (info.name, info.model_version, info.dimension) == (collection_name, "t-v1", DIM)
    assert store.ensure_collection(collection_name, MANIFEST).model_version == "t-v1"
    with pytest.raises(ModelMismatchError, match="t-v1"):
        store.ensure_collection(collection_name, MANIFEST.model_copy(update={"version": "t-v2"}))
    with pytest.raises(ModelMismatchError):
        store.ensure_collection(collection_name, MANIFEST.model_copy(update={"dimension": 16}))
    with pytest.raises(NotFoundError):
        store.ensure_collection(collection_name + "_missing", MANIFEST, create=False)


def test_upsert_is_idempotent_and_documents_shrink_cleanly(store: MilvusStore, collection_name: str) -> None:
    store.ensure_collection(collection_name, MANIFEST)
    rows = [row("a", 1, 0), row("a", 2, 1), row("a", 3, 2), row("b", 4)]
    store.write_documents(collection_name, rows)
    store.write_documents(collection_name, rows)
    assert store.count(collection_name) == 4
    store.write_documents(collection_name, [row("a", 5, 0)])  # document a now has one chunk
    assert [tuple(c[:3]) for c in store.stored_chunks(collection_name, ["a", "b"])] == [("a#0", "a", 0),
                                                                                     ("b#0", "b", 0)]
    assert store.delete_documents(collection_name, ["a", "missing"]) == 1
    assert store.delete_documents(collection_name, ["a"]) == 0
    assert store.count(collection_name) == 1


def test_chunk_listing_is_complete_past_the_query_window(store: MilvusStore, collection_name: str) -> None:
    store.ensure_collection(collection_name, MANIFEST)
    rows = [row("a", n, n) for n in range(5)] + [row("b", 10), row("c", 11, 0), row("c", 12, 1)]
    store.write_documents(collection_name, rows)
    store.QUERY_WINDOW = 3  # as if Milvus returned at most 3 rows a query: halves, then a scan for "a"
    listed = [(c.doc_id, c.chunk_index) for c in store.stored_chunks(collection_name, ["a", "b", "c"])]
    assert listed == [("a", n) for n in range(5)] + [("b", 0), ("c", 0), ("c", 1)]
    # The service's write and delete paths use the same listing: no chunk past the window survives.
    store.write_documents(collection_name, [row("a", 20, 0)])
    assert store.count(collection_name, render_string_in("doc_id", ["a"])) == 1
    assert store.delete_documents(collection_name, ["c"]) == 1
    assert sorted(r["doc_id"] for r in store.iter_rows(collection_name, ["doc_id"])) == ["a", "b"]


def test_search_ranks_by_cosine_and_filters_by_typed_metadata(store: MilvusStore, collection_name: str) -> None:
    store.ensure_collection(collection_name, MANIFEST)
    store.write_documents(collection_name, [
        row(f"d{i}", i, category="退款" if i % 2 else 'quote"and\\slash', price=i, vip=i % 3 == 0)
        for i in range(20)
    ])
    (hits,) = store.search(collection_name, unit(7)[None], top_k=3)
    assert hits[0].doc_id == "d7" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    by_filter = {
        (Operator.EQ, ("退款",)): {f"d{i}" for i in range(20) if i % 2},
        (Operator.EQ, ('quote"and\\slash',)): {f"d{i}" for i in range(20) if i % 2 == 0},
    }
    for (operator, values), expected in by_filter.items():
        (hits,) = store.search(collection_name, unit(7)[None], top_k=20,
                               filters=[MetadataFilter("category", operator, values)])
        assert {h.doc_id for h in hits} == expected
    (hits,) = store.search(collection_name, unit(7)[None], top_k=20, filters=[
        MetadataFilter("price", Operator.GTE, (10,)), MetadataFilter("vip", Operator.EQ, (True,)),
    ])
    assert {h.doc_id for h in hits} == {"d12", "d15", "d18"}
    (hits,) = store.search(collection_name, unit(7)[None], top_k=20, filters=[
        MetadataFilter("price", Operator.IN, (1, 2, 3)), MetadataFilter("price", Operator.NOT_IN, (2,)),
    ])
    assert {h.doc_id for h in hits} == {"d1", "d3"}


def test_injection_looking_values_match_literally(store: MilvusStore, collection_name: str) -> None:
    store.ensure_collection(collection_name, MANIFEST)
    hostile = '" or 1 == 1 or metadata["x"] == "'
    store.write_documents(collection_name, [row("plain", 1, x="a"), row("hostile", 2, x=hostile)])
    (hits,) = store.search(collection_name, unit(1)[None], top_k=5,
                           filters=[MetadataFilter("x", Operator.EQ, (hostile,))])
    assert [h.doc_id for h in hits] == ["hostile"]
    with pytest.raises(InvalidInputError):
        MetadataFilter('x"] or true or metadata["y', Operator.EQ, ("a",))


def test_alias_points_readers_at_a_collection(store: MilvusStore, collection_name: str) -> None:
    first, second = collection_name + "_v1", collection_name + "_v2"
    store.ensure_collection(first, MANIFEST)
    store.ensure_collection(second, MANIFEST.model_copy(update={"version": "t-v2"}))
    alias = collection_name + "_live"
    store.point_alias(alias, first)
    assert store.resolve(alias) == first
    store.point_alias(alias, second)
    assert store.resolve(alias) == second
    assert store.collection_info(alias).model_version == "t-v2"
    assert store.resolve(collection_name + "_nothing") == ""


def lite_data_files(uri: str) -> list[str]:
    return sorted(path.name for path in Path(uri).rglob("data_*.parquet"))


def test_lite_flushes_a_collection_once_writes_pause(tmp_path: Path) -> None:
    # Unflushed Lite rows are converted one by one on every search: a service flushes after a pause.
    from semsearch.config import Settings

    uri = str(tmp_path / "milvus.db")
    store = MilvusStore.from_settings(Settings(milvus_uri=uri, lite_idle_flush_s=2.0))
    try:
        store.ensure_collection("idle", MANIFEST)
        store.write_documents("idle", [row("a", 1)])
        time.sleep(0.1)
        store.write_documents("idle", [row("b", 2)])  # a write re-arms the pause
        assert lite_data_files(uri) == []
        deadline = time.monotonic() + 10
        while not lite_data_files(uri) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lite_data_files(uri)) == 1  # both writes in one segment
        assert store.count("idle") == 2
        assert [hit.doc_id for hit in store.search("idle", unit(2)[None, :], top_k=1)[0]] == ["b"]
    finally:
        store.close()


def test_lite_without_idle_flush_keeps_small_writes_in_memory(tmp_path: Path) -> None:
    from semsearch.config import Settings

    uri = str(tmp_path / "milvus.db")
    store = MilvusStore.from_settings(Settings(milvus_uri=uri, lite_idle_flush_s=0))
    try:
        store.ensure_collection("idle", MANIFEST)
        store.write_documents("idle", [row("a", 1)])
        time.sleep(1.0)
        assert lite_data_files(uri) == []
    finally:
        store.close()
    assert len(lite_data_files(uri)) == 1  # closing flushes what is pending
