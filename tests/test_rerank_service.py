"""Reranking in the service: real gRPC over loopback, Milvus Lite, a tiny real cross-encoder."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from semsearch.encoders import TorchEncoder
from semsearch.errors import ModelNotFoundError
from semsearch.rerankers import RERANKER_MANIFEST_FILENAME, RerankerManifest, resolve_reranker_manifest
from semsearch.rerankers.local import TorchReranker
from semsearch.v1 import admin_pb2, admin_pb2_grpc
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService
from tests.test_service_grpc import expect_error, seed
from tests.tinymodel import build_tiny_cross_encoder


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "tiny-ce")


@pytest.fixture(scope="session")
def tiny_reranker(tiny_cross_encoder_dir: Path) -> TorchReranker:
    return TorchReranker.from_ref(str(tiny_cross_encoder_dir), device="cpu")


def test_manifest_version_follows_the_weights_and_known_profiles(tmp_path: Path, tiny_cross_encoder_dir: Path) -> None:
    first = resolve_reranker_manifest(tiny_cross_encoder_dir, str(tiny_cross_encoder_dir))
    assert first.name == "tiny-ce" and first.activation == "none" and first.max_length == 128
    other = build_tiny_cross_encoder(tmp_path / "tiny-ce", seed=1)
    assert resolve_reranker_manifest(other, str(other)).version != first.version  # same name, other weights
    profile = build_tiny_cross_encoder(tmp_path / "bge-reranker-v2-m3")
    known = resolve_reranker_manifest(profile, "BAAI/bge-reranker-v2-m3")
    assert (known.name, known.activation, known.max_length) == ("bge-reranker-v2-m3", "sigmoid", 512)
    RerankerManifest(name="mine", version="mine-v7", max_length=64, activation="sigmoid").save(other)
    assert resolve_reranker_manifest(other, str(other)).version == "mine-v7"
    (other / RERANKER_MANIFEST_FILENAME).unlink()
    two_labels = tmp_path / "two"
    build_tiny_cross_encoder(two_labels)
    config = (two_labels / "config.json").read_text().replace('"LABEL_0": 0', '"LABEL_0": 0, "LABEL_1": 1')
    config = config.replace('"0": "LABEL_0"', '"0": "LABEL_0", "1": "LABEL_1"')
    (two_labels / "config.json").write_text(config)
    with pytest.raises(ModelNotFoundError, match="2 output labels"):
        resolve_reranker_manifest(two_labels, str(two_labels))


def test_in_process_scores_are_the_models_logits_in_any_batching(tiny_cross_encoder_dir: Path,
                                                                  tiny_reranker: TorchReranker) -> None:
    query = "如何申请退款"
    texts = ["请在订单页面点击申请退款", "快递包裹几天没动静", "手机开不了机，电池发热怎么办" * 3, "发票"]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_cross_encoder_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_cross_encoder_dir)).eval()
    with torch.inference_mode():
        expected = [float(model(**tokenizer(query, text, return_tensors="pt")).logits[0, 0]) for text in texts]
    got = tiny_reranker.score(query, texts)
    assert got == pytest.approx(expected, abs=1e-5)
    small = TorchReranker(tiny_cross_encoder_dir, tiny_reranker.manifest, device="cpu", batch_size=1)
    assert small.score_pairs([(query, t) for t in texts]) == pytest.approx(expected, abs=1e-5)
    sigmoid = TorchReranker(tiny_cross_encoder_dir, tiny_reranker.manifest.model_copy(update={"activation": "sigmoid"}),
                            device="cpu")
    assert sigmoid.score(query, texts) == pytest.approx([1 / (1 + math.exp(-x)) for x in expected], abs=1e-6)


def _search(service: LiveService, query: str = "退钱怎么操作", **fields: object) -> pb.SearchDocumentsResponse:
    return service.stub.SearchDocuments(pb.SearchDocumentsRequest(query=query, **fields), timeout=60)  # type: ignore[arg-type]


def test_rerank_orders_candidates_by_the_cross_encoder(make_service: Callable[..., LiveService],
                                                        tiny_encoder: TorchEncoder, tiny_cross_encoder_dir: Path,
                                                        tiny_reranker: TorchReranker) -> None:
    service = make_service(tiny_encoder, reranker_model=str(tiny_cross_encoder_dir))
    seed(service, extra=20)
    plain = _search(service, top_k=25)
    assert plain.reranker_version == "" and plain.timing.rerank_ms == 0
    assert all(not hit.HasField("rerank_score") and hit.retrieval_score == hit.score for hit in plain.hits)
    for mode in (pb.RETRIEVAL_MODE_DENSE, pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID):
        response = _search(service, top_k=3, rerank=True, rerank_candidates=25, mode=mode)
        candidates = _search(service, top_k=25, mode=mode).hits
        assert response.reranker_version == tiny_reranker.manifest.version
        assert len(response.hits) == min(3, len(candidates)) and response.timing.rerank_ms > 0
        # The candidates' own cross-encoder scores, in-process: the service returns their top 3.
        scores = tiny_reranker.score("退钱怎么操作", [hit.text for hit in candidates])
        best = sorted(range(len(candidates)), key=lambda i: -scores[i])[:3]
        assert [hit.id for hit in response.hits] == [candidates[i].id for i in best]
        for hit, i in zip(response.hits, best, strict=True):
            assert hit.score == pytest.approx(scores[i], abs=1e-4) and hit.rerank_score == hit.score
            assert hit.retrieval_score == pytest.approx(candidates[i].score, abs=1e-5)
            assert hit.retrieval_rank == i + 1
    # Without text in the answer, the reranker still reads it; the hits just do not carry it.
    dense = _search(service, top_k=3, rerank=True, rerank_candidates=25)
    bare = _search(service, top_k=3, rerank=True, rerank_candidates=25, return_fields=[pb.RETURN_FIELD_METADATA])
    assert [hit.id for hit in bare.hits] == [hit.id for hit in dense.hits]
    assert all(hit.text == "" for hit in bare.hits) and all(hit.text for hit in dense.hits)
    # 0 candidates: the setting (50), at least top_k.
    assert len(_search(service, top_k=5, rerank=True).hits) == 5
    state = admin_pb2_grpc.AdminServiceStub(service.channel).GetServingState(admin_pb2.GetServingStateRequest())
    assert state.reranker_version == tiny_reranker.manifest.version


def test_rerank_needs_a_reranker_and_candidates_within_limits(make_service: Callable[..., LiveService],
                                                              tiny_encoder: TorchEncoder,
                                                              tiny_cross_encoder_dir: Path) -> None:
    bare = make_service(tiny_encoder)
    seed(bare)
    expect_error(lambda: _search(bare, rerank=True), grpc.StatusCode.FAILED_PRECONDITION, "no reranker")
    assert _search(bare).hits  # plain search unaffected
    service = make_service(tiny_encoder, reranker_model=str(tiny_cross_encoder_dir), max_rerank_candidates=30,
                           collection="docs2")
    seed(service)
    expect_error(lambda: _search(service, top_k=10, rerank=True, rerank_candidates=5),
                 grpc.StatusCode.INVALID_ARGUMENT, "between top_k (10) and max_rerank_candidates (30)")
    expect_error(lambda: _search(service, top_k=10, rerank=True, rerank_candidates=31),
                 grpc.StatusCode.INVALID_ARGUMENT, "max_rerank_candidates (30)")
    batch = pb.BatchSearchDocumentsRequest(requests=[pb.SearchDocumentsRequest(query="退款"),
                                                     pb.SearchDocumentsRequest(query="退款", rerank=True,
                                                                               rerank_candidates=-1)])
    expect_error(lambda: service.stub.BatchSearchDocuments(batch, timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
                 "requests[1].rerank_candidates")


def test_pairs_of_concurrent_requests_share_reranker_passes(make_service: Callable[..., LiveService],
                                                            tiny_encoder: TorchEncoder,
                                                            tiny_cross_encoder_dir: Path) -> None:
    service = make_service(tiny_encoder, reranker_model=str(tiny_cross_encoder_dir), rerank_microbatch_max_wait_ms=20,
                           rerank_microbatch_max_pairs=200)
    seed(service, extra=20)
    queries = ["退钱怎么操作", "快递几天没动静", "手机开不了机", "密码忘记了", "发票抬头写错"] * 2
    with ThreadPoolExecutor(len(queries)) as pool:
        responses = list(pool.map(lambda q: _search(service, q, top_k=3, rerank=True, rerank_candidates=20), queries))
    assert all(len(r.hits) == 3 for r in responses)
    # Alone, each reranked query is one batch of 20 pairs: concurrency made larger passes.
    stats = service.running.servicer.engine.rerank.batcher.stats  # type: ignore[union-attr]
    assert stats.max_batch_seen > 20 and stats.batches < len(queries) + 1
    # Same query, same answer, whatever shared its pass.
    assert [h.id for h in responses[0].hits] == [h.id for h in responses[5].hits]


def test_search_cli_reranks_and_prints_both_scores(make_service: Callable[..., LiveService],
                                                   tiny_encoder: TorchEncoder, tiny_cross_encoder_dir: Path,
                                                   tiny_reranker: TorchReranker) -> None:
    from tests.test_cli_client import cli

    service = make_service(tiny_encoder, reranker_model=str(tiny_cross_encoder_dir))
    seed(service, extra=5)
    result = cli("search", "退钱怎么操作", "--addr", service.address, "--top-k", "3", "--rerank",
                 "--rerank-candidates", "8", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["reranker_version"] == tiny_reranker.manifest.version and len(answer["reranked"]) == 3
    assert [h["id"] for h in answer["hits"]] == [r["id"] for r in answer["reranked"]]
    assert all(h["score"] == r["rerank_score"] for h, r in zip(answer["hits"], answer["reranked"], strict=True))
    bad = cli("search", "退钱", "--addr", service.address, "--top-k", "5", "--rerank", "--rerank-candidates", "2")
    assert bad.returncode == 1 and "between top_k (5)" in bad.stderr
