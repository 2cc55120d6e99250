"""POST /v1/embeddings (the OpenAI-compatible route) against the gRPC search path, in one run.

One service on loopback (the shipped FAQ upserted, HTTP port on), closed-loop load at `--concurrency`
(8) with one short Chinese question per request, variants in rotated order each repetition:

    grpc_search        SearchDocuments, dense: the search path's encode rate (plus its Milvus search)
    grpc_embed_query   the Embed RPC, queries (the same query micro-batcher as searches)
    http_embed_query   POST /v1/embeddings {"input": q, "input_type": "query"} (JSON over HTTP -> gRPC hop)
    http_embed_doc     POST /v1/embeddings {"input": q} (documents: their own micro-batcher)

The target: http_embed_query's texts/s within 10% of grpc_search's queries/s (ratio >= 0.90). Client
and service share this process (and its event loop), as in bench_service.py.

    .venv/bin/python bench/bench_openai.py [--model use-multilingual-v3] [--requests 400] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.loadgen import closed_loop, rotate, served_faq
from semsearch.config import Settings
from semsearch.encoders import create_encoder
from semsearch.v1 import search_pb2 as pb

QUESTIONS = ["退钱怎么操作？", "包裹好几天没动静了", "手机开不了机", "密码忘了登不上去", "发票抬头写错了能改吗",
             "保修期是多久", "会员积分怎么用", "可以分期付款吗"]


def variants(stub: Any, http: httpx.AsyncClient) -> dict[str, Callable[[int], Awaitable[Any]]]:
    async def grpc_search(n: int) -> Any:
        return await stub.SearchDocuments(pb.SearchDocumentsRequest(
            query=QUESTIONS[n % len(QUESTIONS)], top_k=10, mode=pb.RETRIEVAL_MODE_DENSE))

    async def grpc_embed_query(n: int) -> Any:
        return await stub.Embed(pb.EmbedRequest(input=[QUESTIONS[n % len(QUESTIONS)]],
                                                input_type=pb.INPUT_TYPE_QUERY))

    def http_embed(input_type: str) -> Callable[[int], Awaitable[Any]]:
        async def call(n: int) -> Any:
            response = await http.post("/v1/embeddings", json={"input": QUESTIONS[n % len(QUESTIONS)],
                                                               "model": "semsearch", "input_type": input_type})
            response.raise_for_status()
            return response

        return call

    return {"grpc_search": grpc_search, "grpc_embed_query": grpc_embed_query,
            "http_embed_query": http_embed("query"), "http_embed_doc": http_embed("document")}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(milvus_uri=str(Path(tmp) / "milvus.db"), host="127.0.0.1", port=0, metrics_port=0,
                            http_port=args.http_port, collection="bench_openai", model=args.model,
                            torch_threads=args.torch_threads)
        encoder = create_encoder(settings, allow_stand_in=True)
        async with served_faq(settings, encoder) as (running, stub, _):
            limits = httpx.Limits(max_connections=args.concurrency * 2)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}", limits=limits,
                                         timeout=60) as http:
                calls = variants(stub, http)
                for call in calls.values():  # warm every path (connections, batchers)
                    await closed_loop(call, concurrency=args.concurrency, requests=args.concurrency * 4)
                rates: dict[str, list[float]] = {name: [] for name in calls}
                for repetition in range(args.repeat):
                    for name in rotate(list(calls), repetition):
                        result = await closed_loop(calls[name], concurrency=args.concurrency,
                                                   requests=args.requests)
                        assert not result.errors, result.errors
                        rates[name].append(result.throughput)
            model_version = encoder.manifest.version
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {"model_version": model_version, "concurrency": args.concurrency, "requests": args.requests,
            "repeat": args.repeat, "texts_per_s": medians, "runs": rates,
            "ratio_http_query_vs_grpc_search": medians["http_embed_query"] / medians["grpc_search"],
            "ratio_http_doc_vs_grpc_search": medians["http_embed_doc"] / medians["grpc_search"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="use-multilingual-v3")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--http-port", type=int, default=18080)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(f"model {report['model_version']}, concurrency {args.concurrency}, median of {args.repeat}:")
    for name, rate in report["texts_per_s"].items():
        print(f"  {name:18s} {rate:8.1f} texts/s")
    print(f"  /v1/embeddings (query) vs gRPC search: {report['ratio_http_query_vs_grpc_search']:.2f} "
          f"(target >= 0.90); documents: {report['ratio_http_doc_vs_grpc_search']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
