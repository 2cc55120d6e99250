"""Promotion: the swap pause seen by live searches, and re-embed throughput (per million documents).

A service (MiniLM on CPU) serves a synthetic corpus; a second MiniLM copy with its own manifest
version plays the candidate (same cost as a real fine-tune). Searches run at fixed concurrency
throughout `Promoter.move`; latency is reported before the promotion, during the re-embed, and in the
window around the swap.

    .venv/bin/python bench/bench_promotion.py [--documents 2000] [--milvus-server]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import milvus_server

from semsearch.config import Settings
from semsearch.encoders import STAND_IN_MODEL, TorchEncoder, stand_in_model_path
from semsearch.logs import configure_logging
from semsearch.manifest import KNOWN_PROFILES, ModelManifest
from semsearch.promotion import Promoter
from semsearch.store import MilvusStore
from semsearch.v1 import search_pb2 as pb
from semsearch.v1 import search_pb2_grpc
from service.demo import read_corpus, shipped_corpus
from service.server import start_server


def candidate_copy(directory: Path) -> Path:
    shutil.copytree(stand_in_model_path(), directory)
    profile = KNOWN_PROFILES["all-MiniLM-L6-v2"]
    ModelManifest(name="minilm-candidate", version="minilm-candidate-v2", **profile).save(directory)
    return directory


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def run(args: argparse.Namespace, uri: str, tmp: Path) -> None:
    configure_logging("ERROR", json_output=False)
    settings = Settings(milvus_uri=uri, port=0, collection="bench_promo", metrics_port=0, registry_poll_s=0.5)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    running = asyncio.run_coroutine_threadsafe(start_server(settings), loop).result()
    asyncio.run_coroutine_threadsafe(running.load(TorchEncoder.from_ref(STAND_IN_MODEL)), loop).result()
    channel = grpc.insecure_channel(running.address)
    stub = search_pb2_grpc.SearchServiceStub(channel)
    faq = [row["text"] for row in read_corpus(shipped_corpus())]
    for start in range(0, args.documents, 200):
        stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
            pb.Document(id=f"doc-{n}", text=f"{faq[n % len(faq)]}（编号{n}）")
            for n in range(start, min(args.documents, start + 200))]), timeout=600)

    samples: list[tuple[float, float, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def searcher() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.perf_counter()
            try:
                response = stub.SearchDocuments(pb.SearchDocumentsRequest(query=faq[n % len(faq)][:20], top_k=5),
                                                timeout=30)
                samples.append((time.monotonic(), (time.perf_counter() - started) * 1e3, response.model_version))
            except grpc.RpcError as exc:
                errors.append(exc.code().name)

    threads = [threading.Thread(target=searcher, daemon=True) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(args.baseline_s)
    store = MilvusStore(uri, timeout_s=120)
    candidate = TorchEncoder.from_ref(str(candidate_copy(tmp / "candidate")))
    promoter = Promoter(settings, store, propagation_s=1.5)
    began = time.monotonic()
    report = promoter.move("bench_promo", promoter.candidate_pair("bench_promo", candidate, None, {}), candidate,
                           replay_since_ms=None, event="promote")
    swapped_at = time.monotonic()
    while not samples or samples[-1][2] != candidate.manifest.version:
        time.sleep(0.05)
    first_new = next(t for t, _, version in samples if version == candidate.manifest.version)
    time.sleep(args.baseline_s)
    stop.set()
    for thread in threads:
        thread.join(30)

    before = [ms for t, ms, _ in samples if t < began]
    during = [ms for t, ms, _ in samples if began <= t < swapped_at - 1]
    around = [ms for t, ms, _ in samples if swapped_at - 1 <= t <= first_new + 1]
    after = [ms for t, ms, _ in samples if t > first_new + 1]
    print(f"\nPromotion under load · {args.documents} documents · {args.concurrency} searching clients · "
          f"Milvus {'server' if args.milvus_server else 'Lite'} · MiniLM on CPU")
    print(f"{'window':<28} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for label, values in (("before", before), ("during re-embed", during), ("swap ±1 s", around),
                          ("after", after)):
        print(f"{label:<28} {len(values):>6} {statistics.median(values) if values else float('nan'):>8.1f} "
              f"{percentile(values, 99):>8.1f}")
    print(f"errors: {len(errors)} {sorted(set(errors))}")
    print(f"swap pause: p99 around the swap / p99 before = {percentile(around, 99) / percentile(before, 99):.2f}x")
    assert report.copy is not None
    rate = report.copy.chunks_per_s
    print(f"re-embed: {report.copy.written} chunks in {report.copy.seconds:.1f} s = {rate:.1f} chunks/s "
          f"(while serving) -> {1e6 / rate / 3600:.1f} h per million single-chunk documents on this CPU")
    print(f"timings (s): {report.timings_s}")
    channel.close()
    asyncio.run_coroutine_threadsafe(running.stop(grace_s=1), loop).result()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--baseline-s", type=float, default=8.0)
    parser.add_argument("--milvus-server", action="store_true", help="use the real Milvus 2.3.5 server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.milvus_server:
            with milvus_server() as uri:
                run(args, uri, Path(tmp))
        else:
            run(args, str(Path(tmp) / "m.db"), Path(tmp))


if __name__ == "__main__":
    main()
