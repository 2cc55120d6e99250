"""The shared ingest path (semsearch/ingest.py, semsearch/text.py): checks, text rules and their
record in the collection, and the service and the indexer storing the same rows through it."""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import typer
from typer.testing import CliRunner

from indexer.cli import register
from indexer.job import IndexOptions, run_index
from indexer.pipeline import PipelineConfig
from semsearch.encoders import TorchEncoder
from semsearch.errors import InvalidInputError, ModelMismatchError
from semsearch.ingest import (
    MAX_METADATA_DEPTH,
    IngestError,
    Planner,
    check_id,
    check_metadata,
    check_query,
    check_text,
    rules_of,
)
from semsearch.store import MAX_ID_BYTES, TEXT_RULES_PROPERTY, CollectionInfo, MilvusStore, versioned_name
from semsearch.store import schema as store_module
from semsearch.text import INVISIBLE_RANGES, LEGACY_TEXT_RULES, TEXT_RULES, normalize
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService

# What real customer-service text carries: a backspace, zero-width joiners, a BOM, CR LF.
DIRTY = "\ufeff如何\x08申请\u200d退款？\r\n他说：“可以退款。”然后……好吧？！"
CLEAN = "如何申请退款？\n他说：“可以退款。”然后……好吧？！"
LONG_ID = "中" * 171  # 171 characters, 513 UTF-8 bytes


# ---------------------------------------------------------------------------------------- rules
def test_normalisation_removes_invisible_characters_and_keeps_the_rest() -> None:
    assert normalize(DIRTY) == CLEAN
    assert normalize("a\tb\nc\u3000d\u00a0e，？") == "a\tb\nc\u3000d\u00a0e，？"  # no NFKC: full width kept
    assert normalize("x\ry\x85z\u2060\u200b\u200c\U000e0041") == "x\nyz"
    assert normalize(CLEAN) == CLEAN  # idempotent


def test_removed_characters_are_exactly_controls_and_format_characters() -> None:
    removed = {code for first, last in INVISIBLE_RANGES for code in range(first, last + 1)}
    for code in removed:
        assert unicodedata.category(chr(code)) in ("Cc", "Cf"), hex(code)
    for code in range(0x30000):  # every Cc/Cf of the BMP and the first planes is removed
        if unicodedata.category(chr(code)) in ("Cc", "Cf") and chr(code) not in "\t\n":
            assert code in removed, hex(code)


def test_normalisation_changes_no_vector(tiny_encoder: TorchEncoder) -> None:
    # BERT tokenizers drop these characters themselves: only the stored text changes.
    dirty = DIRTY.replace("\r\n", "\n")
    vectors = tiny_encoder.encode_documents([dirty, normalize(dirty)])
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1.0, abs=1e-5)


def test_rules_of_a_collection() -> None:
    def info(rules: str) -> CollectionInfo:
        return CollectionInfo("c", "m", 8, {}, text_rules=rules)

    assert rules_of(info("2")) is TEXT_RULES
    assert rules_of(CollectionInfo("c", "m", 8, {})) is LEGACY_TEXT_RULES  # no record: legacy
    with pytest.raises(ModelMismatchError, match="text rules version '99'"):
        rules_of(info("99"))


# ---------------------------------------------------------------------------------------- checks
def test_ids_are_limited_in_bytes_the_store_can_hold() -> None:
    assert check_id("中" * 170) == "中" * 170  # 510 bytes
    assert check_id("a" * MAX_ID_BYTES)
    for bad, reason in ((LONG_ID, "513 bytes"), ("a" * (MAX_ID_BYTES + 1), "longer than 512 bytes"),
                        ("x\udc80", "lone surrogates"), ("a\x08b", "control"), (" a", "whitespace"), ("", "empty")):
        with pytest.raises(IngestError, match=reason) as info:
            check_id(bad)
        assert info.value.kind == "bad_id" and isinstance(info.value, InvalidInputError)


