"""Trainer steps on tiny data with a tiny random BERT: prepare, mine, score, vocab, metrics, evaluate."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from semsearch.config import Settings
from semsearch.encoders import TorchEncoder
from semsearch.logs import configure_logging
from semsearch.manifest import ModelManifest
from tests.tinymodel import CHINESE, SPECIAL, build_tiny_bert
from trainer.cli import register
from trainer.encoding import ExactIndex, open_encoder
from trainer.evaluate import evaluate_models, markdown_table, parse_model_spec, record_metrics, write_report
from trainer.metrics import (
    hit_at_k,
    mean_metrics,
    mrr_at_k,
    ndcg_at_k,
    query_metrics,
    recall_at_k,
    similarity_gap,
)
from trainer.mine import Candidate, MineConfig, mine_hard_negatives, parse_range
from trainer.prepare import prepare
from trainer.rows import RowError, TrainRow, candidate_texts, distinct_texts, normalize_text, read_rows, write_rows
from trainer.score import score_file, score_rows

# Six intents of customer-service questions (all characters in the tiny vocabulary).
INTENTS = [
    ["如何申请退款", "退钱怎么操作", "我要退款", "申请退款几天"],
    ["快递几天没动静", "包裹物流没动静", "快递运输中几天了"],
    ["手机开不了机", "手机电池发热", "手机开机不了怎么办"],
    ["密码忘记了", "登录密码找回", "账号密码忘记怎么找回"],
    ["发票抬头写错能改吗", "发票抬头修改", "发票写错了"],
    ["优惠券怎么用", "优惠券支付失败", "订单优惠券"],
    ["会员积分等级", "积分怎么查", "会员等级多少"],
    ["保修期是多久", "维修更换", "保修多久"],
]


def _labelled_tsv(path: Path) -> Path:
    lines = []
    for group in INTENTS:
        lines += [f"{a}\t{b}\t1" for a, b in itertools.pairwise(group)]
    for first, second in itertools.pairwise(INTENTS):
        lines.append(f"{first[0]}\t{second[0]}\t0")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_settings(tiny_model_dir: Path) -> Settings:
    return Settings(model=str(tiny_model_dir), device="cpu", encode_batch_size=8)


@pytest.fixture(scope="module")
def tiny(tiny_settings: Settings) -> TorchEncoder:
    encoder = open_encoder(tiny_settings)
    assert isinstance(encoder, TorchEncoder)
    return encoder


def _rows() -> list[TrainRow]:
    return [TrainRow(query=group[0], pos=group[1:], neg=[], group=f"g{i}") for i, group in enumerate(INTENTS)] + [
        TrainRow(query=group[1], pos=[group[0], *group[2:]], neg=[], group=f"g{i}") for i, group in enumerate(INTENTS)
    ]


OTHERS = ["快递几天没动静", "手机开不了机", "密码忘记了", "发票写错了"]

# ---------------------------------------------------------------- rows


def test_bad_rows_are_reported_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"query": "退款", "pos": ["退钱"], "neg": ["快递"]}, ensure_ascii=False),
                "{not json",
                json.dumps({"query": "退款", "neg": ["快递"]}),
                json.dumps({"query": "退款", "pos": ["退钱"], "neg": ["快递"], "neg_scores": [1.0, 2.0]}),
                "",
                json.dumps(["a list"]),
                json.dumps({"query": "  ", "pos": ["退钱"]}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(RowError) as caught:
        read_rows(path)
    message = str(caught.value)
    assert [line for line, _ in caught.value.problems] == [2, 3, 4, 6, 7]
    assert f"{path}:2: not JSON" in message
    assert f"{path}:3: pos: Field required" in message
    assert f"{path}:4: neg_scores has 2 items but neg has 1" in message
    assert f"{path}:7: query: query is blank" in message
    assert f"{path}:1:" not in message


def test_rows_without_negatives_are_rejected_where_needed(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    write_rows(path, [TrainRow(query="退款", pos=["退钱"], neg=["快递"]), TrainRow(query="退款", pos=["退钱"])])
    assert len(read_rows(path)) == 2
    with pytest.raises(RowError, match=r":2: neg is empty"):
        read_rows(path, require_neg=True)
    with pytest.raises(RowError, match=r":1: pos_scores/neg_scores missing"):
        read_rows(path, require_scores=True)


def test_rows_are_written_as_utf8_not_escapes(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    write_rows(
        path,
        [TrainRow(query="如何申请退款", pos=["退钱怎么操作"], neg=["快递"], pos_scores=[1.0], neg_scores=[0.5])],
    )
    text = path.read_text(encoding="utf-8")
    assert "如何申请退款" in text and "\\u" not in text
    assert read_rows(path)[0].neg_scores == [0.5]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    # The CLI binds structlog to CliRunner's stderr, which is closed once the command returns.
    configure_logging("INFO", json_output=False)


@pytest.mark.usefixtures("restore_logging")
def test_cli_reports_bad_rows_by_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `train` a sub-command group
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "退款", "pos": ["退钱"]}\n{"query": "退款", "pos": "退钱"}\n', encoding="utf-8")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "mine",
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 2
    assert f"{bad}:2: pos: Input should be a valid list" in result.output
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("退款\t退钱\t1\n退款\t退钱\tyes\n退款 退钱\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["train", "prepare", "--labelled", str(tsv), "--out-dir", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert f"{tsv}:2: label must be 0 or 1" in result.output
    assert f"{tsv}:3: expected 3 tab-separated columns, got 1" in result.output


# ---------------------------------------------------------------- prepare


def test_group_split_leaves_no_intent_and_no_text_on_both_sides(tmp_path: Path) -> None:
    result = prepare(labelled=[_labelled_tsv(tmp_path / "bq.tsv")], test_ratio=0.3, seed=7)
    assert result.train and result.test
    train_groups = {r.group for r in result.train}
    test_groups = {r.group for r in result.test}
    assert not train_groups & test_groups

    def texts(rows: Sequence[TrainRow]) -> set[str]:
        return {t for r in rows for t in (r.query, *r.pos, *r.neg)}

    assert not texts(result.train) & texts(result.test)
    # Every grouped question is a query; its positives are the rest of its intent (transitively).
    by_query = {r.query: r for r in (*result.train, *result.test)}
    assert len(by_query) == sum(len(g) for g in INTENTS)
    assert set(by_query["如何申请退款"].pos) == {"退钱怎么操作", "我要退款", "申请退款几天"}
    # Label-0 partners become negatives (when on the same side).
    same_side = [r for r in (*result.train, *result.test) if r.neg]
    assert all(normalize_text(n) not in {normalize_text(p) for p in r.pos} for r in same_side for n in r.neg)


def test_group_split_is_seeded(tmp_path: Path) -> None:
    tsv = _labelled_tsv(tmp_path / "bq.tsv")
    first = prepare(labelled=[tsv], test_ratio=0.3, seed=1)
    again = prepare(labelled=[tsv], test_ratio=0.3, seed=1)
    assert [r.query for r in first.test] == [r.query for r in again.test]
    splits = {
        tuple(sorted(r.group or "" for r in prepare(labelled=[tsv], test_ratio=0.3, seed=s).test)) for s in range(6)
    }
    assert len(splits) > 1


def test_prepare_reads_pairs_and_triplets(tmp_path: Path) -> None:
    pairs = tmp_path / "qa.jsonl"
    pairs.write_text(
        "\n".join(
            json.dumps(x, ensure_ascii=False)
            for x in [
                {"query": "怎么退款", "answer": "请在订单页面点击申请退款"},
                {"query": "如何退钱", "answer": "请在订单页面点击申请退款"},
                {"query": "发票写错", "answer": ["发票抬头可以修改", "请联系客服"]},
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    triplets = tmp_path / "simclue.jsonl"
    triplets.write_text(
        json.dumps(
            {"query": "手机开不了机", "title": "手机开机不了", "neg_title": "手机电池发热"},
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    result = prepare(pairs=[pairs], triplets=[triplets], test_ratio=0.0, seed=0)
    rows = {r.query: r for r in result.train}
    assert rows["发票写错"].pos == ["发票抬头可以修改", "请联系客服"]
    assert rows["怎么退款"].group == rows["如何退钱"].group  # one shared answer: one intent
    assert rows["手机开不了机"].neg == ["手机电池发热"]
    assert not result.test


# ---------------------------------------------------------------- mining


def _ranking(encoder: TorchEncoder, query: str, pool: list[str], pool_vectors: np.ndarray) -> list[str]:
    """The pool ranked for `query`, computed independently of the miner (ties: lower index first)."""
    scores = pool_vectors @ encoder.encode_queries([query])[0]
    order = sorted(range(len(pool)), key=lambda i: (-scores[i], i))
    return [pool[i] for i in order]


def test_mining_never_returns_a_positive_and_respects_range_and_seed(tiny: TorchEncoder) -> None:
    rows = _rows()
    pool = list(dict.fromkeys(t for g in INTENTS for t in g))
    corpus = [Candidate(t, f"d{i}") for i, t in enumerate(pool)]
    config = MineConfig(range_lo=2, range_hi=12, negative_number=4, fn_margin=None, seed=3)
    pool_vectors = tiny.encode_documents(pool)
    mined, stats = mine_hard_negatives(rows, tiny, config, corpus=corpus, show_progress=False)
    assert stats["mined"] > 0
    for row, out in zip(rows, mined, strict=True):
        ranking = _ranking(tiny, row.query, pool, pool_vectors)
        assert out.neg, row.query
        assert len(out.neg) <= 4
        scores = dict(zip(pool, pool_vectors @ tiny.encode_queries([row.query])[0], strict=True))
        for negative in out.neg:
            assert negative not in row.pos and negative != row.query
            rank = ranking.index(negative)
            if not 2 <= rank < 12:
                # Only a near-tie at the range's edge may fall either way: the miner encodes the pool
                # in its own batches, so scores differ from ours in the last float digits.
                edge = ranking[11] if rank >= 12 else ranking[2]
                assert abs(float(scores[negative]) - float(scores[edge])) < 1e-4, (negative, rank)
        assert out.neg_ids == [f"d{pool.index(n)}" for n in out.neg]
    again, _ = mine_hard_negatives(rows, tiny, config, corpus=corpus, show_progress=False)
    assert [r.neg for r in again] == [r.neg for r in mined]
    other, _ = mine_hard_negatives(rows, tiny, MineConfig(2, 12, 4, None, seed=4), corpus=corpus, show_progress=False)
    assert [r.neg for r in other] != [r.neg for r in mined]
    # A row's negatives depend on the row and the pool, not on where the row sits in the file.
    reordered, _ = mine_hard_negatives(rows[::-1], tiny, config, corpus=corpus, show_progress=False)
    assert [r.neg for r in reordered[::-1]] == [r.neg for r in mined]


def test_mining_drops_positives_by_id_and_by_normalized_text(tiny: TorchEncoder) -> None:
    row = TrainRow(
        query="如何申请退款",
        pos=["退钱怎么操作"],
        pos_ids=["refund-1"],
        neg=["快递"],
        pos_scores=[1.0],
        neg_scores=[0.0],
    )
    corpus = [
        Candidate("退钱怎么操作", "other-id"),  # same text, another id
        Candidate("退款处理完成", "refund-1"),  # same id, another text
        Candidate(" 退钱怎么操作 ", "x"),  # same text once normalized
        Candidate("如何申请退款", "q"),  # the query itself
        *[Candidate(t, f"c{i}") for i, t in enumerate(["快递几天没动静", "手机开不了机", "密码忘记了", "发票写错了"])],
    ]
    mined, stats = mine_hard_negatives([row], tiny, MineConfig(0, 50, 10, None), corpus=corpus, show_progress=False)
    assert set(mined[0].neg) == {"快递几天没动静", "手机开不了机", "密码忘记了", "发票写错了"}
    assert stats["dropped_positive"] == 3  # the normalized duplicate was deduplicated from the pool
    assert mined[0].pos_scores is None and mined[0].neg_scores is None  # negatives changed: scores are stale


def test_mining_drops_candidates_within_margin_of_the_positive(tiny: TorchEncoder) -> None:
    rows = _rows()
    pool = list(dict.fromkeys(t for g in INTENTS for t in g))
    margin = 0.02
    mined, stats = mine_hard_negatives(rows, tiny, MineConfig(0, 100, 50, margin), show_progress=False)
    for row, out in zip(rows, mined, strict=True):
        q = tiny.encode_queries([row.query])[0]
        best_pos = max(float(tiny.encode_documents([p])[0] @ q) for p in row.pos)
        for negative in out.neg:
            assert float(tiny.encode_documents([negative])[0] @ q) <= best_pos - margin + 1e-5
    assert stats["dropped_false_negative"] > 0
    assert stats["pool"] == len(pool)


def test_mining_keeps_labelled_negatives_when_asked(tiny: TorchEncoder) -> None:
    row = TrainRow(query="如何申请退款", pos=["退钱怎么操作"], neg=["快递几天没动静"])
    corpus = [Candidate(t) for t in ["手机开不了机", "密码忘记了", "快递几天没动静"]]
    mined, _ = mine_hard_negatives(
        [row], tiny, MineConfig(0, 10, 2, None, keep_existing=True), corpus=corpus, show_progress=False
    )
    assert mined[0].neg[0] == "快递几天没动静" and len(mined[0].neg) == len(set(mined[0].neg)) == 3


def test_rank_range_parsing() -> None:
    assert parse_range("10-210") == (10, 210)
    for bad in ("210-10", "x", "5-5"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_exact_index_excludes_and_breaks_ties_by_id() -> None:
    vectors = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    index = ExactIndex(vectors, block=1)
    ids, scores = index.search(np.array([[1, 0], [0, 1]], dtype=np.float32), 3, exclude=[[0], []])
    assert ids.tolist() == [[1, 3, 2], [2, 3, 0]]
    np.testing.assert_allclose(scores[0], [1.0, 0.6, 0.0], atol=1e-6)


# ---------------------------------------------------------------- teacher scores


def _build_tiny_cross_encoder(out_dir: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + CHINESE
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), tokenize_chinese_chars=True).save_pretrained(str(out_dir))
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-reranker"))


def _direct_score(model_dir: Path, query: str, passage: str) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        return float(model(**tokenizer(query, passage, return_tensors="pt")).logits[0, 0])


def test_teacher_scores_align_with_pos_and_neg_order_and_resume(tmp_path: Path, cross_encoder_dir: Path) -> None:
    if importlib.util.find_spec("FlagEmbedding") is None:
        pytest.skip("the trainer extra (FlagEmbedding) is not installed")
    from trainer.score import ScoreConfig, flag_reranker_scorer

    rows = [TrainRow(query=g[0], pos=g[1:2], neg=[h[0] for h in INTENTS if h is not g][:3]) for g in INTENTS]
    data = tmp_path / "rows.jsonl"
    write_rows(data, rows)
    calls: list[int] = []
    scorer = flag_reranker_scorer(str(cross_encoder_dir), device="cpu", config=ScoreConfig(batch_size=4))

    def counting(pairs: list[tuple[str, str]]) -> list[float]:
        calls.append(len(pairs))
        return scorer(pairs)

    out = tmp_path / "scored.jsonl"
    first = score_file(data, out, lambda: counting, chunk_rows=3, max_chunks=1, show_progress=False)
    assert first["scored"] == 3 and not first["complete"]
    with out.open("a", encoding="utf-8") as handle:
        handle.write('{"query": "torn')  # a crash mid-line
    second = score_file(data, out, lambda: counting, chunk_rows=3, show_progress=False)
    assert second["resumed_from"] == 3 and second["complete"]
    assert sum(calls) == sum(len(r.pos) + len(r.neg) for r in rows)  # nothing scored twice
    scored = read_rows(out, require_scores=True)
    assert [r.query for r in scored] == [r.query for r in rows]
    for row in scored[:2] + scored[-1:]:
        assert row.neg_scores is not None and row.pos_scores is not None
        for negative, score in zip(row.neg, row.neg_scores, strict=True):
            assert score == pytest.approx(_direct_score(cross_encoder_dir, row.query, negative), abs=1e-4)
        assert row.pos_scores[0] == pytest.approx(_direct_score(cross_encoder_dir, row.query, row.pos[0]), abs=1e-4)
    assert score_file(data, out, lambda: pytest.fail("no work left"), show_progress=False)["scored"] == 0


def test_resume_refuses_an_output_of_other_input(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    write_rows(data, [TrainRow(query="退款", pos=["退钱"], neg=["快递"])])
    out = tmp_path / "scored.jsonl"
    write_rows(out, [TrainRow(query="发票", pos=["退钱"], neg=["快递"], pos_scores=[1], neg_scores=[0])])
    with pytest.raises(ValueError, match="does not match input row 1"):
        score_file(data, out, lambda: pytest.fail("must not load"), show_progress=False)


def test_score_rows_splits_scores_back_per_row() -> None:
    rows = [
        TrainRow(query="a", pos=["p1"], neg=["n1", "n2"]),
        TrainRow(query="b", pos=["p2", "p3"], neg=["n3"]),
    ]
    scored = score_rows(rows, lambda pairs: [float(len(q + p)) + i for i, (q, p) in enumerate(pairs)])
    assert scored[0].pos_scores == [3.0] and scored[0].neg_scores == [4.0, 5.0]
    assert scored[1].pos_scores == [6.0, 7.0] and scored[1].neg_scores == [8.0]


# ---------------------------------------------------------------- vocabulary


def test_vocabulary_extension_adds_rows_and_saves_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from trainer.vocab import extend_vocabulary

    base = build_tiny_bert(tmp_path / "base")
    texts = [
        "银行卡还款怎么办",
        "借款额度降低",
        "我的借款",
    ]  # 银行卡还借额度降低 are not in the tiny vocabulary
    before = AutoTokenizer.from_pretrained(str(base))
    assert before.unk_token in before.tokenize("银行卡")
    result = extend_vocabulary(str(base), texts, tmp_path / "ext", min_count=1, seed=0)
    added = set(result.added)
    assert {"银", "行", "卡", "还", "借", "额", "度", "降", "低"} <= added
    after = AutoTokenizer.from_pretrained(str(tmp_path / "ext"))
    assert after.unk_token not in after.tokenize("银行卡还款怎么办")
    assert after.tokenize("如何申请退款") == before.tokenize("如何申请退款")  # old ids unchanged
    old = AutoModel.from_pretrained(str(base)).get_input_embeddings().weight
    new = AutoModel.from_pretrained(str(tmp_path / "ext")).get_input_embeddings().weight
    assert new.shape[0] == len(after) == old.shape[0] + len(added)
    torch.testing.assert_close(new[: old.shape[0]], old)
    assert result.stats["unk_rate_after"] == 0.0 < result.stats["unk_rate_before"]
    encoder = TorchEncoder.from_ref(str(tmp_path / "ext"), device="cpu")
    manifest = encoder.manifest
    assert manifest.parent_model == "tiny-zh-bert-seed0-cls" and manifest.pooling == "cls"
    vectors = encoder.encode_documents(["银行卡还款", "借款额度"])
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)  # new characters are distinct
    with pytest.raises(ValueError, match="not empty"):
        extend_vocabulary(str(base), texts, tmp_path / "ext")


# ---------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values() -> None:
    ranked = ["a", "x", "b", "y", "z", "c"]
    relevant = {"a", "b", "c", "d"}
    assert recall_at_k(ranked, relevant, 1) == 0.25
    assert recall_at_k(ranked, relevant, 5) == 0.5
    assert recall_at_k(ranked, relevant, 10) == 0.75
    assert hit_at_k(ranked, relevant, 1) == 1.0 and hit_at_k(["x", "a"], relevant, 1) == 0.0
    assert mrr_at_k(["x", "y", "b"], relevant, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x", "y", "b"], relevant, 2) == 0.0
    dcg = 1 / math.log2(2) + 1 / math.log2(4) + 1 / math.log2(7)  # ranks 1, 3, 6
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)
    assert ndcg_at_k(ranked, relevant, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["b", "a"], {"a", "b"}, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "a"], {"a"}, 10) == pytest.approx(1 / math.log2(3))
    per_query = [query_metrics(["a"], {"a"}), query_metrics(["x"], {"a"})]
    assert mean_metrics(per_query)["hit@1"] == 0.5 and mean_metrics(per_query)["mrr@10"] == 0.5
    gap = similarity_gap([[0.9, 0.7], [0.5]], [[0.1], []])
    assert gap["gap"] == pytest.approx(0.7) and gap["queries"] == 1


# ---------------------------------------------------------------- evaluation


class _IntentEncoder:
    """A perfect model: one-hot of a text's intent; unknown texts get their own direction."""

    def __init__(self, manifest: ModelManifest) -> None:
        self._manifest = manifest
        self.intent = {t: i for i, g in enumerate(INTENTS) for t in g}

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._manifest.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row, self.intent.get(text, len(INTENTS) + hash(text) % 8)] = 1.0
        return out

    def encode_queries(self, queries: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self._vectors(queries)

    def encode_documents(self, documents: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self._vectors(documents)

    def close(self) -> None:
        pass


def test_evaluate_pools_metrics_and_report(
    tmp_path: Path, tiny_settings: Settings, tiny: TorchEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.evaluate as evaluate_module

    test_rows = [TrainRow(query=g[0], pos=g[1:], neg=[INTENTS[(i + 1) % 4][0]]) for i, g in enumerate(INTENTS[:4])]
    pool_rows = [TrainRow(query=g[0], pos=g[1:], neg=[]) for g in INTENTS[4:]]
    real_open = evaluate_module.open_encoder

    def fake_open(settings: Settings, model: str | None = None) -> object:
        if model == "perfect":
            return _IntentEncoder(tiny.manifest.model_copy(update={"version": "perfect-1"}))
        return real_open(settings, model)

    monkeypatch.setattr(evaluate_module, "open_encoder", fake_open)
    report, distributions = evaluate_models(
        test_rows,
        [("perfect", "perfect"), parse_model_spec(f"tiny={tiny_settings.model}")],
        tiny_settings,
        pool_rows=pool_rows,
        show_progress=False,
        misses=True,
    )
    perfect, tiny_entry = report["models"]
    test_candidates = len({t for r in test_rows for t in (*r.pos, *r.neg)})
    assert perfect["pools"]["test"]["candidates"] == test_candidates
    assert perfect["pools"]["global"]["candidates"] == test_candidates + sum(len(g) - 1 for g in INTENTS[4:])
    for pool in ("test", "global"):
        metrics = perfect["pools"][pool]["metrics"]
        assert metrics["hit@1"] == 1.0 and metrics["ndcg@10"] == pytest.approx(1.0) and metrics["recall@10"] == 1.0
        # Relevant items tie at the top; recall@1 is 1/|positives| per query.
        assert metrics["recall@1"] == pytest.approx(np.mean([1 / len(r.pos) for r in test_rows]))
    assert perfect["similarity"]["gap"] == pytest.approx(1.0)
    assert tiny_entry["label"] == "tiny" and tiny_entry["version"] == tiny.manifest.version
    assert tiny_entry["query_instruction"] == tiny.manifest.query_instruction
    # The tiny model's hit@1 on the global pool, by brute force here: rank every distinct candidate
    # (the query's own text excluded) and check the top one is a positive.
    texts = distinct_texts([*candidate_texts(test_rows), *candidate_texts(pool_rows)])
    doc_vectors = tiny.encode_documents(texts)
    hits, expected_misses = [], []
    for query_vector, row in zip(tiny.encode_queries([r.query for r in test_rows]), test_rows, strict=True):
        ranked = [texts[i] for i in np.argsort(-(doc_vectors @ query_vector))
                  if normalize_text(texts[i]) != normalize_text(row.query)]
        hits.append(normalize_text(ranked[0]) in {normalize_text(p) for p in row.pos})
        if not hits[-1]:
            expected_misses.append((row.query, ranked[0]))
    assert tiny_entry["pools"]["global"]["metrics"]["hit@1"] == pytest.approx(np.mean(hits))
    # The label audit lists exactly those queries, with their top 1 and on which side it lives.
    assert distributions[0].misses == [] and expected_misses
    assert [(m["query"], m["top1"]) for m in distributions[1].misses] == expected_misses
    test_side = set(candidate_texts(test_rows))
    for miss in distributions[1].misses:
        assert miss["top1_pool"] == ("test" if miss["top1"] in test_side else "other")
        assert (miss["first_relevant"] is None) == (miss["first_relevant_rank"] is None)
    paths = write_report(report, distributions, tmp_path / "report")
    written = [json.loads(line) for line in paths["misses2"].read_text(encoding="utf-8").splitlines()]
    assert [m["model"] for m in written] == ["tiny"] * len(expected_misses) and "misses1" not in paths
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["models"][0]["label"] == "perfect"
    table = markdown_table(report)
    assert "| perfect | 0." in table and "| tiny |" in table and "**global pool**" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny.manifest.save(model_dir)
    assert record_metrics(tmp_path / "report", tiny_entry) is False  # no manifest there: nothing written
    assert record_metrics(model_dir, tiny_entry) is True
    assert ModelManifest.load(model_dir / "semsearch_manifest.json").metrics["eval"]["global"]["queries"] == 4


def test_evaluate_rerank_reorders_each_models_dense_top_n(tiny_settings: Settings, tiny: TorchEncoder) -> None:
    test_rows = [TrainRow(query=g[0], pos=g[1:], neg=[INTENTS[(i + 1) % 4][0]]) for i, g in enumerate(INTENTS[:4])]
    intent = {t: i for i, g in enumerate(INTENTS) for t in g}
    calls: list[int] = []

    def oracle(pairs: list[tuple[str, str]]) -> list[float]:  # a cross-encoder that knows the intents
        calls.append(len(pairs))
        return [1.0 if intent.get(q) == intent.get(d) else 0.0 for q, d in pairs]

    report, _ = evaluate_models(test_rows, [parse_model_spec(f"tiny={tiny_settings.model}")], tiny_settings,
                                pool_rows=[TrainRow(query=g[0], pos=g[1:]) for g in INTENTS[4:]],
                                show_progress=False, rerank=oracle, rerank_label="oracle", rerank_top=3)
    entry = report["models"][0]
    rerank = entry["rerank"]
    assert rerank["reranker"] == "oracle" and rerank["top"] == 3
    assert calls == [len(test_rows) * 3, len(test_rows) * 3]  # each query's dense top 3, both pools
    assert "| tiny → oracle (top 3) |" in markdown_table(report)
    # Below 10 candidates the dense order continues after them: the top 10 hold the same documents.
    for pool in ("test", "global"):
        dense, reranked = entry["pools"][pool]["metrics"], rerank["pools"][pool]["metrics"]
        assert reranked["recall@10"] == dense["recall@10"] and reranked["hit@10"] == dense["hit@10"]
    # Reranking the whole (small) pool with an oracle puts a positive first for every query.
    report, _ = evaluate_models(test_rows, [parse_model_spec(f"tiny={tiny_settings.model}")], tiny_settings,
                                show_progress=False, rerank=oracle, rerank_top=50)
    reranked = report["models"][0]["rerank"]["pools"]["test"]["metrics"]
    assert reranked["hit@1"] == 1.0 and reranked["ndcg@10"] == pytest.approx(1.0)


def test_evaluation_excludes_the_query_itself_from_the_pool(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch, tiny: TorchEncoder
) -> None:
    import trainer.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "open_encoder", lambda settings, model=None: _IntentEncoder(tiny.manifest))
    # The query is also a candidate (paraphrase data); found at rank 1 it would count as a miss.
    rows = [TrainRow(query=INTENTS[0][0], pos=[INTENTS[0][1]], neg=[INTENTS[0][0], INTENTS[1][0]])]
    report, _ = evaluate_models(rows, [("perfect", "perfect")], tiny_settings, show_progress=False)
    assert report["models"][0]["pools"]["test"]["metrics"]["hit@1"] == 1.0
