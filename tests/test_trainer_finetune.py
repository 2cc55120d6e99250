"""FlagEmbedding fine-tune: one CPU step on a tiny random BERT writes a loadable model and its manifest."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from semsearch.encoders import TorchEncoder
from semsearch.manifest import BGE_ZH_INSTRUCTION, MANIFEST_FILENAME, ModelManifest
from trainer.finetune import FinetuneConfig, flag_arguments, launcher, run_finetune
from trainer.rows import RowError, TrainRow, file_hash, write_rows

if importlib.util.find_spec("FlagEmbedding") is None:  # found without importing it (slow)
    pytest.skip("the trainer extra (FlagEmbedding) is not installed", allow_module_level=True)

GROUPS = [
    ["如何申请退款", "退钱怎么操作", "申请退款几天"],
    ["快递几天没动静", "包裹物流没动静", "快递运输中几天了"],
    ["手机开不了机", "手机开机不了怎么办", "手机电池发热"],
    ["密码忘记了", "登录密码找回", "账号密码忘记怎么找回"],
]


def _training_rows() -> list[TrainRow]:
    rows = []
    for i, group in enumerate(GROUPS):
        negatives = [other[0] for j, other in enumerate(GROUPS) if j != i]
        rows.append(
            TrainRow(
                query=group[0],
                pos=group[1:],
                neg=negatives,
                pos_scores=[2.0, 1.5],
                neg_scores=[0.1, -0.2, 0.3],
            )
        )
    return rows


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[FinetuneConfig, ModelManifest]:
    work = tmp_path_factory.mktemp("finetune")
    data = work / "train.jsonl"
    write_rows(data, _training_rows())
    config = FinetuneConfig(
        model=str(tiny_model_dir),
        train_data=[data],
        output_dir=work / "model",
        pooling="mean",
        train_group_size=3,
        batch_size=2,
        max_steps=1,
        learning_rate=1e-3,
        warmup_ratio=0.0,  # one step: a warmup would make its learning rate 0
        query_max_len=32,
        passage_max_len=32,
        knowledge_distillation=True,
        device="cpu",
        logging_steps=1,
        torch_threads=1,
        name="tiny-ft",
    )
    return config, run_finetune(config, stream_output=False)


def test_one_cpu_step_writes_a_loadable_model_with_its_manifest(
    finetuned: tuple[FinetuneConfig, ModelManifest], tiny_model_dir: Path
) -> None:
    config, manifest = finetuned
    out = config.output_dir
    saved = ModelManifest.load(out / MANIFEST_FILENAME)
    assert saved == manifest
    assert manifest.pooling == "mean"  # as trained, not the parent's cls
    assert manifest.query_instruction == BGE_ZH_INSTRUCTION and manifest.normalize
    assert manifest.parent_model == "tiny-zh-bert-seed0-cls"
    assert manifest.data_hash == file_hash([out / "training" / "train_data.jsonl"])
    assert manifest.version.startswith("tiny-ft-" + manifest.data_hash[:8])
    assert manifest.dimension == 32 and manifest.created_at
    train = manifest.metrics["train"]
    assert train["steps"] == 1 and train["rows"] == 4 and train["first_loss"] is not None
    # Serving loads it with the manifest's pooling and instruction.
    encoder = TorchEncoder.from_ref(str(out), device="cpu")
    assert encoder.manifest.version == manifest.version and encoder.manifest.pooling == "mean"
    vectors = encoder.encode_queries(["如何申请退款"])
    assert vectors.shape == (1, 32) and np.isfinite(vectors).all()
    # The weights moved, the parent's did not get overwritten.
    parent = TorchEncoder.from_ref(str(tiny_model_dir), device="cpu")
    same_text = "如何申请退款"
    assert not np.allclose(
        encoder.encode_documents([same_text]),
        TorchEncoder(
            tiny_model_dir, parent.manifest.model_copy(update={"pooling": "mean"}), device="cpu"
        ).encode_documents([same_text]),
        atol=1e-5,
    )
    # Other tools (sentence-transformers) read the same pooling.
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    # Exactly the contract fields were trained on.
    first = json.loads((out / "training" / "train_data.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"query", "pos", "neg", "pos_scores", "neg_scores"}


def test_refuses_to_overwrite_and_rejects_bad_rows_before_training(
    finetuned: tuple[FinetuneConfig, ModelManifest], tmp_path: Path
) -> None:
    config, _ = finetuned
    with pytest.raises(ValueError, match="not empty"):
        run_finetune(config)
    stranger = tmp_path / "not-a-model"
    (stranger / "notes").mkdir(parents=True)
    with pytest.raises(ValueError, match="not the output of an earlier fine-tune"):
        run_finetune(config.model_copy(update={"output_dir": stranger}), overwrite=True)
    assert (stranger / "notes").exists()
    bad = tmp_path / "bad.jsonl"
    write_rows(bad, [*_training_rows()[:2], TrainRow(query="退款", pos=["退钱"])])
    with pytest.raises(RowError, match=r"bad.jsonl:3: neg is empty"):
        run_finetune(config.model_copy(update={"train_data": [bad], "output_dir": tmp_path / "m"}))
    no_scores = tmp_path / "no_scores.jsonl"
    write_rows(no_scores, [r.without_scores() for r in _training_rows()])
    with pytest.raises(RowError, match=r":1: pos_scores/neg_scores missing"):
        run_finetune(config.model_copy(update={"train_data": [no_scores], "output_dir": tmp_path / "m2"}))


def test_config_maps_to_flagembedding_arguments(tmp_path: Path) -> None:
    config = FinetuneConfig.load(
        None,
        model="m",
        train_data=[tmp_path / "t.jsonl"],
        output_dir=tmp_path / "o",
        pooling="cls",
        temperature=0.05,
        train_group_size=4,
        epochs=3,
        learning_rate=2e-5,
        knowledge_distillation=False,
        device="cpu",
        query_max_len=None,
    )
    args = flag_arguments(
        config,
        model_dir=tmp_path / "m",
        pooling="cls",
        train_file=tmp_path / "t.jsonl",
        cache_dir=tmp_path / "c",
    )
    pairs = dict(zip(args[::2], args[1::2], strict=False))
    assert pairs["--sentence_pooling_method"] == "cls"
    assert pairs["--temperature"] == "0.05" and pairs["--train_group_size"] == "4"
    assert pairs["--query_instruction_for_retrieval"] == BGE_ZH_INSTRUCTION
    assert pairs["--knowledge_distillation"] == "False" and pairs["--num_train_epochs"] == "3.0"
    assert pairs["--query_max_len"] == "64"  # None from the CLI means "not given": the default stays
    assert pairs["--use_cpu"] == "True" and pairs["--fp16"] == pairs["--bf16"] == "False"
    assert launcher(config)[-2:] == ["-m", "trainer._flag_entry"]
    assert "torch.distributed.run" in launcher(config.model_copy(update={"launcher": "torchrun"}))
    gpu = config.model_copy(update={"device": "cuda", "nproc_per_node": 4})
    assert launcher(gpu)[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert "--use_cpu" not in flag_arguments(
        gpu, model_dir=tmp_path, pooling="cls", train_file=tmp_path, cache_dir=tmp_path
    )
    yaml_file = tmp_path / "ft.yaml"
    yaml_file.write_text("model: m\ntrain_data: [a.jsonl]\noutput_dir: o\nepochs: 2\npooling: mean\n", encoding="utf-8")
    loaded = FinetuneConfig.load(yaml_file, epochs=5)
    assert loaded.epochs == 5 and loaded.pooling == "mean"
    with pytest.raises(ValueError, match="pooling"):
        FinetuneConfig.load(yaml_file, pooling="max")


def test_embedding_learning_rate_is_its_own_optimizer_group(
    finetuned: tuple[FinetuneConfig, ModelManifest], tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The embedding matrix (extend-vocab's new rows) trains at its own rate: with the body's rate
    ~0, one step moves the embeddings and nothing else."""
    import safetensors.torch

    config, _ = finetuned
    out = tmp_path / "emb-lr"
    run_finetune(
        config.model_copy(
            update={"output_dir": out, "learning_rate": 1e-12, "embedding_learning_rate": 1e-2, "weight_decay": 0.0}
        ),
        stream_output=False,
    )
    before = safetensors.torch.load_file(str(tiny_model_dir / "model.safetensors"))
    after = safetensors.torch.load_file(str(out / "model.safetensors"))
    moved = {name: float((after[name] - before[name]).abs().max()) for name in before if name in after}
    embedding = next(name for name in moved if name.endswith("word_embeddings.weight"))
    assert moved[embedding] > 1e-3  # Adam's first step: about the rate, on the rows the batch used
    assert max(v for name, v in moved.items() if name != embedding) < 1e-6, moved
