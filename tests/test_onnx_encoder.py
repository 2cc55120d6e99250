"""The ONNX Runtime backend: same vectors as PyTorch (fp32), int8 as a model version of its own, the
export cache, the fallback, and the service, indexer and trainer running on it. Real exports of real
weights (the tiny random Chinese BERT and the packaged MiniLM), real gRPC, real Milvus Lite."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import typer
from structlog.testing import capture_logs
from typer.testing import CliRunner

from semsearch.config import Settings
from semsearch.encoders import STAND_IN_MODEL, TorchEncoder, create_encoder
from semsearch.encoders import onnx as onnx_backend
from semsearch.encoders.onnx import INT8_VERSION_SUFFIX, OnnxEncoder
from semsearch.errors import ModelMismatchError, ModelNotFoundError
from semsearch.manifest import BGE_ZH_INSTRUCTION
from semsearch.store import MilvusStore
from semsearch.v1 import search_pb2 as pb
from service.server import start_server
from tests.conftest import LiveService
from tests.tinymodel import build_tiny_bert

# Mixed lengths in one batch (padding), one over the tiny model's 128-token limit (truncation), English.
TEXTS = [
    "如何申请退款？请在订单页面点击申请退款",
    "快递包裹几天没动静，物流一直在运输中",
    "手机开不了机",
    "密码忘记了，如何找回账号登录" * 12,
    "发票抬头写错能改吗",
    "how do I get a refund",
    "退",
]
QUERIES = ["退钱怎么操作？", "包裹好几天没动静了", "手机开不了机怎么办", "发票写错了"]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))  # both L2-normalized


def top_ids(queries: np.ndarray, docs: np.ndarray, k: int) -> list[list[int]]:
    return [list(map(int, np.argsort(-(docs @ q), kind="stable")[:k])) for q in queries]


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model_dir: Path, onnx_cache: Path) -> OnnxEncoder:
    return OnnxEncoder.from_ref(str(tiny_model_dir), cache_dir=onnx_cache, batch_size=8)


@pytest.fixture(scope="session")
def tiny_int8(tiny_model_dir: Path, onnx_cache: Path) -> OnnxEncoder:
    return OnnxEncoder.from_ref(str(tiny_model_dir), cache_dir=onnx_cache, batch_size=8, quantize=True)


def settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(**{"device": "cpu", "encode_batch_size": 8, "onnx_cache_dir": tmp_path / "onnx", **values})


# ------------------------------------------------------------------------------------ same vectors
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_fp32_onnx_reproduces_torch(tiny_onnx: OnnxEncoder, tiny_encoder: TorchEncoder, pooling: str) -> None:
    # Pooling runs outside the graph (shared code), so one export serves both poolings.
    manifest = tiny_encoder.manifest.model_copy(update={"pooling": pooling})
    ours = OnnxEncoder(Path(manifest.model_path), manifest, tiny_onnx.onnx_path, batch_size=3)
    reference = TorchEncoder(Path(manifest.model_path), manifest, device="cpu", batch_size=3)
    for encode in ("encode_documents", "encode_queries"):
        got, want = getattr(ours, encode)(TEXTS), getattr(reference, encode)(TEXTS)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert min_cosine(got, want) >= 0.9999
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert ours.manifest.version == reference.manifest.version  # same vectors: same model version
    if pooling == "mean":  # and the pooling really differs (not CLS under another name)
        cls = tiny_onnx.encode_documents(TEXTS)
        assert min_cosine(cls, ours.encode_documents(TEXTS)) < 0.99


@pytest.mark.slow  # the export of real weights takes 20-45 s on the shared 2-core machine
def test_fp32_onnx_reproduces_minilm_and_its_rankings(onnx_cache: Path, minilm_encoder: TorchEncoder) -> None:
    ours = OnnxEncoder.from_ref(STAND_IN_MODEL, cache_dir=onnx_cache)
    docs = [*TEXTS, "Where is my parcel? It has not moved for days", "Reset a forgotten password",
            "The phone does not turn on", "Can the invoice title be changed"]
    queries = [*QUERIES, "refund please", "parcel stuck", "forgot my password", "phone dead"]
    got_docs, want_docs = ours.encode_documents(docs), minilm_encoder.encode_documents(docs)
    got_q, want_q = ours.encode_queries(queries), minilm_encoder.encode_queries(queries)
    assert min_cosine(got_docs, want_docs) >= 0.9999 and min_cosine(got_q, want_q) >= 0.9999
    assert top_ids(got_q, got_docs, 5) == top_ids(want_q, want_docs, 5)
    assert ours.manifest == minilm_encoder.manifest
    assert ours.count_tokens(docs) == minilm_encoder.count_tokens(docs)
    ops = Counter(node.op_type for node in onnx.load(str(ours.onnx_path)).graph.node)
    assert ops["Attention"] == 6 and ops["EmbedLayerNormalization"] == 1


def test_tokens_limit_and_instruction_on_queries_only(tiny_onnx: OnnxEncoder, tiny_encoder: TorchEncoder) -> None:
    assert tiny_onnx.max_tokens == tiny_encoder.max_tokens
    assert tiny_onnx.count_tokens(TEXTS) == tiny_encoder.count_tokens(TEXTS)
    seen: list[list[int]] = []
    run = tiny_onnx._hidden

    def spy(features: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"],
                                                                    strict=True))
        return run(features)

    tiny_onnx._hidden = spy  # type: ignore[method-assign]
    try:
        tiny_onnx.encode_queries(["退钱怎么操作？"])
        tiny_onnx.encode_documents(["退钱怎么操作？"])
    finally:
        del tiny_onnx._hidden
    tokenizer = tiny_onnx.tokenizer
    instruction = tokenizer(BGE_ZH_INSTRUCTION, add_special_tokens=False)["input_ids"]
    query_ids, doc_ids = seen
    assert query_ids[1 : 1 + len(instruction)] == instruction  # after [CLS], exactly once
    assert query_ids[1 + len(instruction) :] == doc_ids[1:]
    assert doc_ids == tokenizer("退钱怎么操作？")["input_ids"]  # documents never get it
    # Over the limit: truncated to max_tokens like torch (the long text above is 12x over).
    assert max(tiny_onnx.count_tokens(TEXTS)) > tiny_onnx.max_tokens


# ------------------------------------------------------------------------------------------- int8
def test_int8_is_a_model_version_of_its_own(tiny_int8: OnnxEncoder, tiny_encoder: TorchEncoder) -> None:
    assert tiny_int8.manifest.version == tiny_encoder.manifest.version + INT8_VERSION_SUFFIX
    assert tiny_int8.manifest.model_copy(update={"version": tiny_encoder.manifest.version}) == tiny_encoder.manifest
    got, want = tiny_int8.encode_documents(TEXTS), tiny_encoder.encode_documents(TEXTS)
    assert 0.9 < min_cosine(got, want) < 0.999999  # close, but other vectors


def test_int8_cannot_serve_a_torch_collection_nor_torch_an_int8_one(
    tmp_path: Path, tiny_int8: OnnxEncoder, tiny_onnx: OnnxEncoder, tiny_encoder: TorchEncoder,
) -> None:
    uri = str(tmp_path / "m.db")
    store = MilvusStore(uri)
    store.ensure_collection("fp32", tiny_encoder.manifest)
    store.ensure_collection("int8", tiny_int8.manifest)
    store.close()

    async def load(collection: str, encoder: Any) -> None:
        running = await start_server(Settings(milvus_uri=uri, port=0, collection=collection, metrics_port=0))
        try:
            await running.load(encoder)
        finally:
            await running.stop(grace_s=0)

    with pytest.raises(ModelMismatchError, match=r"\+onnx-int8"):
        asyncio.run(load("fp32", tiny_int8))
    with pytest.raises(ModelMismatchError, match=r"\+onnx-int8"):
        asyncio.run(load("int8", tiny_encoder))
    with pytest.raises(ModelMismatchError):
        asyncio.run(load("int8", tiny_onnx))
    store = MilvusStore(uri)
    try:  # fp32 ONNX is the torch model's version: allowed (served end to end below)
        store.ensure_collection("fp32", tiny_onnx.manifest, create=False)
    finally:
        store.close()


@pytest.mark.slow
def test_int8_minilm_stays_close(onnx_cache: Path, minilm_encoder: TorchEncoder) -> None:
    int8 = OnnxEncoder.from_ref(STAND_IN_MODEL, cache_dir=onnx_cache, quantize=True)
    assert int8.manifest.version.endswith(INT8_VERSION_SUFFIX)
    assert min_cosine(int8.encode_documents(TEXTS), minilm_encoder.encode_documents(TEXTS)) > 0.9


# ------------------------------------------------------------------------------- cache and fallback
def test_export_is_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny_bert(tmp_path / "m", seed=3, pooling="mean")
    cache = tmp_path / "cache"
    first = OnnxEncoder.from_ref(str(model), cache_dir=cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("tiny-zh-bert-seed3-mean-fp32-")  # no temporaries left
    meta = json.loads((cache / entries[0] / "meta.json").read_text())
    assert meta["version"] == first.manifest.version and meta["min_cosine_to_torch"] >= 0.9999
    ops = Counter(node.op_type for node in onnx.load(str(first.onnx_path)).graph.node)
    assert ops["Attention"] == 2 and ops["SkipLayerNormalization"] == 4  # fused for the CPU, one per layer

    def no_export(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("re-exported although the cache holds this model version")

    monkeypatch.setattr(onnx_backend, "_export_fp32", no_export)
    monkeypatch.setattr(onnx_backend, "TorchEncoder", no_export)  # not even the torch model is loaded
    second = OnnxEncoder.from_ref(str(model), cache_dir=cache)
    np.testing.assert_array_equal(second.encode_documents(TEXTS), first.encode_documents(TEXTS))
    assert sorted(p.name for p in cache.iterdir()) == entries
    # Other weights (another version) never hit this entry.
    other = build_tiny_bert(tmp_path / "other", seed=4, pooling="mean")
    with pytest.raises(onnx_backend.OnnxExportError, match="re-exported"):
        OnnxEncoder.from_ref(str(other), cache_dir=cache)


def test_failed_export_falls_back_to_torch_with_one_warning(tmp_path: Path, tiny_model_dir: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    config = settings(tmp_path, model=str(tiny_model_dir), encoder_backend="onnx", onnx_cache_dir=blocker)
    with capture_logs() as logs:
        encoder = create_encoder(config)
    assert isinstance(encoder, TorchEncoder)
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [w["event"] for w in warnings] == ["onnx_export_failed_using_torch"]
    assert "export" in warnings[0]["reason"] and "not-a-dir" in warnings[0]["reason"]
    # int8 is another model version: no fallback to torch's vectors, a clear error instead.
    with pytest.raises(ModelNotFoundError, match=r"onnx-int8.*No fallback"):
        create_encoder(config.model_copy(update={"encoder_backend": "onnx-int8"}))


def test_export_that_does_not_reproduce_torch_is_refused(tmp_path: Path, tiny_model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_backend, "PARITY_MIN_COSINE", 1.5)  # no graph can pass: the check must run
    config = settings(tmp_path, model=str(tiny_model_dir), encoder_backend="auto")
    with capture_logs() as logs:
        encoder = create_encoder(config)
    assert isinstance(encoder, TorchEncoder)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["onnx_export_failed_using_torch"]
    assert not any((tmp_path / "onnx").iterdir())  # nothing cached


# -------------------------------------------------------------------------- the setting, end to end
def test_backend_setting_picks_the_encoder(tmp_path: Path, tiny_model_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch, onnx_cache: Path) -> None:
    from trainer.encoding import open_encoder

    base = settings(tmp_path, model=str(tiny_model_dir), onnx_cache_dir=onnx_cache)
    assert type(create_encoder(base)) is TorchEncoder  # the default
    assert type(create_encoder(base.model_copy(update={"encoder_backend": "auto"}))) is OnnxEncoder  # CPU
    monkeypatch.setenv("SEMSEARCH_ENCODER_BACKEND", "onnx-int8")
    monkeypatch.setenv("SEMSEARCH_ONNX_CACHE_DIR", str(onnx_cache))
    from_env = Settings(model=str(tiny_model_dir), device="cpu")
    evaluator = open_encoder(from_env)  # `semsearch train evaluate/mine` encode through this
    assert isinstance(evaluator, OnnxEncoder) and evaluator.manifest.version.endswith(INT8_VERSION_SUFFIX)
    with pytest.raises(ValueError, match="encoder_backend"):
        Settings(encoder_backend="tensorrt")  # type: ignore[arg-type]


def test_service_serves_with_the_onnx_backend_over_grpc(
    tmp_path: Path, tiny_model_dir: Path, tiny_encoder: TorchEncoder, onnx_cache: Path,
    make_service: Callable[..., LiveService],
) -> None:
    encoder = create_encoder(settings(tmp_path, model=str(tiny_model_dir), encoder_backend="onnx",
                                      onnx_cache_dir=onnx_cache))
    assert isinstance(encoder, OnnxEncoder)
    service = make_service(encoder)
    docs = [pb.Document(id=f"d{i}", text=text) for i, text in enumerate(TEXTS)]
    assert service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=docs), timeout=60).upserted_count == 7
    for query in QUERIES:
        response = service.stub.SearchDocuments(pb.SearchDocumentsRequest(
            query=query, top_k=7, return_chunks=True, mode=pb.RETRIEVAL_MODE_DENSE), timeout=30)
        assert response.model_version == tiny_encoder.manifest.version
        # The scores are torch's: the same model version, whichever backend served it.
        query_vector = tiny_encoder.encode_queries([query])[0]
        for hit in response.hits:
            expected = float(tiny_encoder.encode_documents([hit.text])[0] @ query_vector)
            assert hit.score == pytest.approx(expected, abs=1e-3)
    batch = service.stub.BatchSearchDocuments(pb.BatchSearchDocumentsRequest(
        requests=[pb.SearchDocumentsRequest(query=q, top_k=3) for q in QUERIES]), timeout=30)
    assert len(batch.responses) == len(QUERIES)


def test_index_with_onnx_verify_with_torch_refuse_int8(tmp_path: Path, tiny_model_dir: Path, onnx_cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer.cli import register

    monkeypatch.setenv("SEMSEARCH_ONNX_CACHE_DIR", str(onnx_cache))
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) + "\n"
                              for i, t in enumerate(TEXTS)), encoding="utf-8")
    common = ["--milvus-uri", str(tmp_path / "milvus.db"), "--model", str(tiny_model_dir), "--collection", "c",
              "--device", "cpu", "--state-dir", str(tmp_path / "state")]
    result = runner.invoke(app, ["index", str(source), *common, "--encoder-backend", "onnx", "--json"])
    assert result.exit_code == 0, result.output
    # Vectors written by ONNX, re-encoded by torch: verify compares them (1 - cosine <= 1e-3).
    result = runner.invoke(app, ["index", "verify", *common, "--encoder-backend", "torch", "--json", "--sample", "7"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["ok"] is True
    result = runner.invoke(app, ["index", "verify", *common, "--encoder-backend", "onnx-int8", "--sample", "7"])
    assert result.exit_code != 0 and "onnx-int8" in result.output


def test_encoder_backend_flag_on_every_encoding_command() -> None:
    from service.cli import register as register_service
    from trainer.cli import register as register_trainer

    app = typer.Typer()
    register_service(app)
    register_trainer(app)
    runner = CliRunner()
    for command in (["serve"], ["demo"], ["train", "mine"], ["train", "evaluate"]):
        output = runner.invoke(app, [*command, "--help"], terminal_width=200).output
        assert "--encoder-backend" in output, command
