"""`semsearch train run RECIPE.yaml`: validation before work, end to end, skip on re-run, resume after SIGKILL."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tinymodel import build_tiny_bert
from trainer.evaluate import PASSAGE_COLUMNS, TABLE_COLUMNS
from trainer.recipe import DONE, RecipeError, load_recipe, run_recipe
from trainer.report_html import render_html

if importlib.util.find_spec("FlagEmbedding") is None:
    pytest.skip("the trainer extra (FlagEmbedding) is not installed", allow_module_level=True)

GROUPS = [
    ["如何申请退款", "退钱怎么操作", "申请退款几天"],
    ["快递几天没动静", "包裹物流没动静", "快递运输中几天了"],
    ["手机开不了机", "手机开机不了怎么办", "手机电池发热"],
    ["密码忘记了", "登录密码找回", "账号密码忘记怎么找回"],
    ["发票抬头写错能改吗", "发票写错了", "发票抬头修改"],
    ["会员积分等级", "积分怎么等级", "会员等级积分多少"],
    ["支付失败重复扣款", "重复扣款了", "支付失败了钱扣了"],
    ["优惠券怎么用", "优惠券使用", "鲸鱼优惠券"],  # 鲸 and 鱼 are not in the tiny vocabulary
]

FINETUNE = ("{max_steps: %d, batch_size: 2, train_group_size: 2, query_max_len: 16, passage_max_len: 16, "
            "learning_rate: 1.0e-3, warmup_ratio: 0, logging_steps: 1, save_steps: %d}")


def _write_data(directory: Path) -> Path:
    lines = []
    for i, group in enumerate(GROUPS):
        lines += [f"{group[0]}\t{group[1]}\t1", f"{group[1]}\t{group[2]}\t1",
                  f"{group[0]}\t{GROUPS[(i + 1) % len(GROUPS)][0]}\t0"]
    path = directory / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _recipe(directory: Path, *, steps: str, extra: str = "") -> Path:
    if not (directory / "tiny").exists():
        build_tiny_bert(directory / "tiny")
    _write_data(directory)
    path = directory / "recipe.yaml"
    path.write_text(
        "name: tiny\nmodel: ./tiny\ndevice: cpu\nthreads: 1\n"
        "data:\n  sources:\n    - labelled: pairs.tsv\n  test_ratio: 0.25\n"
        f"steps:\n  mine: {{range: 0-20, negative_number: 3, fn_margin: -1}}\n{steps}{extra}",
        encoding="utf-8",
    )
    return path


def _cli(*args: str, cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "semsearch", "train", *args], cwd=cwd, text=True,
                          capture_output=True, check=False, **kwargs)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("  finetune: {epochs: 0}\n", "steps.finetune.epochs: Input should be greater than 0"),
        ("  finetune: {epoch: 1}\n", "steps.finetune.epoch: unknown key"),
        ("  mine: {range: 9-3}\n", "steps.mine.range:"),
        ("  rounds: 0\n", "steps.rounds: must be at least 1 round"),
        ("  rounds: [{finetune: {temperature: -1}}]\n", "steps.rounds.0.finetune.temperature:"),
        ("  score: {enabled: true}\n", "steps.score.reranker: 'trained' needs steps.reranker.enabled"),
        ("  finetune: {model: x}\n", "steps.finetune.model: set by the recipe"),
        ("  finetune: {nproc_per_node: 2}\n", "steps.finetune.nproc_per_node"),
        ("  evaluat: {}\n", "steps.evaluat: unknown key"),
    ],
)
def test_a_bad_recipe_fails_naming_file_and_key(tmp_path: Path, body: str, expected: str) -> None:
    path = tmp_path / "recipe.yaml"
    _write_data(tmp_path)
    path.write_text(
        "model: some/hub-model\ndevice: cpu\ndata:\n  sources:\n    - labelled: pairs.tsv\nsteps:\n" + body,
        encoding="utf-8",
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_missing_files_and_unknown_top_level_keys_fail_before_work(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: ./nope\ndata:\n  sources:\n    - labelled: missing.tsv\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"r\.yaml: data\.sources\.0\.labelled: file not found"):
        load_recipe(path)
    _write_data(tmp_path)
    path.write_text("model: ./nope\ndata:\n  sources:\n    - labelled: pairs.tsv\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"r\.yaml: model: not a model directory"):
        load_recipe(path)
    path.write_text("model: x\nmodle: y\ndata: {sources: [{labelled: pairs.tsv, squad: pairs.tsv}]}\n",
                    encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "r.yaml: modle: unknown key" in str(info.value)
    assert "data.sources.0: give exactly one of" in str(info.value)
    # Through the CLI: one message, exit code 2, no traceback.
    result = _cli("run", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "modle: unknown key" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_data_row_stops_its_step_with_file_and_line(tmp_path: Path) -> None:
    path = _recipe(tmp_path, steps="  evaluate: {enabled: false}\n")
    with (tmp_path / "pairs.tsv").open("a", encoding="utf-8") as handle:
        handle.write("只有一列\n")
    recipe = load_recipe(path)
    with pytest.raises(Exception, match=r"pairs\.tsv:25: expected 3 tab-separated columns, got 1"):
        run_recipe(recipe, stream_output=False, echo=lambda _: None)
    assert not list((tmp_path / "runs" / "tiny").glob(f"prepare-*/{DONE}"))


def test_a_rerun_skips_done_steps_and_a_changed_setting_reruns_only_what_follows(tmp_path: Path) -> None:
    path = _recipe(tmp_path, steps="  evaluate: {enabled: false}\n")
    first = run_recipe(load_recipe(path), stream_output=False, echo=lambda _: None, until="mine-r1")
    assert [(s["step"], s["status"]) for s in first["steps"]] == [
        ("prepare", "ran"), ("extend-vocab", "ran"), ("mine-r1", "ran")]
    work = tmp_path / "runs" / "tiny"
    # The extended tokenizer knows the characters the tiny one missed.
    extended = next(work.glob("extend-vocab-*/model"))
    assert "鲸" in (extended / "vocab.txt").read_text(encoding="utf-8").split()
    mined = next(work.glob("mine-r1-*/mined.jsonl")).read_bytes()

    again = run_recipe(load_recipe(path), stream_output=False, echo=lambda _: None, until="mine-r1")
    assert [s["status"] for s in again["steps"]] == ["skipped"] * 3
    assert next(work.glob("mine-r1-*/mined.jsonl")).read_bytes() == mined
    # A step dir without its marker (a killed run) runs again; the others stay skipped.
    (next(work.glob("mine-r1-*")) / DONE).unlink()
    resumed = run_recipe(load_recipe(path), stream_output=False, echo=lambda _: None, until="mine-r1")
    assert [s["status"] for s in resumed["steps"]] == ["skipped", "skipped", "resumed"]
    # A changed setting re-runs that step (a new directory) and what follows it, not what comes before.
    path.write_text(path.read_text(encoding="utf-8").replace("negative_number: 3", "negative_number: 2"), "utf-8")
    changed = run_recipe(load_recipe(path), stream_output=False, echo=lambda _: None, until="mine-r1")
    assert [s["status"] for s in changed["steps"]] == ["skipped", "skipped", "ran"]
    assert len(list(work.glob("mine-r1-*"))) == 2


def test_recipe_runs_end_to_end_with_reranker_and_distillation_then_skips_everything(tmp_path: Path) -> None:
    # In the default run: tiny models and 2-step trainings; its 45-60 s on the loaded 2-core machine are
    # mostly the four processes a recipe starts (the CLI, then finetune, reranker and distil trainings,
    # ~10 s each): the process boundaries are what is tested, so they stay.
    reranker = "  reranker: {enabled: true, train: {max_steps: 2, batch_size: 2, train_group_size: 2, max_len: 32, " \
               "query_max_len: 16, passage_max_len: 16, logging_steps: 1}}\n" \
               "  score: {enabled: true, batch_size: 8, max_length: 32}\n  distil: {max_steps: 2}\n" \
               "  evaluate: {include_base: false, rerank_top: 5}\n"
    path = _recipe(tmp_path, steps=f"  finetune: {FINETUNE % (2, 0)}\n" + reranker)
    result = _cli("run", str(path), cwd=tmp_path, env=dict(os.environ, SEMSEARCH_TORCH_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s[0] for s in summary["steps"]] == [
        "prepare", "extend-vocab", "mine-r1", "finetune-r1", "reranker", "mine-distil", "score", "distil", "evaluate"]
    assert all(status == "ran" for _, status, _ in summary["steps"])
    work = tmp_path / "runs" / "tiny"
    report = json.loads((work / "report-tiny" / "report.json").read_text(encoding="utf-8"))
    entries = report["evaluation"]["models"]
    assert [m["label"] for m in entries] == ["extended (untrained)", "round 1", "distilled"]
    assert entries[-1]["rerank"]["top"] == 5 and "global" in entries[-1]["rerank"]["pools"]
    scored = [json.loads(line) for line in next(work.glob("score-*/scored.jsonl")).read_text("utf-8").splitlines()]
    assert all(len(r["neg_scores"]) == len(r["neg"]) for r in scored)  # our reranker was the teacher
    manifests = list(work.glob("reranker-*/**/semsearch_reranker.json"))  # what serving and promotion read
    assert len(manifests) == 1 and json.loads(manifests[0].read_text("utf-8"))["activation"] == "none"
    assert report["losses"]["finetune-r1"] and (work / "report-tiny" / "losses.png").exists()
    markdown = (work / "report-tiny" / "report.md").read_text(encoding="utf-8")
    assert "| distil |" in markdown and "distilled → reranker (top 5)" in markdown
    page = (work / "report-tiny" / "report.html").read_text(encoding="utf-8")
    assert_self_contained_html(page)
    # A loss panel per training step, the metric charts and tables, the wall-time chart.
    assert all(f">{step}<" in page for step in ("finetune-r1", "reranker", "distil"))
    assert "distilled → reranker (top 5)" in page and "test pool" in page and "global pool" in page
    assert page.count("<svg") == 4 and "Wall time per step" in page

    again = run_recipe(load_recipe(path), stream_output=False, echo=lambda _: None)
    assert {s["status"] for s in again["steps"]} == {"skipped"}
    assert again["evaluation"] == report["evaluation"]


def assert_self_contained_html(page: str) -> None:
    """Nothing to fetch: no script, no stylesheet link, no http(s) resource (SVG namespaces are names)."""
    assert page.startswith("<!doctype html>") and "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|url\(\s*["']?\s*(https?:)?//|@import""", page)