def test_text_and_query_checks() -> None:
    assert check_query("\x08退款\u200d", 100) == "\x08退款\u200d"  # accepted; normalised when searched
    assert check_text(DIRTY, 100) == DIRTY
    cases: list[tuple[Callable[[], object], str, str]] = [
        (lambda: check_text("退\udc80款", 100), "not_utf8", "lone surrogates"),
        (lambda: check_text("\u200b\x08 \ufeff", 100), "missing_text", "text is empty"),
        (lambda: check_query("\u200d", 100), "missing_text", "query is empty"),
        (lambda: check_text("退" * 101, 100), "text_too_long", "101 characters; the limit is 100"),
    ]
    for call, kind, reason in cases:
        with pytest.raises(IngestError, match=reason) as info:
            call()
        assert info.value.kind == kind


def test_metadata_checks() -> None:
    deep: dict[str, Any] = {"v": 1}
    for _ in range(MAX_METADATA_DEPTH):
        deep = {"n": deep}
    assert check_metadata({"a": [1, {"b": "c"}]}, 100) == {"a": [1, {"b": "c"}]}
    cases: list[tuple[Any, str, str]] = [
        ([1, 2], "bad_metadata", "not a JSON object"),
        (deep, "bad_metadata", "nested deeper than 8"),
        ({"x": math.nan}, "bad_metadata", "NaN"),
        ({"x": "\udc80"}, "not_utf8", "lone surrogates"),
        ({"x": "字" * 40}, "metadata_too_large", "bytes as JSON; the limit is 100"),
    ]
    for value, kind, reason in cases:
        with pytest.raises(IngestError, match=reason) as info:
            check_metadata(value, 100)
        assert info.value.kind == kind


def test_planner_normalises_chunks_and_maps_rows(tiny_encoder: TorchEncoder) -> None:
    planner = Planner(TEXT_RULES, tiny_encoder.count_tokens, 24)
    planned = planner.plan("d", DIRTY * 3, {"k": 1})
    assert planned.text == CLEAN * 3 and len(planned.chunks) > 1
    assert all(not chunk.text.startswith("”") for chunk in planned.chunks)
    rows = planned.rows(tiny_encoder.encode_documents([c.text for c in planned.chunks]))
    assert [(r.doc_id, r.chunk_index, r.char_offset, r.text) for r in rows] == [
        ("d", c.index, c.start, c.text) for c in planned.chunks]
    assert {r.content_hash for r in rows} == {planned.content_hash}
    legacy = Planner(LEGACY_TEXT_RULES, tiny_encoder.count_tokens, 24).plan("d", DIRTY * 3, {"k": 1})
    assert legacy.text == DIRTY * 3 and legacy.content_hash != planned.content_hash


# ---------------------------------------------------------------------------------------- service + indexer
DOCS: list[dict[str, Any]] = [
    {"id": "dirty", "text": DIRTY * 30, "metadata": {"k": 1}},
    {"id": "quotes", "text": "他说：“可以退款。”然后我们处理了订单……好吧？！" * 40, "metadata": {}},
    {"id": "short", "text": "发票抬头写错能改吗", "metadata": {"k": 2}},
]


def _rows(store: MilvusStore, collection: str) -> list[tuple[Any, ...]]:
    rows = store.iter_rows(collection, ["doc_id", "chunk_index", "text", "char_offset", "content_hash"])
    return sorted((r["doc_id"], r["chunk_index"], r["text"], r["char_offset"], r["content_hash"]) for r in rows)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _index(tmp_path: Path, store: MilvusStore, encoder: TorchEncoder, collection: str, source: Path) -> Any:
    options = IndexOptions(inputs=[str(source)], state_dir=tmp_path / "state", progress="off",
                           pipeline=PipelineConfig(batch_chunks=64, checkpoint_interval_s=0.5, retry_timeout_s=20))
    return run_index(options, encoder=encoder, store=store, collection=collection)


