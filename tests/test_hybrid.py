"""Hybrid retrieval: BM25 computed by Milvus, dense/lexical/hybrid modes, fusion, one hit per document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from semsearch.encoders import TorchEncoder
from semsearch.fusion import Fusion, fuse
from semsearch.manifest import ModelManifest
from semsearch.store import (
    ChunkRow,
    Hit,
    MilvusStore,
    RetrieverScore,
    capabilities_of,
    versioned_name,
)
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService

REPO = Path(__file__).resolve().parent.parent
DIM = 8
MANIFEST = ModelManifest(name="t", version="t-v1", pooling="cls", dimension=DIM, max_tokens=64)
FAQ = {
    "refund": "如何申请退款？退款一般三个工作日到账",
    "invoice": "发票抬头写错了可以修改吗",
    "parcel": "包裹显示运输中好几天没有更新",
    "password": "忘记登录密码怎么找回",
    "code": "型号 XK-2049 的路由器无法连接网络",
}


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def crowded_rows() -> list[ChunkRow]:
    """A 50-chunk document whose every chunk is closer to the query (and richer in its words) than others."""
    query = unit(0)
    rows = [ChunkRow("big", i, f"退款 退款 退款 第{i}段", (query + 0.01 * unit(100 + i)) / np.linalg.norm(
        query + 0.01 * unit(100 + i))) for i in range(50)]
    rows += [ChunkRow(f"small{n}", 0, f"退款 说明 {n}", (query + 0.5 * unit(n + 1)) / np.linalg.norm(
        query + 0.5 * unit(n + 1))) for n in range(6)]
    return rows


def test_capabilities_follow_the_server_version() -> None:
    assert capabilities_of("milvus_lite-3.2.2").bm25 and not capabilities_of("milvus_lite-3.2.2").grouping
    old = capabilities_of("v2.3.5")
    assert (old.bm25, old.grouping) == (False, False)
    assert (capabilities_of("v2.4.9").bm25, capabilities_of("v2.4.9").grouping) == (False, True)
    assert capabilities_of("v2.5.4").bm25


def test_fusion_rrf_and_weighted() -> None:
    def hit(doc: str, score: float, retriever: str, rank: int) -> Hit:
        return Hit(doc, 0, score, doc, {}, (RetrieverScore(retriever, score, rank),))

    dense = [hit("a", 0.9, "dense", 1), hit("b", 0.8, "dense", 2)]
    lexical = [hit("b", 7.0, "lexical", 1), hit("c", 3.0, "lexical", 2)]
    fused = fuse({"dense": dense, "lexical": lexical}, Fusion(rrf_k=60), 3)
    assert [h.doc_id for h in fused] == ["b", "a", "c"]  # found by both beats first of one
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)
    assert [(r.retriever, r.rank) for r in fused[0].retrievers] == [("dense", 2), ("lexical", 1)]
    weighted = fuse({"dense": dense, "lexical": lexical}, Fusion(method="weighted", dense_weight=1.0,
                                                                 lexical_weight=0.0), 3)
    assert [h.doc_id for h in weighted][:2] == ["a", "b"]
    assert weighted[0].score == pytest.approx((0.9 + 1) / 2)


@pytest.mark.parametrize("mode", ["dense", "lexical"])
def test_a_fifty_chunk_document_does_not_crowd_out_others(
    mode: str, tmp_path: Path, store_factory: Callable[[str], MilvusStore]
) -> None:
    store = store_factory(str(tmp_path / "m.db"))
    store.create_collection("c", MANIFEST)
    store.write_documents("c", crowded_rows())
    for top_k in (2, 5, 7):
        if mode == "dense":
            (hits,) = store.search("c", unit(0)[None, :], top_k=top_k, per_document=True)
        else:
            (hits,) = store.search("c", texts=["退款"], top_k=top_k, per_document=True)
        assert len(hits) == top_k, top_k  # top_k distinct documents (7 = every document there is)
        assert len({h.doc_id for h in hits}) == top_k
        assert hits[0].doc_id == "big"
        assert [h.retrievers[0].rank for h in hits] == list(range(1, top_k + 1))
    (hits,) = store.search("c", unit(0)[None, :], top_k=20, per_document=True)
    assert len(hits) == 7  # exhausted: every document once


@pytest.mark.parametrize("mode", ["dense", "lexical"])
def test_hybrid_candidates_fetch_only_the_rows_they_need(
    mode: str, tmp_path: Path, store_factory: Callable[[str], MilvusStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`enough`: up to top_k documents, but `enough` suffice, so the first search asks for top_k rows (not
    3x more) and searches again only while fewer than `enough` documents came back."""
    store = store_factory(str(tmp_path / "m.db"))
    store.create_collection("c", MANIFEST)
    store.write_documents("c", crowded_rows())
    limits: list[int] = []
    search = store.client.search

    def recording(*args: object, **kwargs: object) -> object:
        limits.append(int(kwargs["limit"]))  # type: ignore[call-overload]
        return search(*args, **kwargs)

    monkeypatch.setattr(store.client, "search", recording)

    def run(top_k: int, enough: int | None) -> list[Hit]:
        limits.clear()
        if mode == "dense":
            (hits,) = store.search("c", unit(0)[None, :], top_k=top_k, per_document=True, enough=enough)
        else:
            (hits,) = store.search("c", texts=["退款"], top_k=top_k, per_document=True, enough=enough)
        return hits

    # The big document's 50 chunks come first: 6 rows hold one document, 24 still one, 96 all seven.
    hits = run(6, 3)
    assert limits == [6, 24, 96]
    assert len(hits) == 6 and len({h.doc_id for h in hits}) == 6 and hits[0].doc_id == "big"
    hits = run(6, None)  # without it: 3x oversampling from the start
    assert limits == [18, 72] and len(hits) == 6
    hits = run(60, 1)  # one document suffices: one search of 60 rows, every document they hold
    assert limits == [60]
    assert hits[0].doc_id == "big" and len(hits) == len({h.doc_id for h in hits}) >= 2