def test_the_html_report_charts_every_round_mode_and_passage_benchmark_escaped(tmp_path: Path) -> None:
    metrics = {name: 0.5 for name in TABLE_COLUMNS}
    pools = {pool: {"candidates": 6, "queries": 3, "metrics": metrics} for pool in ("test", "global")}
    retrieval = {mode: pools for mode in ("dense", "lexical", "hybrid")}
    passages = {"passages": 4, "questions": 3, "models": [
        {"label": label, "retrieval": {mode: {"metrics": {c: 0.25 for c in PASSAGE_COLUMNS}}
                                       for mode in ("dense", "hybrid")}} for label in ("base", "round 1")]}
    report = {"name": "<b>tiny</b>", "finished_at": "now", "work_dir": "runs/tiny", "wall_s_this_run": 3,
              "steps": [{"step": "finetune-r1", "status": "ran", "wall_s": 2.0},
                        {"step": "evaluate", "status": "skipped", "wall_s": 1.0}],
              "losses": {"finetune-r1": [[1, 2.0], [2, 1.5]], "finetune-r2": [[1, 1.4], [2, 1.2]]},
              "evaluation": {"models": [{"label": label, "pools": pools, "retrieval": retrieval}
                                        for label in ("base", "<img src=x onerror=alert(1)>")],
                             "passages": passages}}
    page = render_html(report)
    assert_self_contained_html(page)
    assert "<b>tiny" not in page and "&lt;b&gt;tiny&lt;/b&gt;" in page and "<img" not in page
    assert page.count("<svg") == 5  # losses, two pools, passages, wall time
    for panel in ("finetune-r1", "finetune-r2", "model alone (in memory)", "dense", "lexical", "hybrid"):
        assert f">{panel}<" in page, panel  # SVG text, one panel each
    assert "base · hybrid" in page and "round 1 · dense" in page and "0.500" in page and "0.250" in page


