"""`semsearch demo`: the whole path on the embedded default, through the real gRPC API."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from rich.console import Console

from semsearch.config import Settings
from semsearch.encoders import OFFLINE_FALLBACK_MODEL
from semsearch.v1 import search_pb2 as pb
from semsearch.v1 import search_pb2_grpc
from service.output import print_hits
from service.server import start_server

console = Console()

DEMO_COLLECTION = "demo_faq"
# Each paraphrased question and the FAQ entry that answers it (for the shipped corpus).
DEMO_QUERIES = {
    "退钱怎么操作？": "faq-001",
    "包裹好几天没动静了": "faq-015",
    "手机开不了机": "faq-053",
    "密码忘了登不上去": "faq-027",
    "发票抬头写错了能改吗": "faq-082",
    "保修期是多久": "faq-092",
}
MODES = {"hybrid": pb.RETRIEVAL_MODE_HYBRID, "dense": pb.RETRIEVAL_MODE_DENSE, "lexical": pb.RETRIEVAL_MODE_LEXICAL}
UPSERT_BATCH = 64


def shipped_corpus() -> Path:
    return Path(str(resources.files("service") / "data" / "faq.jsonl"))


def read_corpus(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not row.get("id") or not row.get("text"):
                raise ValueError(f"{path}:{line_number}: each line needs an 'id' and a 'text'")
            yield row


def to_document(row: dict[str, Any]) -> pb.Document:
    document = pb.Document(id=str(row["id"]), text=str(row["text"]))
    json_format.ParseDict(row.get("metadata") or {}, document.metadata)
    return document


async def run_demo(settings: Settings, *, corpus: Path | None = None, milvus_uri_given: bool = False) -> None:
    corpus = corpus or shipped_corpus()
    with tempfile.TemporaryDirectory(prefix="semsearch-demo-") as tmp:
        updates: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "collection": DEMO_COLLECTION}
        if not milvus_uri_given:
            # A fresh embedded store: the demo never touches a running service's data.
            updates["milvus_uri"] = str(Path(tmp) / "milvus.db")
        settings = settings.model_copy(update=updates)
        console.print(f"[bold]semsearch demo[/bold] · model {settings.model} · Milvus {settings.milvus_uri}")
        running = await start_server(settings)
        try:
            engine = await running.load(allow_stand_in=True)
            manifest = engine.pair.encoder.manifest
            if not settings.encoder_url and manifest.name == OFFLINE_FALLBACK_MODEL != settings.model:
                console.print(
                    f"[bold yellow]WARNING:[/bold yellow] model {settings.model!r} is not available here "
                    f"(no local copy, hub unreachable); using the packaged {manifest.name} (Google's Universal "
                    "Sentence Encoder Multilingual v3, 512-d), which reads Chinese: a smaller, older model than "
                    "bge-large-zh, so expect fewer right answers than in production.",
                )
            console.print(f"gRPC service on {running.address} · model version {manifest.version}")
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = search_pb2_grpc.SearchServiceStub(channel)
                documents = [to_document(row) for row in read_corpus(corpus)]
                for start in range(0, len(documents), UPSERT_BATCH):
                    await stub.UpsertDocuments(
                        pb.UpsertDocumentsRequest(documents=documents[start : start + UPSERT_BATCH]), timeout=300
                    )
                console.print(f"indexed {len(documents)} FAQ entries from {corpus.name} through UpsertDocuments\n")
                runs = await _search_every_mode(stub, list(DEMO_QUERIES))
                mode = _pick_mode(runs, DEMO_QUERIES if corpus == shipped_corpus() else None)
                for i, query in enumerate(DEMO_QUERIES):
                    print_hits(query, runs[mode][i], batch_size=len(DEMO_QUERIES))
                    found = " · ".join(f"{name}: {', '.join(h.id for h in runs[name][i].hits) or '-'}"
                                       for name in ("dense", "lexical") if name in runs)
                    console.print(f"[dim]{found}[/dim]\n")
        finally:
            await running.stop(grace_s=1)


async def _search_every_mode(stub: search_pb2_grpc.SearchServiceStub,
                             queries: list[str]) -> dict[str, list[pb.SearchDocumentsResponse]]:
    """Every demo query in each mode the collection supports (lexical needs its BM25 field)."""
    runs: dict[str, list[pb.SearchDocumentsResponse]] = {}
    for name, mode in MODES.items():
        try:
            batch = await stub.BatchSearchDocuments(pb.BatchSearchDocumentsRequest(
                requests=[pb.SearchDocumentsRequest(query=q, top_k=3, mode=mode) for q in queries]), timeout=120)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            console.print(f"[dim]{name}: {exc.details()}[/dim]")
            continue
        runs[name] = list(batch.responses)
    return runs


def _pick_mode(runs: dict[str, list[pb.SearchDocumentsResponse]], answers: dict[str, str] | None) -> str:
    """The mode with the best MRR@3 on the demo questions (hybrid on ties; hybrid without answers)."""
    if answers is None:
        return "hybrid" if "hybrid" in runs else "dense"
    scores = {}
    for name, responses in runs.items():
        ranks = [next((r for r, h in enumerate(resp.hits, 1) if h.id == answer), 0)
                 for resp, answer in zip(responses, answers.values(), strict=True)]
        scores[name] = sum(1 / r for r in ranks if r) / len(ranks)
    best = max(scores, key=lambda name: (scores[name], name == "hybrid"))
    console.print("MRR@3 on the demo questions: " + " · ".join(
        f"{'[bold]' if name == best else ''}{name} {score:.2f}{'[/bold]' if name == best else ''}"
        for name, score in scores.items()) + f" → showing {best}\n")
    return best