def test_lexical_search_through_a_second_process_on_the_shared_lite_directory(
    tmp_path: Path, store_factory: Callable[[str], MilvusStore]
) -> None:
    uri = str(tmp_path / "m.db")
    store = store_factory(uri)
    store.create_collection("c", MANIFEST)
    store.write_documents("c", [ChunkRow(doc, 0, text, unit(n)) for n, (doc, text) in enumerate(FAQ.items())])
    store.flush("c")
    script = (
        "from semsearch.store import MilvusStore\n"
        f"s = MilvusStore({uri!r}, timeout_s=60)\n"
        "(hits,) = s.search('c', texts=['XK-2049 连不上网'], top_k=2, per_document=True)\n"
        "print(s.is_lite, s.collection_info('c').lexical, hits[0].doc_id)\n"
        "s.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "code"]


def _index_faq(service: LiveService) -> None:
    docs = [pb.Document(id=doc, text=text) for doc, text in FAQ.items()]
    long_text = "。".join(f"退款政策第{i}条：退款需要审核" for i in range(60)) + "。"
    docs.append(pb.Document(id="policy", text=long_text))
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=docs), timeout=120)


@pytest.fixture
def faq_service(make_service: Callable[..., LiveService], minilm_encoder: TorchEncoder) -> LiveService:
    service = make_service(minilm_encoder)
    _index_faq(service)
    return service