def test_service_and_indexer_store_the_same_normalised_rows(
    tmp_path: Path, make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
) -> None:
    uri = str(tmp_path / "milvus.db")
    service = make_service(tiny_encoder, milvus_uri=uri, collection="by_service")
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
        pb.Document(id=d["id"], text=d["text"], metadata=d["metadata"]) for d in DOCS]), timeout=120)
    store = service.running.store
    result = _index(tmp_path, store, tiny_encoder, "by_indexer", _write_jsonl(tmp_path / "docs.jsonl", DOCS))
    assert result.totals["written"] == 3
    by_service, by_indexer = _rows(store, "by_service"), _rows(store, result.collection)
    assert by_service == by_indexer
    assert max(row[1] for row in by_service) >= 2  # long documents were chunked
    assert all("\u200d" not in row[2] and "\x08" not in row[2] for row in by_service)
    for name in ("by_service", result.collection):
        assert store.collection_properties(name)[TEXT_RULES_PROPERTY] == TEXT_RULES.version
    got = service.stub.GetDocument(pb.GetDocumentRequest(id="dirty"), timeout=30).document
    assert got.text == CLEAN * 30  # the normalised text is what is stored


def test_queries_with_invisible_characters_are_accepted_and_find_the_document(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
) -> None:
    service = make_service(tiny_encoder)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
        pb.Document(id="bank", text="如何\x08申请\u200d退款"),
        pb.Document(id="other", text="快递包裹几天没动静"),
    ]), timeout=60)

    def search(query: str) -> list[tuple[str, str, float]]:
        hits = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query=query, top_k=2), timeout=30).hits
        return [(hit.id, hit.text, round(hit.score, 5)) for hit in hits]

    clean = search("如何申请退款")
    assert clean[0][:2] == ("bank", "如何申请退款")
    # Refused as "control characters" before; now normalised like the documents: the same vector.
    assert search("如何\x08申请\u200d退款") == clean
    assert search("\ufeff如何申请退\u200b款\x7f") == clean
    with pytest.raises(grpc.RpcError) as info:
        service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="\u200b\x08"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query is empty" in (info.value.details() or "")


