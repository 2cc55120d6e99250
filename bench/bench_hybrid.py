"""Hybrid retrieval: quality of dense / lexical / hybrid on held-out BQ, and service latency per mode.

quality  — one model's vectors encoded once, then each lexical analysis indexed in Milvus Lite and
           ranked through MilvusStore.search + semsearch.fusion.fuse (the service's calls), on the test
           and global pools of `semsearch train prepare`'s split. Analyses: the `lexical_analyzer`
           settings jieba (search mode) and jieba_exact, and single characters — measured by giving
           Milvus' standard analyzer text with a space between CJK characters (Milvus Lite's standard
           tokenizer keeps a run of Han characters as one token, so this is a measurement, not a setting).
latency  — p50/p99 of SearchDocuments per mode at concurrency 1 and 8 through the real gRPC service
           (stand-in model, Milvus Lite, the shipped FAQ); the dense p50 of the same round is the baseline.

    .venv/bin/python bench/bench_hybrid.py quality --data data/test.jsonl --pool data/train.jsonl --model models/zh
    .venv/bin/python bench/bench_hybrid.py latency [--requests 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from semsearch.config import Settings
from semsearch.fusion import Fusion

TABLE = ("recall@1", "recall@10", "hit@1", "hit@10", "mrr@10", "ndcg@10")
HAN = re.compile(r"([\u3400-\u9fff\uf900-\ufaff])")


def spaced_characters(text: str) -> str:
    """A space around every Han character: any word tokenizer then yields single characters."""
    return HAN.sub(r" \1 ", text)


def parse_fusions(spec: str) -> dict[str, Fusion]:
    """`weighted:0.3:0.7,rrf:20` -> extra hybrids named `hybrid weighted 0.3/0.7`, `hybrid rrf k=20`."""
    fusions: dict[str, Fusion] = {}
    for item in filter(None, spec.split(",")):
        method, *values = item.split(":")
        if method == "weighted":
            dense, lexical = (float(v) for v in values)
            fusions[f"hybrid weighted {dense}/{lexical}"] = Fusion(method="weighted", dense_weight=dense,
                                                                   lexical_weight=lexical)
        elif method == "rrf":
            fusions[f"hybrid rrf k={int(values[0])}"] = Fusion(rrf_k=int(values[0]))
        else:
            raise SystemExit(f"--fusions: unknown method {method!r} in {item!r} (weighted:D:L or rrf:K)")
    return fusions


def quality(args: argparse.Namespace) -> dict[str, Any]:
    from semsearch.store import MilvusStore
    from trainer.encoding import encode_texts, open_encoder
    from trainer.evaluate import milvus_pool_metrics
    from trainer.rows import candidate_texts, distinct_texts, normalize_text, read_rows

    settings = Settings(torch_threads=args.threads)
    test_rows = read_rows(args.data)
    pool_rows = read_rows(args.pool) if args.pool else []
    test_texts = candidate_texts(test_rows)
    all_texts = distinct_texts([*test_texts, *candidate_texts(pool_rows)])
    keys = [normalize_text(t) for t in all_texts]
    position = {k: i for i, k in enumerate(keys)}
    pools = {"test": [position[normalize_text(t)] for t in test_texts], "global": list(range(len(all_texts)))}
    query_keys = [normalize_text(r.query) for r in test_rows]
    relevant_keys = [{normalize_text(p) for p in r.pos} for r in test_rows]

    started = time.perf_counter()
    encoder = open_encoder(settings, args.model)
    try:
        manifest = encoder.manifest
        doc_vectors = encode_texts(encoder.encode_documents, all_texts, desc="candidates", show=False)
        query_vectors = encode_texts(encoder.encode_queries, [r.query for r in test_rows], desc="queries", show=False)
    finally:
        encoder.close()
    encode_s = time.perf_counter() - started

    variants = [("jieba", "jieba", False), ("char", "standard", True), ("jieba_exact", "jieba_exact", False)]
    variants = [v for v in variants if v[0] in args.analyses.split(",")]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    dense_cache: dict[str, dict[int, Any]] = {name: {} for name in pools}  # dense hits do not change
    for label, analyzer, by_char in variants:
        phase = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-hybrid-") as tmp:
            store = MilvusStore(str(Path(tmp) / "m.db"), timeout_s=600.0, lexical_analyzer=analyzer)
            try:
                for pool_name, pool in pools.items():
                    local = {keys[g]: i for i, g in enumerate(pool)}
                    texts = [all_texts[g] for g in pool]
                    queries = [r.query for r in test_rows]
                    if by_char:
                        texts, queries = [spaced_characters(t) for t in texts], [spaced_characters(q) for q in queries]
                    modes = ("dense", "lexical", "hybrid") if label == variants[0][0] else ("lexical", "hybrid")
                    found = milvus_pool_metrics(
                        store, f"q_{pool_name}", manifest, doc_texts=texts, doc_vectors=doc_vectors[pool],
                        query_texts=queries, query_vectors=query_vectors,
                        exclude=[local.get(q) for q in query_keys],
                        relevant=[{local[k] for k in rel if k in local and k != q}
                                  for rel, q in zip(relevant_keys, query_keys, strict=True)],
                        modes=modes, fusion=Fusion(), dense_cache=dense_cache[pool_name],
                        more_fusions=parse_fusions(args.fusions),
                    )
                    for mode, value in found.items():
                        name = "dense" if mode == "dense" else f"{mode} ({label})"
                        results.setdefault(name, {})[pool_name] = value
                        print(f"{pool_name} · {name}: " + " ".join(
                            f"{c} {value['metrics'][c]:.4f}" for c in TABLE), flush=True)
            finally:
                store.close()
        seconds[label] = round(time.perf_counter() - phase, 1)

    print(f"\nBQ held out · model {manifest.version} · {len(test_rows)} queries · pools test "
          f"{len(pools['test'])} / global {len(pools['global'])} candidates · Milvus Lite · "
          f"{os.cpu_count()} CPUs · encode {encode_s:.0f} s · per analysis {seconds}")
    for pool_name in ("test", "global"):
        print(f"\n{pool_name} pool")
        print("| mode | " + " | ".join(TABLE) + " | mrr@10 vs dense |")
        print("|---|" + "---:|" * (len(TABLE) + 1))
        base = results["dense"][pool_name]["metrics"]["mrr@10"]
        for name, pools_found in results.items():
            metrics = pools_found[pool_name]["metrics"]
            ratio = metrics["mrr@10"] / base if base else float("nan")
            print(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in TABLE) + f" | {ratio:.2f}x |")
    return {"model": manifest.version, "results": results, "seconds": seconds, "encode_s": encode_s}


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    """Every (mode, concurrency) once per round, the modes in a rotated order each round, so that drift
    on a shared machine hits all modes alike; the ratio is taken within each round."""
    import statistics

    from loadgen import closed_loop, rotate, served_faq

    from semsearch.encoders import STAND_IN_MODEL, TorchEncoder
    from semsearch.logs import configure_logging
    from semsearch.v1 import search_pb2 as pb

    queries = ["退钱怎么操作？", "包裹好几天没动静了", "手机开不了机", "密码忘了登不上去", "发票抬头写错了能改吗",
               "保修期是多久", "会员积分怎么用", "可以分期付款吗", "how do I get a refund", "where is my parcel"]
    modes = {"dense": pb.RETRIEVAL_MODE_DENSE, "lexical": pb.RETRIEVAL_MODE_LEXICAL,
             "hybrid": pb.RETRIEVAL_MODE_HYBRID}
    configure_logging("ERROR", json_output=False)
    # rounds[r][mode][concurrency]
    rounds: list[dict[str, dict[int, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(milvus_uri=str(Path(tmp) / "m.db"), port=0, collection="bench_hybrid", metrics_port=0,
                            torch_threads=args.threads)
        encoder = TorchEncoder.from_ref(args.model or STAND_IN_MODEL, device="cpu")
        async with served_faq(settings, encoder) as (_, stub, documents):
            def caller(mode: Any) -> Any:
                def call(n: int) -> Any:
                    return stub.SearchDocuments(pb.SearchDocumentsRequest(
                        query=queries[n % len(queries)] + str(n), top_k=10, mode=mode), timeout=30)
                return call

            names = list(modes)
            for name in names:  # warm-up
                await closed_loop(caller(modes[name]), concurrency=4, requests=20)
            for r in range(args.rounds):
                rounds.append({})
                for name in rotate(names, r):
                    for concurrency in (1, 8):
                        rounds[r].setdefault(name, {})[concurrency] = await closed_loop(
                            caller(modes[name]), concurrency=concurrency, requests=args.requests)
                print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{name} c{c} p50 {rounds[r][name][c].p50:.0f} ms" for name in modes for c in (1, 8)), flush=True)
    print(f"\nSearchDocuments through gRPC · {encoder.manifest.version} on CPU · Milvus Lite · "
          f"{documents} documents · {os.cpu_count()} CPUs · {platform.processor() or platform.machine()} · "
          f"{args.rounds} rounds of {args.requests} requests per row, modes in rotated order")
    print("| mode | concurrency | errors | p50 ms (median of rounds) | p99 ms (median) | req/s (median) | "
          "p50 vs dense, each round | median |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    summary: dict[str, Any] = {}
    for name in modes:
        for concurrency in (1, 8):
            results = [round_[name][concurrency] for round_ in rounds]
            ratios = [round_[name][concurrency].p50 / round_["dense"][concurrency].p50 for round_ in rounds]
            errors = sum(sum(result.errors.values()) for result in results)
            p50 = statistics.median(result.p50 for result in results)
            p99 = statistics.median(result.p99 for result in results)
            rps = statistics.median(result.throughput for result in results)
            print(f"| {name} | {concurrency} | {errors} | {p50:.2f} | {p99:.2f} | {rps:.1f} | "
                  f"{' / '.join(f'{ratio:.2f}x' for ratio in ratios)} | {statistics.median(ratios):.2f}x |")
            summary.setdefault(name, {})[concurrency] = {"p50": p50, "p99": p99, "rps": rps, "errors": errors,
                                                         "p50_vs_dense": ratios}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--data", type=Path, required=True, help="held-out rows (prepare's test.jsonl)")
    q.add_argument("--pool", type=Path, default=None, help="more rows for the global pool (train.jsonl)")
    q.add_argument("--model", required=True)
    q.add_argument("--analyses", default="jieba,char,jieba_exact", help="which lexical analyses, in order")
    q.add_argument("--fusions", default="", help="more hybrids to rank from the same searches, e.g. "
                   "weighted:0.3:0.7,rrf:20 (the default hybrid is RRF k=60, equal weights)")
    lat = sub.add_parser("latency")
    lat.add_argument("--requests", type=int, default=200, help="per mode, concurrency and round")
    lat.add_argument("--rounds", type=int, default=3)
    lat.add_argument("--model", default=None, help="default: the packaged stand-in")
    for p in (q, lat):
        p.add_argument("--threads", type=int, default=1, help="torch threads")
        p.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    summary = quality(args) if args.command == "quality" else asyncio.run(latency(args))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
