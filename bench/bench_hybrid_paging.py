"""What stable hybrid paging costs: a hybrid page (page_size 10) fuses a candidate pool sized for
`max_page_depth` (so pages never repeat or skip a hit), an unpaged top_k 10 request a pool of 20.

Through the real gRPC service, Milvus Lite in the service process, CMRC2018 dev sentences as documents and
the tiny test BERT (the encoder is the same in both rows, so what differs is the pool). Each query runs
unpaged, then its first and second page, in turn; medians and p90 per kind.

    .venv/bin/python bench/bench_hybrid_paging.py [--depth 1000] [--documents 3000] [--queries 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from semsearch.config import Settings  # noqa: E402
from semsearch.encoders import TorchEncoder  # noqa: E402
from semsearch.v1 import search_pb2 as pb  # noqa: E402
from tests.conftest import LiveService  # noqa: E402
from tests.tinymodel import build_tiny_bert  # noqa: E402


def corpus(path: Path, documents: int, queries: int) -> tuple[list[str], list[str]]:
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    paragraphs = [p for article in data for p in article["paragraphs"]]
    texts = [s for p in paragraphs for s in p["context"].split("。") if len(s) > 8][:documents]
    return texts, [qa["question"] for p in paragraphs for qa in p["qas"]][:queries]


def measure(live: LiveService, queries: list[str], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"unpaged top_k 10": [], "page 1 (page_size 10)": [], "page 2": []}
    hybrid = pb.RETRIEVAL_MODE_HYBRID
    for _ in range(rounds):
        for query in queries:
            started = time.perf_counter()
            live.stub.SearchDocuments(pb.SearchDocumentsRequest(query=query, top_k=10, mode=hybrid), timeout=60)
            times["unpaged top_k 10"].append(time.perf_counter() - started)
            started = time.perf_counter()
            first = live.stub.SearchDocuments(pb.SearchDocumentsRequest(query=query, page_size=10, mode=hybrid),
                                              timeout=60)
            times["page 1 (page_size 10)"].append(time.perf_counter() - started)
            started = time.perf_counter()
            live.stub.SearchDocuments(pb.SearchDocumentsRequest(query=query, page_size=10, mode=hybrid,
                                                                page_token=first.next_page_token), timeout=60)
            times["page 2"].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=1000, help="max_page_depth")
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cmrc2018/cmrc2018_dev.json")
    args = parser.parse_args()
    texts, queries = corpus(args.data, args.documents, args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_bert(Path(tmp) / "tiny")
        settings = Settings(milvus_uri=str(Path(tmp) / "m.db"), host="127.0.0.1", port=0, metrics_port=0,
                            collection="docs", max_page_depth=args.depth, use_registry=False, log_level="ERROR")
        live = LiveService(settings, TorchEncoder.from_ref(str(model), device="cpu"))
        try:
            for start in range(0, len(texts), 500):
                live.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
                    pb.Document(id=f"d{start + i}", text=text) for i, text in enumerate(texts[start : start + 500])
                ]), timeout=600)
            times = measure(live, queries, args.rounds)
        finally:
            live.stop()
    print(f"\n{len(texts)} documents · max_page_depth {args.depth} · {len(queries)} queries × {args.rounds} rounds")
    print("| hybrid request | p50 ms | p90 ms |\n|---|---:|---:|")
    for name, values in times.items():
        p90 = sorted(values)[int(0.9 * len(values))]
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} | {p90 * 1e3:.1f} |")


if __name__ == "__main__":
    main()
