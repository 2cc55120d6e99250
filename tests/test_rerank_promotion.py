"""`semsearch promote --reranker`: the gate refuses a reranker that makes ranking worse, a better one
is swapped into a live service through the registry without re-embedding, and rollback returns."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from semsearch.encoders import TorchEncoder
from semsearch.registry import ModelRegistry
from semsearch.rerankers import resolve_reranker_manifest
from semsearch.v1 import admin_pb2, admin_pb2_grpc
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService
from tests.tinymodel import CHINESE, build_tiny_bert, build_tiny_cross_encoder

REPO = Path(__file__).resolve().parent.parent
HANZI = [c for c in CHINESE if "\u4e00" <= c <= "\u9fff"]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(HANZI) for _ in range(rng.randint(5, 10)))


def _paraphrase(query: str, rng: random.Random) -> str:
    """The query's characters shuffled, one dropped and one added: related by overlap, not equal."""
    chars = list(query)
    rng.shuffle(chars)
    return "".join(chars[:-1]) + rng.choice(HANZI)


def _rows(path: Path, count: int = 40) -> Path:
    rng = random.Random(7)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            query = _text(rng)
            row = {"query": query, "pos": [_paraphrase(query, rng)], "neg": [_text(rng) for _ in range(3)]}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _train_overlap_reranker(out_dir: Path, steps: int = 60) -> Path:
    """A tiny cross-encoder trained (seconds on CPU) to score character overlap: what the rows reward."""
    build_tiny_cross_encoder(out_dir, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    model = BertForSequenceClassification.from_pretrained(str(out_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(steps):
        queries = [_text(rng) for _ in range(32)]
        labels = [float(rng.random() < 0.5) for _ in queries]
        docs = [_paraphrase(q, rng) if y else _text(rng) for q, y in zip(queries, labels, strict=True)]
        logits = model(**tokenizer(queries, docs, padding=True, return_tensors="pt")).logits.view(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(out_dir))
    return out_dir


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "semsearch", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**os.environ, "SEMSEARCH_TORCH_THREADS": "1"})


def test_the_gate_refuses_a_worse_reranker_and_a_better_one_swaps_in_and_rolls_back(
        make_service: Callable[..., LiveService], tmp_path: Path) -> None:
    # In the default run: tiny models, a 60-step reranker (~2 s); the four `semsearch` processes
    # (what users run; ~10 s each, mostly imports) are most of its 40-55 s on the loaded 2-core machine.
    # Mean pooling of the tiny model ranks by shared characters: retrieval that a random reranker spoils.
    encoder = TorchEncoder.from_ref(str(build_tiny_bert(tmp_path / "mean-bert", pooling="mean")), device="cpu")
    service = make_service(encoder, collection="faq", registry_poll_s=0.3)
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
        pb.Document(id=f"d{n}", text=_text(random.Random(n))) for n in range(30)]), timeout=60)
    admin = admin_pb2_grpc.AdminServiceStub(service.channel)
    store = service.running.store
    collections = set(store.client.list_collections())
    rows = _rows(tmp_path / "heldout.jsonl")
    random_ce = build_tiny_cross_encoder(tmp_path / "random-ce", seed=5, initializer_range=0.5)
    good_ce = _train_overlap_reranker(tmp_path / "overlap-ce")
    uri = service.settings.milvus_uri
    common = ("--collection", "faq", "--milvus-uri", uri, "--eval-data", str(rows), "--rerank-candidates", "10")

    refused = _cli("promote", "--reranker", str(random_ce), *common)
    assert refused.returncode == 3, refused.stderr  # refused, not failed
    assert "gate failed" in refused.stderr and "no reranker (retrieval alone)" in refused.stderr
    assert ModelRegistry(store).get("faq").reranker is None  # type: ignore[union-attr]
    with pytest.raises(Exception, match="no reranker"):
        service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", rerank=True), timeout=30)

    forced = _cli("promote", "--reranker", str(random_ce), *common[:4], "--force")
    assert forced.returncode == 0, forced.stderr
    random_version = resolve_reranker_manifest(random_ce, str(random_ce)).version
    state = admin.ReloadServingState(admin_pb2.ReloadServingStateRequest()).state
    assert state.reranker_version == random_version
    hit = service.stub.SearchDocuments(pb.SearchDocumentsRequest(query="退款", rerank=True, top_k=3), timeout=30)
    assert hit.reranker_version == random_version

    better = _cli("promote", "--reranker", str(good_ce), *common)
    assert better.returncode == 0, better.stderr
    assert "hit@1" in better.stderr
    good_version = resolve_reranker_manifest(good_ce, str(good_ce)).version
    gate = ModelRegistry(store).get("faq").reranker.metrics["gate"]  # type: ignore[union-attr]
    assert gate["candidate"]["hit@1"] > gate["current"]["hit@1"]
    assert admin.ReloadServingState(admin_pb2.ReloadServingStateRequest()).state.reranker_version == good_version

    back = _cli("rollback", "--reranker", "--collection", "faq", "--milvus-uri", uri)
    assert back.returncode == 0, back.stderr
    assert admin.ReloadServingState(admin_pb2.ReloadServingStateRequest()).state.reranker_version == random_version
    assert set(store.client.list_collections()) == collections  # nothing was re-embedded
