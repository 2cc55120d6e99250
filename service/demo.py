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
from semsearch.encoders.local import STAND_IN_PROFILE, stand_in_model_path
from semsearch.manifest import profile_name_for
from semsearch.v1 import search_pb2 as pb
from semsearch.v1 import search_pb2_grpc
from service.output import print_hits
from service.server import start_server

console = Console()

DEMO_COLLECTION = "demo_faq"
DEMO_QUERIES = [
    "退钱怎么操作？",
    "包裹好几天没动静了",
    "手机开不了机",
    "密码忘了登不上去",
    "发票抬头写错了能改吗",
    "保修期是多久",
]
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
            used_stand_in = (Path(manifest.model_path) == stand_in_model_path()
                             and profile_name_for(settings.model) != STAND_IN_PROFILE)
            if not settings.encoder_url and used_stand_in:
                console.print(
                    f"[bold yellow]WARNING:[/bold yellow] model {settings.model!r} is not available here "
                    f"(no local copy, hub unreachable); using the packaged stand-in {manifest.name}. Its "
                    "vocabulary is English: Chinese results below show the plumbing, not search quality.",
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
                for query in DEMO_QUERIES:
                    response = await stub.SearchDocuments(
                        pb.SearchDocumentsRequest(query=query, top_k=3), timeout=60
                    )
                    print_hits(query, response)
        finally:
            await running.stop(grace_s=1)