def test_three_modes_over_grpc(faq_service: LiveService) -> None:
    stub = faq_service.stub
    request = pb.SearchDocumentsRequest(query="XK-2049 路由器", top_k=3)
    default = stub.SearchDocuments(request, timeout=60)
    # retrieval_mode auto on an untuned collection with BM25: hybrid with the safe default fusion.
    assert default.mode == pb.RETRIEVAL_MODE_HYBRID and default.retrieval_source == "default"
    assert (default.fusion.method, default.fusion.dense_weight) == (pb.FUSION_METHOD_MINMAX, pytest.approx(0.5))
    lexical = stub.SearchDocuments(pb.SearchDocumentsRequest(query="XK-2049 路由器", top_k=3,
                                                             mode=pb.RETRIEVAL_MODE_LEXICAL), timeout=60)
    assert lexical.mode == pb.RETRIEVAL_MODE_LEXICAL
    assert lexical.hits[0].id == "code"  # the exact product code
    assert all(h.retrievers[0].retriever == pb.RETRIEVAL_MODE_LEXICAL for h in lexical.hits)
    assert lexical.hits[0].score == pytest.approx(lexical.hits[0].retrievers[0].score) and lexical.hits[0].score > 0
    hybrid = stub.SearchDocuments(pb.SearchDocumentsRequest(
        query="XK-2049 路由器", top_k=6, mode=pb.RETRIEVAL_MODE_HYBRID,
        fusion=pb.FusionOptions(method=pb.FUSION_METHOD_RRF, rrf_k=60, dense_weight=0.5, lexical_weight=0.5)),
        timeout=60)
    assert hybrid.mode == pb.RETRIEVAL_MODE_HYBRID
    assert hybrid.hits[0].id == "code"
    ids = [h.id for h in hybrid.hits]
    assert len(ids) == len(set(ids)) == 6  # one hit per document, top_k of them
    both = [h for h in hybrid.hits if len(h.retrievers) == 2]
    assert both and {r.retriever for r in both[0].retrievers} == {pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_LEXICAL}
    for h in hybrid.hits:  # classic RRF, k 60
        assert h.score == pytest.approx(sum(1 / (60 + r.rank) for r in h.retrievers), rel=1e-5)
    weighted = stub.SearchDocuments(pb.SearchDocumentsRequest(
        query="XK-2049 路由器", top_k=3, mode=pb.RETRIEVAL_MODE_HYBRID,
        fusion=pb.FusionOptions(method=pb.FUSION_METHOD_WEIGHTED, dense_weight=0.2, lexical_weight=0.8)), timeout=60)
    assert 0 < weighted.hits[0].score <= 1.0
    # The 60-chunk policy document matches 退款 in every chunk and still takes one place.
    refund = stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=3, mode=pb.RETRIEVAL_MODE_LEXICAL),
                                  timeout=60)
    assert [h.id for h in refund.hits].count("policy") == 1 and len(refund.hits) == 2  # only 2 contain 退款
    chunks = stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=5, mode=pb.RETRIEVAL_MODE_LEXICAL,
                                                            return_chunks=True), timeout=60)
    assert len(chunks.hits) == 5
    batch = stub.BatchSearchDocuments(pb.BatchSearchDocumentsRequest(requests=[
        pb.SearchDocumentsRequest(query="忘记密码", top_k=2, mode=pb.RETRIEVAL_MODE_LEXICAL),
        pb.SearchDocumentsRequest(query="发票抬头", top_k=2, mode=pb.RETRIEVAL_MODE_HYBRID),
        pb.SearchDocumentsRequest(query="包裹", top_k=2, mode=pb.RETRIEVAL_MODE_DENSE),
    ]), timeout=60)
    assert [r.mode for r in batch.responses] == [pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID,
                                                 pb.RETRIEVAL_MODE_DENSE]
    assert batch.responses[0].hits[0].id == "password" and batch.responses[1].hits[0].id == "invoice"


