"""Rerank stage latency through the real gRPC service, against search without rerank in the same run.

Stand-ins (no download, no Chinese model here): the encoder is the packaged all-MiniLM-L6-v2; the
cross-encoder is a RANDOM-WEIGHT BertForSequenceClassification with MiniLM-L6's shape (6 layers,
hidden 384, 12 heads: the shape of cross-encoder/ms-marco-MiniLM-L-6-v2) and MiniLM's vocabulary,
num_labels=1. Its scores mean nothing; its cost per pair is a MiniLM-L6 cross-encoder's. A
bge-reranker-v2-m3 (XLM-R large, 24 layers, hidden 1024) costs roughly 25-30x more per pair on CPU.

Prints p50/p99 latency and throughput at concurrency 1 and 8 for: search (top_k 10), search +
rerank of 20 and of 50 candidates; the server's rerank_ms; the ratio to plain search; the mean
reranker micro-batch (pairs per forward pass).

    .venv/bin/python bench/bench_rerank.py [--requests 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import Call, LoadResult, closed_loop, served_faq

from semsearch.config import Settings
from semsearch.encoders import STAND_IN_MODEL, TorchEncoder, stand_in_model_path
from semsearch.logs import configure_logging
from semsearch.v1 import search_pb2 as pb

QUERIES = ["退钱怎么操作？", "包裹好几天没动静了", "手机开不了机", "密码忘了登不上去", "发票抬头写错了能改吗",
           "保修期是多久", "会员积分怎么用", "可以分期付款吗", "how do I get a refund", "where is my parcel"]


def build_stand_in_cross_encoder(out_dir: Path) -> Path:
    """Random weights in MiniLM-L6's shape with its tokenizer: a cross-encoder's cost, not its quality."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    source = stand_in_model_path()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, out_dir / name)
    config = BertConfig.from_pretrained(str(source))
    config.num_labels = 1
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(out_dir))
    return out_dir


async def run(args: argparse.Namespace) -> dict[str, object]:
    configure_logging("ERROR", json_output=False)
    with tempfile.TemporaryDirectory() as tmp:
        reranker_dir = build_stand_in_cross_encoder(Path(tmp) / "minilm-l6-cross-encoder-random")
        settings = Settings(milvus_uri=str(Path(tmp) / "m.db"), port=0, collection="bench_rerank", metrics_port=0,
                            reranker_model=str(reranker_dir), torch_threads=args.threads,
                            max_rerank_candidates=max(200, max(args.candidates)))
        encoder = TorchEncoder.from_ref(STAND_IN_MODEL, device="cpu")
        rows: dict[tuple[str, int], LoadResult] = {}
        async with served_faq(settings, encoder) as (running, stub, documents):

            def caller(candidates: int) -> Call:
                async def search(n: int) -> pb.SearchDocumentsResponse:
                    request = pb.SearchDocumentsRequest(query=QUERIES[n % len(QUERIES)] + str(n), top_k=10,
                                                        rerank=candidates > 0, rerank_candidates=candidates)
                    return await stub.SearchDocuments(request, timeout=120)  # type: ignore[no-any-return]
                return search

            await closed_loop(caller(50), concurrency=2, requests=6)  # warm-up
            for candidates in (0, *args.candidates):
                for concurrency in (1, 8):
                    label = "search" if candidates == 0 else f"rerank {candidates}"
                    rows[(label, concurrency)] = await closed_loop(
                        caller(candidates), concurrency=concurrency, requests=args.requests)
    engine = running.servicer.engine
    batches = engine.rerank.batcher.stats if engine is not None and engine.rerank is not None else None
    print(f"\nRerank stage through gRPC · encoder {encoder.manifest.version} · cross-encoder: random-weight "
          f"MiniLM-L6-shaped stand-in · {documents} documents · torch threads {args.threads} · "
          f"{os.cpu_count()} CPUs · {platform.processor() or platform.machine()}")
    print(f"{'request':>10} {'conc':>4} {'ok':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} "
          f"{'rerank_ms p50':>13} {'p50 / search':>12}")
    summary: dict[str, object] = {}
    for (label, concurrency), result in rows.items():
        base = rows[("search", concurrency)].p50
        rerank_ms = [r.timing.rerank_ms for r in result.extra]  # type: ignore[attr-defined]
        ratio = result.p50 / base
        print(f"{label:>10} {concurrency:>4} {result.ok:>4} {result.p50:>8.1f} {result.p99:>8.1f} "
              f"{result.throughput:>7.1f} {statistics.median(rerank_ms):>13.1f} {ratio:>11.1f}x")
        summary[f"{label}@{concurrency}"] = {"p50": result.p50, "p99": result.p99, "rps": result.throughput,
                                             "rerank_ms_p50": statistics.median(rerank_ms), "ratio": ratio,
                                             "errors": result.errors}
    if batches is not None:
        print(f"reranker micro-batches: mean {batches.mean_batch:.1f} pairs, largest {batches.max_batch_seen}")
        summary["mean_rerank_batch"] = batches.mean_batch
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24, help="per row")
    parser.add_argument("--candidates", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per forward pass")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    summary = asyncio.run(run(args))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