def _legacy_collection(store: MilvusStore, name: str, encoder: TorchEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection exactly as semsearch made it before text rules were recorded."""
    current = store_module.model_record
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "model_record", lambda manifest, text_rules="": {
            key: value for key, value in current(manifest).items() if key != TEXT_RULES_PROPERTY})
        store.ensure_collection(name, encoder.manifest)
    assert TEXT_RULES_PROPERTY not in store.collection_properties(name)


def test_a_collection_without_the_record_keeps_the_legacy_rules(
    tmp_path: Path, make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder,
    store_factory: Callable[[str], MilvusStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = str(tmp_path / "milvus.db")
    store = store_factory(uri)
    _legacy_collection(store, "old", tiny_encoder, monkeypatch)  # left open: the service attaches to it
    service = make_service(tiny_encoder, milvus_uri=uri, collection="old")
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
        pb.Document(id="dirty", text=DIRTY), pb.Document(id="other", text="快递包裹几天没动静")]), timeout=60)
    # Stored as before the change (text as given), so the collection never mixes two rules...
    assert service.stub.GetDocument(pb.GetDocumentRequest(id="dirty"), timeout=30).document.text == DIRTY
    # ...and still serves: a query with a control character is accepted now, and finds it.
    hits = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query=DIRTY, top_k=1), timeout=30).hits
    assert hits[0].id == "dirty"
    store = service.running.store
    assert TEXT_RULES_PROPERTY not in store.collection_properties("old")  # not silently upgraded
    # The indexer writing into it follows the same legacy rules.
    source = _write_jsonl(tmp_path / "more.jsonl", [{"id": "quotes", "text": DOCS[1]["text"]}])
    options = IndexOptions(inputs=[str(source)], state_dir=tmp_path / "state", progress="off",
                           pipeline=PipelineConfig(checkpoint_interval_s=0.5, retry_timeout_s=20))
    result = run_index(options, encoder=tiny_encoder, store=store, collection="old")
    assert result.collection == "old" and result.totals["written"] == 1
    texts = [row[2] for row in _rows(store, "old") if row[0] == "quotes"]
    assert len(texts) > 1 and any(text.startswith("”") for text in texts)  # the legacy splitter's chunks


def test_collections_record_the_current_rules(tmp_path: Path, tiny_encoder: TorchEncoder,
                                              store_factory: Callable[[str], MilvusStore]) -> None:
    store = store_factory(str(tmp_path / "m.db"))
    info = store.ensure_collection("fresh", tiny_encoder.manifest)
    assert info.text_rules == TEXT_RULES.version
    store.set_collection_properties("fresh", {TEXT_RULES_PROPERTY: "99"})
    with pytest.raises(ModelMismatchError, match="upgrade semsearch"):
        rules_of(store.collection_info("fresh"))


# ---------------------------------------------------------------------------------------- id bytes, Lite and server
def _id_limit_through_service_and_indexer(uri: str, tmp_path: Path, make_service: Callable[..., LiveService],
                                          tiny_encoder: TorchEncoder, tiny_model_dir: Path, collection: str) -> None:
    service = make_service(tiny_encoder, milvus_uri=uri, collection=collection)
    with pytest.raises(grpc.RpcError) as info:
        service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
            pb.Document(id="fine", text="好的"), pb.Document(id=LONG_ID, text="文本")]), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "longer than 512 bytes" in (info.value.details() or "")
    for call in (lambda: service.stub.GetDocument(pb.GetDocumentRequest(id=LONG_ID), timeout=30),
                 lambda: service.stub.DeleteDocuments(pb.DeleteDocumentsRequest(ids=[LONG_ID]), timeout=30)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    longest = "中" * 170  # 510 bytes: stored, read back, deleted
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[pb.Document(id=longest, text="文本")]),
                                 timeout=60)
    assert service.stub.GetDocument(pb.GetDocumentRequest(id=longest), timeout=30).document.text == "文本"
    assert service.stub.DeleteDocuments(pb.DeleteDocumentsRequest(ids=[longest]), timeout=30).deleted_count == 1

    source = _write_jsonl(tmp_path / "ids.jsonl", [{"id": "ok-1", "text": "第一条。"},
                                                   {"id": LONG_ID, "text": "太长的编号。"},
                                                   {"id": longest, "text": "最长的编号。"}])
    app = typer.Typer()
    register(app)
    common = [str(source), "--milvus-uri", uri, "--model", str(tiny_model_dir), "--collection", collection + "_idx",
              "--device", "cpu", "--state-dir", str(tmp_path / "state"), "--progress", "off"]
    result = CliRunner().invoke(app, ["index", *common, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["totals"]["written"] == 2 and summary["reasons"] == {"bad_id": 1}
    (reject,) = [json.loads(line) for line in Path(summary["reject_file"]).read_text().splitlines()]
    assert (reject["file"], reject["line"], reject["kind"]) == (str(source), 2, "bad_id")
    assert "longer than 512 bytes" in reject["reason"]
    store = service.running.store
    physical = versioned_name(collection + "_idx", tiny_encoder.manifest.version)
    assert {row[0] for row in _rows(store, physical)} == {"ok-1", longest}
    strict = CliRunner().invoke(app, ["index", *common, "--strict", "--restart"])
    assert strict.exit_code != 0
    assert f"{source}:2: id is longer than 512 bytes" in " ".join(strict.output.split())


def test_id_byte_limit_on_milvus_lite(tmp_path: Path, make_service: Callable[..., LiveService],
                                      tiny_encoder: TorchEncoder, tiny_model_dir: Path) -> None:
    _id_limit_through_service_and_indexer(str(tmp_path / "milvus.db"), tmp_path, make_service, tiny_encoder,
                                          tiny_model_dir, "ids")


@pytest.mark.milvus_server
def test_id_byte_limit_on_the_milvus_server(tmp_path: Path, make_service: Callable[..., LiveService],
                                            tiny_encoder: TorchEncoder, tiny_model_dir: Path,
                                            milvus_server_uri: str, collection_name: str) -> None:
    _id_limit_through_service_and_indexer(milvus_server_uri, tmp_path, make_service, tiny_encoder,
                                          tiny_model_dir, collection_name)