def test_bad_retrieval_input(faq_service: LiveService) -> None:
    stub = faq_service.stub
    bad = [
        (pb.SearchDocumentsRequest(query="退款", mode=7), "mode"),  # type: ignore[arg-type]
        (pb.SearchDocumentsRequest(query="退款", mode=pb.RETRIEVAL_MODE_HYBRID,
                                   fusion=pb.FusionOptions(rrf_k=20000)), "fusion.rrf_k"),
        (pb.SearchDocumentsRequest(query="退款", mode=pb.RETRIEVAL_MODE_HYBRID,
                                   fusion=pb.FusionOptions(dense_weight=1.5)), "fusion.dense_weight"),
        (pb.SearchDocumentsRequest(query="退款", mode=pb.RETRIEVAL_MODE_HYBRID,
                                   fusion=pb.FusionOptions(lexical_weight=float("nan"))), "fusion.lexical_weight"),
        (pb.SearchDocumentsRequest(query="退款", fusion=pb.FusionOptions(method=9)), "fusion.method"),  # type: ignore[arg-type]
    ]
    for request, name in bad:
        with pytest.raises(grpc.RpcError) as info:
            stub.SearchDocuments(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert name in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        stub.BatchSearchDocuments(pb.BatchSearchDocumentsRequest(requests=[
            pb.SearchDocumentsRequest(query="退款"), pb.SearchDocumentsRequest(query="退款", mode=5)]), timeout=30)  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "requests[1].mode" in (info.value.details() or "")
    for mode in (pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID):
        nothing = stub.SearchDocuments(pb.SearchDocumentsRequest(query="？！……的", mode=mode), timeout=30)
        if mode == pb.RETRIEVAL_MODE_LEXICAL:
            assert list(nothing.hits) == []  # tokenizes to nothing: no hits, not an error
        else:
            assert all(len(h.retrievers) == 1 and h.retrievers[0].retriever == pb.RETRIEVAL_MODE_DENSE
                       for h in nothing.hits)


def test_default_mode_is_a_setting(make_service: Callable[..., LiveService], minilm_encoder: TorchEncoder) -> None:
    service = make_service(minilm_encoder, retrieval_mode="hybrid", fusion="weighted")
    _index_faq(service)
    response = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="XK-2049", top_k=2), timeout=60)
    assert response.mode == pb.RETRIEVAL_MODE_HYBRID and response.hits[0].id == "code"
    assert 0 < response.hits[0].score <= 1.0  # weighted: normalized scores


def test_a_collection_without_bm25_serves_dense_and_upgrades_by_promotion(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder, tiny_model_dir: Path, tmp_path: Path,
) -> None:
    uri = str(tmp_path / "milvus.db")
    # A collection as semsearch made them before lexical retrieval: no BM25 field.
    old = MilvusStore(uri, timeout_s=60, lexical_analyzer="none")
    physical = versioned_name("docs", tiny_encoder.manifest.version)
    old.create_collection(physical, tiny_encoder.manifest)
    old.point_alias("docs", physical)
    vectors = tiny_encoder.encode_documents(list(FAQ.values()))
    old.write_documents(physical, [ChunkRow(doc, 0, text, vector)
                                   for (doc, text), vector in zip(FAQ.items(), vectors, strict=True)])
    assert not old.collection_info(physical).lexical

    service = make_service(tiny_encoder, milvus_uri=uri, registry_poll_s=0.2)
    dense = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="XK-2049", top_k=2), timeout=60)
    assert dense.mode == pb.RETRIEVAL_MODE_DENSE and len(dense.hits) == 2
    with pytest.raises(grpc.RpcError) as info:
        service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="XK-2049", mode=pb.RETRIEVAL_MODE_HYBRID),
                                     timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "semsearch promote" in (info.value.details() or "") and "no BM25 field" in (info.value.details() or "")

    # The documented upgrade: promote the same model; the copy goes into a new collection with the BM25 function.
    result = subprocess.run(
        [sys.executable, "-m", "semsearch", "promote", str(tiny_model_dir), "--collection", "docs",
         "--milvus-uri", uri, "--force"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "SEMSEARCH_REGISTRY_POLL_S": "0.2"},
    )
    assert result.returncode == 0, result.stderr
    lexical = None
    for _ in range(100):
        try:
            lexical = service.stub.SearchDocuments(pb.SearchDocumentsRequest(
                query="XK-2049 路由器", top_k=2, mode=pb.RETRIEVAL_MODE_LEXICAL), timeout=60)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            time.sleep(0.2)
    assert lexical is not None, "the service never picked up the upgraded collection"
    assert lexical.hits[0].id == "code" and lexical.collection == f"{physical}__bm25"
    old.close()


