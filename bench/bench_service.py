"""Search latency and throughput through the real gRPC service (MiniLM on CPU, Milvus Lite).

Prints: p50/p99 latency and throughput at concurrency 1, 8, 32; the service's own overhead
(client-measured latency minus server-side encode and store time, at concurrency 1); the
micro-batching gain (throughput at 32 over 1). All measured in one run, on one machine.

    .venv/bin/python bench/bench_service.py [--requests 400] [--milvus-uri http://127.0.0.1:19530]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import closed_loop, served_faq

from semsearch.config import Settings
from semsearch.encoders import STAND_IN_MODEL, create_encoder
from semsearch.logs import configure_logging
from semsearch.v1 import search_pb2 as pb

QUERIES = ["退钱怎么操作？", "包裹好几天没动静了", "手机开不了机", "密码忘了登不上去", "发票抬头写错了能改吗",
           "保修期是多久", "会员积分怎么用", "可以分期付款吗", "how do I get a refund", "where is my parcel"]


async def run(args: argparse.Namespace) -> dict[str, object]:
    configure_logging("ERROR", json_output=False)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(milvus_uri=args.milvus_uri or str(Path(tmp) / "m.db"), port=0,
                            collection="bench_service", microbatch_max_size=args.max_batch, metrics_port=0)
        # Any model a user can serve, the packaged use-multilingual-v3 included.
        encoder = create_encoder(Settings(model=args.model, device=args.device))
        async with served_faq(settings, encoder) as (running, stub, documents):

            async def search(n: int) -> pb.SearchDocumentsResponse:
                return await stub.SearchDocuments(  # type: ignore[no-any-return]
                    pb.SearchDocumentsRequest(query=QUERIES[n % len(QUERIES)] + str(n), top_k=10), timeout=30)

            await closed_loop(search, concurrency=4, requests=40)  # warm-up
            rows = {}
            for concurrency in (1, 8, 32):
                result = await closed_loop(search, concurrency=concurrency, requests=args.requests)
                rows[concurrency] = result
                if concurrency == 1:
                    overhead = [
                        latency - r.timing.encode_ms - r.timing.store_ms  # type: ignore[attr-defined]
                        for latency, r in zip(result.latencies_ms, result.extra, strict=True)
                    ]
                    encode = [r.timing.encode_ms for r in result.extra]  # type: ignore[attr-defined]
                    store = [r.timing.store_ms for r in result.extra]  # type: ignore[attr-defined]
    engine = running.servicer.engine
    batches = engine.pair.batcher.stats if engine else None
    store_batches = engine.search_batcher.stats if engine else None
    print(f"\nSearch through gRPC · model {encoder.manifest.version} on {args.device} · "
          f"Milvus {'server' if args.milvus_uri else 'Lite'} · {documents} documents · "
          f"{os.cpu_count()} CPUs · {platform.processor() or platform.machine()}")
    print(f"{'concurrency':>11} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for concurrency, result in rows.items():
        print(f"{concurrency:>11} {result.ok:>8} {sum(result.errors.values()):>6} {result.p50:>8.2f} "
              f"{result.p99:>8.2f} {result.throughput:>8.1f}")
    gain = rows[32].throughput / rows[1].throughput
    summary = {
        "p50_overhead_ms": statistics.median(overhead), "p99_overhead_ms": sorted(overhead)[int(0.99 * len(overhead))],
        "p50_encode_ms": statistics.median(encode), "p50_store_ms": statistics.median(store),
        "microbatch_gain_32_over_1": gain,
        "largest_batch": batches.max_batch_seen if batches else None,
        "mean_batch": batches.mean_batch if batches else None,
        "mean_store_batch": store_batches.mean_batch if store_batches else None,
    }
    print(f"\nat concurrency 1: p50 encode {summary['p50_encode_ms']:.2f} ms, store {summary['p50_store_ms']:.2f} ms, "
          f"service overhead p50 {summary['p50_overhead_ms']:.2f} ms (target <= 2), "
          f"p99 {summary['p99_overhead_ms']:.2f} ms")
    print(f"micro-batching gain: throughput at 32 / at 1 = {gain:.2f}x (target >= 3); "
          f"largest encoder batch {summary['largest_batch']}, mean encoder batch {summary['mean_batch']:.1f}, "
          f"mean Milvus search batch {summary['mean_store_batch']:.1f}")
    return {"rows": {c: {"p50": r.p50, "p99": r.p99, "rps": r.throughput, "errors": r.errors}
                     for c, r in rows.items()}, **summary}


@contextlib.contextmanager
def milvus_server() -> Iterator[str]:
    from semsearch.testing import MilvusTestServer

    with tempfile.TemporaryDirectory() as data_dir, MilvusTestServer(data_dir) as server:
        yield server.uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--model", default=STAND_IN_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--milvus-uri", default=None, help="default: a temporary Milvus Lite directory")
    parser.add_argument("--milvus-server", action="store_true",
                        help="start the real Milvus 2.3.5 server (pip package milvus) on loopback and use it")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.milvus_server:
        with milvus_server() as uri:
            args.milvus_uri = uri
            summary = asyncio.run(run(args))
    else:
        summary = asyncio.run(run(args))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
