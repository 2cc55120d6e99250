"""Remote encoder (sglang backend) client overhead against the loopback embedding server.

What it measures, all in one run on this machine:
  1. per request, float vs base64 answers: response size, time to serialize the request, time to
     decode and check the answer, the raw HTTP round trip (httpx, no decoding) and the full
     `RemoteEncoder.encode_documents` call; their difference is the client's own overhead;
  2. throughput with 1, 4 and 16 concurrent requests against a server that takes a fixed time per
     request (simulated GPU time, a sleep: the server spends no CPU on it).

The server runs in its own process (`python -m tests.embedding_server`) so that it does not share
the client's GIL, and answers repeated requests from a cache of serialized bodies: what is timed is
the client plus loopback HTTP, not the server. Vectors have bge-large-zh-v1.5's 1024 dimensions.

    .venv/bin/python bench/bench_remote.py [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the profile path: no local bge-large, no hub look-up

import httpx
import numpy as np
import structlog

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from semsearch.encoders.remote import EncodingFormat, RemoteEncoder  # noqa: E402
from semsearch.encoders.remote.config import Transport  # noqa: E402
from semsearch.encoders.remote.payload import decode_embeddings, normalize_rows, request_body  # noqa: E402

MODEL = "BAAI/bge-large-zh-v1.5"
FORMATS: tuple[EncodingFormat, ...] = ("float", "base64")
QUERY = "快递包裹几天没动静了，怎么查询物流？"
DOCUMENT = ("如何申请退款？请在订单页面点击申请退款，选择退款原因并提交。审核通过后，"
            "退款会在三个工作日内退回原支付账号。如有疑问请联系客服。") * 2


@contextmanager
def loopback_server(delay_ms: float) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.embedding_server", "--dimension", "1024", "--model-path", MODEL,
         "--cache", "--delay-ms", str(delay_ms)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"the loopback server did not start: {url!r}")
        yield url
    finally:
        process.terminate()
        process.wait(10)


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()  # warm: connections, caches
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def ms(samples: list[float], q: float = 0.5) -> float:
    return float(np.quantile(samples, q) * 1e3)


def per_request(url: str, encoding_format: EncodingFormat, texts: list[str], repeat: int) -> dict[str, float]:
    encoder = RemoteEncoder([url], model_ref=MODEL, encoding_format=encoding_format, max_batch=len(texts),
                            transport=Transport(concurrency=1))
    try:
        # The client's parts on their own: the wire format is pure functions (payload.py).
        def serialize_body() -> bytes:
            return request_body(MODEL, texts, encoding_format)

        content = serialize_body()
        serialize = timed(serialize_body, repeat)
        raw = httpx.Client(base_url=url)
        headers = {"Content-Type": "application/json"}
        response = raw.post("/v1/embeddings", content=content, headers=headers)
        names = frozenset({MODEL})

        def decode_answer() -> None:
            vectors = decode_embeddings(json.loads(response.content), expected=len(texts),
                                        dimension=encoder.manifest.dimension, served_names=names)
            normalize_rows(vectors)

        decode = timed(decode_answer, repeat)
        http = timed(lambda: raw.post("/v1/embeddings", content=content, headers=headers).read(), repeat)
        raw.close()
        full = timed(lambda: encoder.encode_documents(texts), repeat)
        return {
            "bytes": len(response.content), "serialize_ms": ms(serialize), "decode_ms": ms(decode),
            "http_ms": ms(http), "full_ms": ms(full), "overhead_ms": ms(full) - ms(http),
        }
    finally:
        encoder.close()


def throughput(
    url: str, encoding_format: EncodingFormat, concurrency: int, texts: list[str], seconds: float,
) -> dict[str, float]:
    encoder = RemoteEncoder([url], model_ref=MODEL, encoding_format=encoding_format, max_batch=len(texts),
                            transport=Transport(concurrency=concurrency))
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            encoder.encode_documents(texts)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    try:
        encoder.encode_documents(texts)
        threads = [threading.Thread(target=caller) for _ in range(concurrency)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        encoder.close()
    return {"rps": len(latencies) / wall, "texts_s": len(latencies) * len(texts) / wall,
            "p50_ms": ms(latencies), "p99_ms": ms(latencies, 0.99)}


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model}, Python {platform.python_version()}, httpx {httpx.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="requests per per-request measurement")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each throughput run")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="simulated server time per request")
    parser.add_argument("--results", type=Path, help="append the tables to this markdown file")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings only

    lines: list[str] = []
    load_start = os.getloadavg()[0]

    def out(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    batches = {"1 query": [QUERY], "32 queries": [f"{QUERY}{i}" for i in range(32)],
               "32 documents": [f"{DOCUMENT}{i}" for i in range(32)]}
    out("### Per request (server answers from cache, no delay): median of "
        f"{args.repeat} requests")
    out()
    out("| batch | format | response KiB | serialize ms | decode+check ms | raw HTTP ms "
        "| encode_documents ms | client overhead ms |")
    out("|---|---|---:|---:|---:|---:|---:|---:|")
    results: dict[tuple[str, str], dict[str, float]] = {}
    with loopback_server(0.0) as url:
        for name, texts in batches.items():
            for fmt in FORMATS:
                r = per_request(url, fmt, texts, args.repeat)
                results[(name, fmt)] = r
                out(f"| {name} | {fmt} | {r['bytes'] / 1024:.1f} | {r['serialize_ms']:.3f} "
                    f"| {r['decode_ms']:.3f} | {r['http_ms']:.2f} | {r['full_ms']:.2f} "
                    f"| {r['overhead_ms']:.2f} |")
    out()
    out(f"### Throughput, 32 queries a request, server time {args.delay_ms:.0f} ms a request "
        f"({args.seconds:.0f} s a run)")
    out()
    out("| concurrent requests | format | requests/s | texts/s | p50 ms | p99 ms | ideal requests/s |")
    out("|---:|---|---:|---:|---:|---:|---:|")
    rates: dict[tuple[int, str], float] = {}
    with loopback_server(args.delay_ms) as url:
        for concurrency in (1, 4, 16):
            for fmt in FORMATS:
                r = throughput(url, fmt, concurrency, batches["32 queries"], args.seconds)
                rates[(concurrency, fmt)] = r["rps"]
                ideal = concurrency * 1000.0 / args.delay_ms
                out(f"| {concurrency} | {fmt} | {r['rps']:.0f} | {r['texts_s']:.0f} | {r['p50_ms']:.1f} "
                    f"| {r['p99_ms']:.1f} | {ideal:.0f} |")
    out()
    out("### Ratios (same run)")
    out()
    docs_f, docs_b = results[("32 documents", "float")], results[("32 documents", "base64")]
    out(f"- base64 vs float, 32 documents: response size x{docs_b['bytes'] / docs_f['bytes']:.2f}, "
        f"decode x{docs_b['decode_ms'] / docs_f['decode_ms']:.2f}, "
        f"encode_documents latency x{docs_b['full_ms'] / docs_f['full_ms']:.2f}")
    one_f, one_b = results[("1 query", "float")], results[("1 query", "base64")]
    out(f"- base64 vs float, 1 query: encode_documents latency x{one_b['full_ms'] / one_f['full_ms']:.2f}")
    for fmt in ("float", "base64"):
        out(f"- {fmt}: throughput 16 vs 1 concurrent x{rates[(16, fmt)] / rates[(1, fmt)]:.1f}, "
            f"4 vs 1 x{rates[(4, fmt)] / rates[(1, fmt)]:.1f}")
    out(f"- median client overhead (encode_documents minus raw HTTP): "
        f"{statistics.median(r['overhead_ms'] for r in results.values()):.2f} ms")
    if args.results:
        header = [
            "",
            f"## Remote encoder (sglang backend) client, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"Machine: {machine()} (this sandbox, shared with other jobs: 1-minute load average "
            f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). Loopback server in its "
            "own process, answers cached, vectors 1024-d (bge-large-zh-v1.5). `bench/bench_remote.py`.",
            "",
        ]
        if not args.results.exists():
            header.insert(0, "# Benchmark results")
        with args.results.open("a", encoding="utf-8") as handle:
            handle.write("\n".join([*header, *lines]) + "\n")


if __name__ == "__main__":
    main()
