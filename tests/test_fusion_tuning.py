"""Fusion methods (weighted RRF, min-max, DBSF), the tuning grid, and choosing a fusion from measurements."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from semsearch.config import Settings
from semsearch.encoders import TorchEncoder
from semsearch.errors import InvalidInputError
from semsearch.fusion import SAFE_FUSION, Fusion, fuse, tuning_candidates
from semsearch.manifest import ModelManifest
from semsearch.registry import ModelRegistry, pair_for
from semsearch.store import Hit, MilvusStore, RetrieverScore
from semsearch.tuning import TunedRetrieval, choose, tuned_retrieval
from semsearch.v1 import search_pb2 as pb
from service import engine as engine_module
from tests.conftest import LiveService
from trainer.evaluate import parse_fusions
from trainer.tune import TuningRefusedError, keep_previous, tune


def ranking(retriever: str, scored: list[tuple[str, float]]) -> list[Hit]:
    return [Hit(doc, 0, score, doc, {}, (RetrieverScore(retriever, score, rank),))
            for rank, (doc, score) in enumerate(scored, start=1)]


DENSE = ranking("dense", [("a", 0.90), ("b", 0.80), ("c", 0.30)])
LEXICAL = ranking("lexical", [("c", 12.0), ("d", 6.0), ("b", 3.0)])


def fused(fusion: Fusion) -> dict[str, float]:
    return {hit.doc_id: hit.score for hit in fuse({"dense": DENSE, "lexical": LEXICAL}, fusion, 10)}


def test_the_default_fusion_is_the_safest_measured_one() -> None:
    assert Fusion.from_settings(Settings()) == SAFE_FUSION
    assert Settings().retrieval_mode == "auto"


def test_rrf_weights_are_relative_and_equal_weights_keep_classic_scores() -> None:
    classic = fused(Fusion(rrf_k=60))
    assert classic["b"] == pytest.approx(1 / 62 + 1 / 63)
    assert fused(Fusion(rrf_k=60, dense_weight=0.3, lexical_weight=0.3)) == pytest.approx(classic)
    leaning = fused(Fusion(rrf_k=60, dense_weight=0.2, lexical_weight=0.8))
    assert leaning["c"] == pytest.approx(0.4 / 63 + 1.6 / 61)
    assert max(leaning, key=leaning.__getitem__) == "c"  # lexical's first wins once lexical counts more


def test_minmax_and_dbsf_normalise_over_each_retrievers_candidates() -> None:
    minmax = fused(Fusion("minmax", dense_weight=0.5, lexical_weight=0.5))
    # dense: (s - 0.3) / 0.6; lexical: (s - 3) / 9. "b": 0.5 * 0.5/0.6 + 0.5 * 0.
    assert minmax["b"] == pytest.approx(0.5 * (0.5 / 0.6))
    assert minmax["c"] == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
    assert minmax["a"] == pytest.approx(0.5)
    dbsf = fused(Fusion("dbsf", dense_weight=1.0, lexical_weight=0.0))
    scores = [0.9, 0.8, 0.3]
    mean = sum(scores) / 3
    spread = 3 * (sum((s - mean) ** 2 for s in scores) / 3) ** 0.5
    assert dbsf["a"] == pytest.approx((0.9 - (mean - spread)) / (2 * spread))
    assert [doc for doc, _ in sorted(dbsf.items(), key=lambda item: -item[1])][:3] == ["a", "b", "c"]
    # One candidate (no spread): it counts fully rather than dividing by zero.
    single = fuse({"dense": DENSE[:1]}, Fusion("dbsf"), 5)
    assert single[0].score == pytest.approx(0.5)


def test_fusions_parse_by_name_and_the_grid_spans_every_method() -> None:
    parsed = parse_fusions("rrf:20,rrf:10:0.2:0.8,minmax:0.1:0.9,dbsf:0.3:0.7,weighted:1:0")
    assert parsed["hybrid rrf k=20"] == Fusion(rrf_k=20)
    assert parsed["hybrid rrf k=10 0.2/0.8"] == Fusion("rrf", 10, 0.2, 0.8)
    assert parsed["hybrid minmax 0.1/0.9"] == Fusion("minmax", 60, 0.1, 0.9)
    assert parsed["hybrid dbsf 0.3/0.7"] == Fusion("dbsf", 60, 0.3, 0.7)
    assert "hybrid weighted 1.0/0.0" in parsed
    grid = parse_fusions("grid")
    assert grid == tuning_candidates() and {f.method for f in grid.values()} == {"rrf", "weighted", "minmax", "dbsf"}
    for bad in ("minmax:0.5", "dbsf:2:0", "rrf:0", "rrf:10:0.2", "borda:1:1"):
        with pytest.raises(ValueError, match=f"--fusions: '{bad}'"):
            parse_fusions(bad)


def metrics(mrr: float, hit1: float) -> dict[str, float]:
    return {"mrr@10": mrr, "hit@1": hit1}


def test_the_best_hybrid_is_chosen_and_checked_against_the_better_half() -> None:
    results = {"dense": metrics(0.10, 0.07), "lexical": metrics(0.967, 0.950),
               "hybrid": metrics(0.626, 0.397), "hybrid minmax 0.05/0.95": metrics(0.962, 0.944),
               "hybrid weighted 0.1/0.9": metrics(0.749, 0.585)}
    choice = choose(results)
    assert choice is not None and choice.fusion == "hybrid minmax 0.05/0.95"
    assert choice.best_single == "lexical" and choice.meets_target
    assert choice.mrr_margin == pytest.approx(-0.005)
    # Each metric against the better single on that metric; 0.011 below on hit@1 misses the target.
    missed = choose({"dense": metrics(0.5, 0.961), "lexical": metrics(0.9, 0.5), "hybrid": metrics(0.95, 0.95)})
    assert missed is not None and not missed.meets_target and missed.hit1_margin == pytest.approx(-0.011)
    assert choose({"dense": metrics(0.5, 0.5)}) is None


# ---------------------------------------------------------------------------------------- tuning a live collection
TOPICS = ["退款", "发票", "快递", "密码", "优惠券", "地址", "物流", "账号", "手机", "电池", "订单", "会员",
          "积分", "保修", "退货", "换货", "客服", "支付", "银行卡", "余额", "提现", "红包", "直播", "评价",
          "预约", "门店", "配送", "包装", "尺码", "颜色"]


def faq() -> list[pb.Document]:
    return [pb.Document(id=f"q{n:02d}", text=f"关于{topic}的问题：{topic}怎么处理，{topic}的规则说明")
            for n, topic in enumerate(TOPICS)]


def write_pairs(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_tuning_chooses_on_the_live_collection_and_the_service_serves_the_choice(
    tmp_path: Path, tiny_encoder: TorchEncoder, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "TUNING_POLL_S", 0.2)  # the running service re-reads it soon
    settings = Settings(milvus_uri=str(tmp_path / "milvus.db"), host="127.0.0.1", port=0, metrics_port=0,
                        collection="docs", retrieval_mode="auto")
    live = LiveService(settings, tiny_encoder)
    store = MilvusStore.from_settings(settings)
    try:
        live.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=faq()), timeout=120)
        untuned = live.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=3), timeout=60)
        # No tuning yet: "auto" serves hybrid with the safest measured fusion, and says so.
        assert untuned.mode == pb.RETRIEVAL_MODE_HYBRID and untuned.retrieval_source == "default"
        assert untuned.fusion.method == pb.FUSION_METHOD_MINMAX
        assert (untuned.fusion.dense_weight, untuned.fusion.lexical_weight) == pytest.approx((0.5, 0.5))
        report, tuned = tune_with_bad_input_first(settings, store, tmp_path, str(tiny_model_dir))
        deadline = time.monotonic() + 30
        while True:
            served = live.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=3), timeout=60)
            if served.retrieval_source == "tuned" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        asked = live.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", top_k=3,
                                                                    mode=pb.RETRIEVAL_MODE_DENSE), timeout=60)
        minmax = live.stub.SearchDocuments(pb.SearchDocumentsRequest(
            query="退款", top_k=3, mode=pb.RETRIEVAL_MODE_HYBRID,
            fusion=pb.FusionOptions(method=pb.FUSION_METHOD_MINMAX, dense_weight=0.3, lexical_weight=0.7)), timeout=60)
    finally:
        store.close()
        live.stop()
    # Lexical wins these queries (the tiny model's vectors are random): the choice leans on it.
    assert report["results"]["lexical"]["mrr@10"] > report["results"]["dense"]["mrr@10"]
    assert served.retrieval_source == "tuned", "the running service did not pick the tuning up"
    assert served.mode == {"dense": pb.RETRIEVAL_MODE_DENSE, "lexical": pb.RETRIEVAL_MODE_LEXICAL,
                           "hybrid": pb.RETRIEVAL_MODE_HYBRID}[tuned.mode]
    if tuned.mode == "hybrid":
        assert (served.fusion.dense_weight, served.fusion.lexical_weight) == pytest.approx(
            (tuned.fusion.dense_weight, tuned.fusion.lexical_weight))
    assert asked.mode == pb.RETRIEVAL_MODE_DENSE and asked.retrieval_source == "request"
    assert not asked.HasField("fusion")
    assert minmax.retrieval_source == "request" and minmax.fusion.method == pb.FUSION_METHOD_MINMAX
    assert minmax.hits[0].id == "q00" and 0 < minmax.hits[0].score <= 1.0  # weighted sum of [0, 1] scores


def tune_with_bad_input_first(settings: Settings, store: MilvusStore, tmp_path: Path,
                              model: str) -> tuple[dict[str, Any], TunedRetrieval]:
    """Too few queries and mostly-absent ids are refused; a few absent ids are counted; then a real
    tuning, recorded on the collection and with the registry's pair."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", [{"query": f"{topic}怎么办", "id": f"q{n:02d}"}
                                                   for n, topic in enumerate(TOPICS[:24])])
    with pytest.raises(TuningRefusedError, match=r"at least 20 .* got 12 .* label 8 more"):
        tune(settings, store, "docs", write_pairs(tmp_path / "few.jsonl", [
            {"query": f"{topic}怎么办", "ids": [f"q{n:02d}"]} for n, topic in enumerate(TOPICS[:12])]), model=model)
    strangers: list[dict[str, object]] = [{"query": f"{topic}怎么办", "ids": [f"other{n}"]}
                                          for n, topic in enumerate(TOPICS)]
    with pytest.raises(TuningRefusedError, match="30 of the 54 labelled document ids are not in collection"):
        tune(settings, store, "docs", write_pairs(tmp_path / "strangers.jsonl", strangers + json_lines(pairs)),
             model=model)
    report = tune(settings, store, "docs", write_pairs(tmp_path / "some-absent.jsonl", [
        *json_lines(pairs), {"query": "不存在", "id": "gone1"}, {"query": "也不存在", "id": "gone2"}]),
        model=model, dry_run=True)
    assert (report["absent_ids"], report["usable_queries"], report["queries"]) == (2, 24, 26)
    assert report["recorded_in"] == "nothing (--dry-run)"
    assert ModelRegistry(store).get("docs").current.retrieval is None  # type: ignore[union-attr]
    report = tune(settings, store, "docs", pairs, model=model)
    record = ModelRegistry(store).get("docs")
    assert record is not None and record.current is not None and record.current.retrieval is not None
    tuned = TunedRetrieval.from_json(json.dumps(record.current.retrieval))
    assert tuned.describe() == report["chosen"] and tuned.queries == 24
    return report, tuned


