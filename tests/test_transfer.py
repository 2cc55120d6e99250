"""`semsearch export` / `import`: a Lite collection moved to another Lite directory and to the real
Milvus server keeps its rows, vectors, model record and serving pair; broken exports and another
model's collection are refused before anything is written."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from semsearch.config import Settings
from semsearch.errors import ModelMismatchError
from semsearch.manifest import ModelManifest
from semsearch.registry import ModelRegistry
from semsearch.store import ChunkRow, MilvusStore, versioned_name
from semsearch.transfer import (
    MANIFEST_NAME,
    IncompleteExportError,
    export_collection,
    import_collection,
    read_export,
    target_store,
)

DIM = 16
MANIFEST = ModelManifest(name="t", version="t-v1", pooling="cls", dimension=DIM, max_tokens=64)
OTHER = ModelManifest(name="t", version="t-v2", pooling="cls", dimension=DIM, max_tokens=64)
DOCS = 100  # x 3 chunks = 300 rows
NAME = "docs"


def vectors(seed: int, n: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def source(tmp_path: Path, store_factory: Callable[[str], MilvusStore]) -> MilvusStore:
    """A Lite collection as the service leaves it: versioned collection, alias, registry pair."""
    store = store_factory(str(tmp_path / "source.db"))
    physical = versioned_name(NAME, MANIFEST.version)
    store.ensure_collection(physical, MANIFEST)
    store.point_alias(NAME, physical)
    vecs = vectors(1, DOCS * 3)
    rows = [ChunkRow(doc_id=f"文档-{d}", chunk_index=c, text=f"第{d}篇 第{c}段 退款 配送", vector=vecs[d * 3 + c],
                     metadata={"category": ("refund", "shipping")[d % 2], "n": d}, content_hash=f"h{d}",
                     char_offset=c * 10, tenant=("", "acme")[d % 2])
            for d in range(DOCS) for c in range(3)]
    for lo in range(0, len(rows), 120):  # several write times: updated_at must survive per row
        store.upsert(physical, rows[lo:lo + 120], written_at=1_700_000_000_000 + lo)
    store.flush(physical)
    ModelRegistry(store).bootstrap(NAME, MANIFEST, physical)
    return store


@pytest.fixture
def targets() -> Iterator[Callable[[str, dict], MilvusStore]]:
    opened: list[MilvusStore] = []

    def make(uri: str, export: dict) -> MilvusStore:
        store = target_store(Settings(milvus_timeout_s=30), uri, export)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def top10(store: MilvusStore, name: str) -> list[list[tuple[str, int]]]:
    hits = store.search(name, vectors(7, 10), top_k=10)
    return [[(hit.doc_id, hit.chunk_index) for hit in query] for query in hits]


def test_export_then_import_keeps_rows_vectors_and_pair(
        source: MilvusStore, milvus_uri: str, collection_name: str, tmp_path: Path,
        targets: Callable[[str, dict], MilvusStore]) -> None:
    out = tmp_path / "export"
    manifest = export_collection(source, NAME, out, shard_rows=128)
    assert (manifest["rows"], len(manifest["shards"]), manifest["model_version"]) == (300, 3, "t-v1")
    target_uri = milvus_uri if "://" in milvus_uri else str(tmp_path / "target.db")
    target = targets(target_uri, read_export(out))
    report = import_collection(target, out, collection_name)
    assert (report.rows, report.written, report.skipped, report.verified_vectors) == (300, 300, 0, 100)
    info = target.collection_info(collection_name)
    assert (info.model_version, info.dimension, info.tenants) == ("t-v1", DIM, True)
    assert top10(target, collection_name) == top10(source, NAME)
    copied = {r["id"]: r for r in target.iter_rows(info.name, ["id", "tenant", "metadata", "updated_at", "text"])}
    original = {r["id"]: r for r in source.iter_rows(NAME, ["id", "tenant", "metadata", "updated_at", "text"])}
    assert copied == original
    record = ModelRegistry(target).get(collection_name)
    assert record is not None and record.current is not None
    assert (record.current.model_version, record.current.collection) == ("t-v1", info.name)
    again = import_collection(target, out, collection_name)  # a re-run (resume) writes nothing twice
    assert (again.written, again.skipped) == (0, 300)


def test_incomplete_export_is_refused_and_nothing_is_created(
        source: MilvusStore, tmp_path: Path, targets: Callable[[str, dict], MilvusStore]) -> None:
    out = tmp_path / "export"
    export = export_collection(source, NAME, out, shard_rows=128)
    target = targets(str(tmp_path / "target.db"), export)
    shard = out / export["shards"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # killed while copying a shard
    with pytest.raises(IncompleteExportError, match=r"rows-00001\.parquet"):
        import_collection(target, out, "restored")
    (out / MANIFEST_NAME).unlink()  # killed before the manifest was written
    with pytest.raises(IncompleteExportError, match=r"no export\.json"):
        import_collection(target, out, "restored")
    assert not target.has_collection("restored")
    result = CliRunner().invoke(_cli_app(), ["import", str(out), "--milvus-uri", str(tmp_path / "target.db")])
    assert result.exit_code == 1 and "no export.json" in result.output


def test_import_into_another_models_collection_is_refused(
        source: MilvusStore, tmp_path: Path, targets: Callable[[str, dict], MilvusStore]) -> None:
    out = tmp_path / "export"
    export = export_collection(source, NAME, out)
    target = targets(str(tmp_path / "target.db"), export)
    target.ensure_collection("restored", OTHER)
    with pytest.raises(ModelMismatchError, match=r"model t-v2 \(dim 16\).*model t-v1 \(dim 16\)"):
        import_collection(target, out, "restored")
    assert target.count("restored") == 0


def _cli_app():  # type: ignore[no-untyped-def]
    import typer

    from semsearch import transfer

    app = typer.Typer()
    transfer.register(app)
    return app