@pytest.mark.milvus_server
def test_milvus_2_3_refuses_lexical_and_keeps_dense(
    milvus_server_uri: str, collection_name: str, make_service: Callable[..., LiveService],
    minilm_encoder: TorchEncoder, store_factory: Callable[[str], MilvusStore],
) -> None:
    store = store_factory(milvus_server_uri)
    assert not store.capabilities().bm25 and not store.capabilities().grouping
    store.create_collection(collection_name, MANIFEST)  # creating still works: no BM25 field there
    assert not store.collection_info(collection_name).lexical
    store.write_documents(collection_name, crowded_rows())
    for top_k in (2, 5):  # no grouping search on 2.3: fetched until top_k documents
        (hits,) = store.search(collection_name, unit(0)[None, :], top_k=top_k, per_document=True)
        assert len({h.doc_id for h in hits}) == len(hits) == top_k

    service = make_service(minilm_encoder, milvus_uri=milvus_server_uri, collection=collection_name + "_svc")
    _index_faq(service)
    dense = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="忘记密码", top_k=3), timeout=60)
    assert dense.mode == pb.RETRIEVAL_MODE_DENSE and len(dense.hits) == 3
    for mode in (pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID):
        with pytest.raises(grpc.RpcError) as info:
            service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="忘记密码", mode=mode), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "v2.3.5" in (info.value.details() or "") and "dense retrieval works" in (info.value.details() or "")


@pytest.mark.slow
def test_train_evaluate_ranks_every_mode_through_milvus(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [
        {"query": "XK-2049 路由器连不上", "pos": ["型号 XK-2049 的路由器无法连接网络"],
         "neg": ["忘记登录密码怎么找回"]},
        {"query": "密码忘了", "pos": ["忘记登录密码怎么找回"], "neg": ["发票抬头写错了可以修改吗"]},
        {"query": "发票抬头错了", "pos": ["发票抬头写错了可以修改吗"], "neg": ["包裹显示运输中好几天没有更新"]},
    ]
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "semsearch", "train", "evaluate", "--data", str(data), "--model",
         f"tiny={tiny_model_dir}", "--out-dir", str(out), "--retrieval", "dense,lexical,hybrid",
         "--fusions", "dbsf:0.1:0.9,minmax:0.5:0.5"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    retrieval = report["models"][0]["retrieval"]
    assert set(retrieval) == {"dense", "lexical", "hybrid", "hybrid dbsf 0.1/0.9", "hybrid minmax 0.5/0.5"}
    assert set(retrieval["lexical"]) == {"test", "global"}
    # The random tiny model ranks by chance; BM25 over jieba words finds every paraphrase sharing words.
    assert retrieval["lexical"]["test"]["metrics"]["hit@1"] == 1.0
    assert "tiny · hybrid (Milvus)" in result.stdout and "tiny · hybrid dbsf 0.1/0.9 (Milvus)" in result.stdout
    # The best hybrid is named and checked against the better half (lexical here), per pool.
    tuned = report["models"][0]["tuned"]["test"]
    assert tuned["best_single"] == "lexical" and tuned["fusion"] in retrieval
    assert "best hybrid **" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "semsearch", "train", "evaluate", "--data", str(data), "--out-dir", str(out),
         "--retrieval", "dense,bm25"], capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert bad.returncode == 2 and "bm25" in bad.stderr