def test_a_run_killed_mid_finetune_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    # In the default run (45-50 s on the loaded 2-core machine): two CLI runs, each starting one
    # training process; killing the process group is the point, so it cannot run in-process.
    total = 60
    path = _recipe(tmp_path, steps=f"  finetune: {FINETUNE % (total, 5)}\n  evaluate: {{enabled: false}}\n")
    env = dict(os.environ, SEMSEARCH_TORCH_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "semsearch", "train", "run", str(path)], cwd=tmp_path,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = tmp_path / "runs" / "tiny"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if list(work.glob("finetune-r1-*/model/checkpoint-*/trainer_state.json")):
                break
            time.sleep(0.02)
        assert process.poll() is None, "training finished before a checkpoint could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)  # the whole job, as an OOM kill or a lost machine would
    finally:
        process.wait(timeout=30)
    step_dir = next(work.glob("finetune-r1-*"))
    assert not (step_dir / DONE).exists()
    result = _cli("run", str(path), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finetune-r1: resuming" in result.stderr
    log = json.loads((step_dir / "model" / "training" / "train_log.json").read_text(encoding="utf-8"))
    resumed = log["resumed_from_step"]
    assert resumed and 0 < resumed < total
    assert log["global_step"] == total
    assert log["steps_this_run"] == total - resumed  # continued, not restarted
    assert not list((step_dir / "model").glob("checkpoint-*"))  # cleaned once done
    assert (step_dir / DONE).exists()


def test_extra_sources_train_only_and_leave_the_held_out_split_as_it_was(tmp_path: Path) -> None:
    from trainer.prepare import Source, prepare

    labelled = _write_data(tmp_path)
    triplets = tmp_path / "simclue.jsonl"
    triplets.write_text(
        json.dumps({"query": "快递怎么查", "title": "查快递", "neg_title": "发票怎么开"}, ensure_ascii=False) + "\n"
        # This one shares a text with a BQ intent: it joins that intent's group, whichever side it is on.
        + json.dumps({"query": "退款多久到", "title": "如何申请退款", "neg_title": "积分"}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    squad = tmp_path / "cmrc.json"
    squad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "退款在三个工作日内完成。", "qas": [
        {"question": "退款要几天？"}, {"question": "退款多久完成"}, {"question": " "}]}]}]}, ensure_ascii=False),
        encoding="utf-8")
    alone = prepare(labelled=[labelled], test_ratio=0.25, seed=3)
    extra = prepare(sources=[Source("labelled", labelled), Source("triplets", triplets, holdout=False),
                             Source("squad", squad, holdout=False)], test_ratio=0.25, seed=3)
    assert [r.query for r in extra.test] == [r.query for r in alone.test]  # same held-out intents
    assert all(getattr(r, "source", None) is None for r in extra.test)  # only held-out sources are tested
    train_texts = {t for r in extra.train for t in (r.query, *r.pos, *r.neg)}
    test_texts = {t for r in extra.test for t in (r.query, *r.pos, *r.neg)}
    assert not train_texts & test_texts
    squad_rows = [r for r in extra.train if r.pos == ["退款在三个工作日内完成。"]]
    assert len(squad_rows) == 2 and len({r.group for r in squad_rows}) == 1  # blank question skipped
    assert extra.stats["extra_train_rows"] >= 3
    squad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": 1}]}]}]}), "utf-8")
    with pytest.raises(Exception, match=r"cmrc\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: needs a `question`"):
        prepare(sources=[Source("squad", squad, holdout=False)])


SHIPPED_RECIPES = sorted((Path(__file__).parent.parent / "trainer" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    # Schema and settings on every machine; the files too where ../shared/data (trainer/RESULTS.md) is.
    recipe = load_recipe(path, check_files=False)
    assert recipe.name == path.stem  # each report lands in its own report-<name>/
    if (path.parent / "../../../shared/data").resolve().is_dir():
        assert load_recipe(path).name == path.stem


def test_a_schema_check_skips_the_files_but_not_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: ./absent-model\ndata: {sources: [{labelled: absent.tsv}]}\n"
                    "steps: {evaluate: {passages: [absent.json]}}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(path)
    assert load_recipe(path, check_files=False).data.sources[0].labelled == tmp_path / "absent.tsv"
    path.write_text("model: x\ndata: {sources: [{labelled: absent.tsv}]}\nsteps: {finetune: {epoch: 1}}\n",
                    encoding="utf-8")
    with pytest.raises(RecipeError, match=r"steps\.finetune\.epoch: unknown key"):
        load_recipe(path, check_files=False)