def json_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_after_a_promotion_the_previous_tuning_is_kept_only_when_asked(tmp_path: Path) -> None:
    """A promoted pair's collection starts untuned; `tune-fusion --keep-previous` copies the tuning of
    the pair it replaced (registry `previous`) explicitly."""
    manifest = ModelManifest(name="t", version="t-v2", pooling="cls", dimension=8, max_tokens=64)
    store = MilvusStore(str(tmp_path / "m.db"))
    try:
        store.create_collection("docs__new", manifest)
        registry = ModelRegistry(store)
        entry = registry.bootstrap("docs", manifest, "docs__new")
        with pytest.raises(InvalidInputError, match="nothing to keep"):
            keep_previous(store, "docs")
        kept = TunedRetrieval("hybrid", Fusion("dbsf", 60, 0.3, 0.7), "2026-12-07T20:00:00+00:00", 40)
        entry.previous = pair_for(manifest, "docs__old")
        entry.previous.retrieval = json.loads(kept.to_json())
        registry.put(entry)
        assert tuned_retrieval(store.collection_properties("docs__new")) is None  # untuned until asked
        report = keep_previous(store, "docs")
        assert report["kept_from"] == "docs__old" and report["chosen"] == "hybrid dbsf 0.3/0.7"
        assert tuned_retrieval(store.collection_properties("docs__new")) == kept
        assert registry.get("docs").current.retrieval == json.loads(kept.to_json())  # type: ignore[union-attr]
    finally:
        store.close()
