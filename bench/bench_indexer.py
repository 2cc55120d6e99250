"""Batch indexer benchmark: throughput against the bare encoder, and flat memory.

    nice .venv/bin/python bench/bench_indexer.py                       # CMRC2018 + memory check
    nice .venv/bin/python bench/bench_indexer.py --skip-memory
    nice .venv/bin/python bench/bench_indexer.py --milvus-uri http://127.0.0.1:19530

1. Throughput. The CMRC2018 passages (`../shared/data/cmrc2018`, skipped when absent) are chunked
   for MiniLM (256 tokens), then in the same run, alternating (bare, index, bare, index, bare): the
   bare encoder encodes exactly those chunks in the indexer's batches, and the indexer indexes the
   passages into a fresh collection (read → chunk → plan → encode → write → flush/checkpoint).
   Ratio = indexer chunks/s ÷ the mean of the bare passes around it (target ≥ 0.9); the share of
   the indexer's wall time its encoder stage was busy is reported too (load-independent).
2. Memory. A synthetic corpus of 20k and of 200k short documents, each indexed by a fresh
   subprocess; peak RSS (ru_maxrss) of 200k must stay within 10% of 20k. The encoder there is the
   tests' tiny random BERT by default (`--memory-model`): flatness is a property of the pipeline,
   and MiniLM at 200k documents takes hours on a shared 2-core machine.

Milvus runs in its own process (Milvus Lite served by a child process, or with --backend server the
real Milvus 2.3.5 standalone; or any --milvus-uri), so the RSS measured is the indexer's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "cmrc2018"
CMRC_FILES = ("cmrc2018_dev.json", "cmrc2018_trial.json")
SYNTH_CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"  # noqa: E501


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cmrc_passages(data_dir: Path) -> list[dict[str, Any]]:
    """Unique passages of CMRC2018 dev + trial: {"id", "text", "metadata": {"title"}}."""
    passages: dict[str, dict[str, Any]] = {}
    for name in CMRC_FILES:
        for article in json.loads((data_dir / name).read_text(encoding="utf-8"))["data"]:
            for paragraph in article["paragraphs"]:
                passages.setdefault(paragraph["id"], {
                    "id": paragraph["id"], "text": paragraph["context"],
                    "metadata": {"title": article.get("title", ""), "source": name},
                })
    return list(passages.values())


def synthetic(n: int, seed: int = 0) -> Any:
    rng = random.Random(seed)
    for i in range(n):
        sentences = ["".join(rng.choices(SYNTH_CHARS, k=rng.randint(6, 14))) + rng.choice("。！？；")
                     for _ in range(rng.randint(1, 3))]
        yield {"id": f"s{i}", "text": "".join(sentences), "metadata": {"i": i, "group": i % 17}}


def write_jsonl(path: Path, rows: Any) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


class Server:
    """The real Milvus 2.3.5 standalone server from the `milvus` package, in its own processes.

    Its embedded etcd listens on fixed ports (2379/2380): it fails when another server runs."""

    def __init__(self) -> None:
        from milvus import MilvusServer

        self.base = tempfile.mkdtemp(prefix="bench-indexer-milvus-")
        self.server = MilvusServer()
        self.server.set_base_dir(self.base)
        self.server.listen_port = free_port()

    def __enter__(self) -> str:
        self.server.start()
        return f"http://127.0.0.1:{self.server.listen_port}"

    def __exit__(self, *_: Any) -> None:
        self.server.stop()
        shutil.rmtree(self.base, ignore_errors=True)


LITE_OWNER = """
import signal, sys, threading
from semsearch.lite import LiteEndpoint
endpoint = LiteEndpoint.attach(sys.argv[1])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
print("ready", flush=True)
stop.wait()
endpoint.release()
"""


class LiteProcess:
    """Milvus Lite served by a process of its own (semsearch/lite.py): the indexer connects to it
    over loopback exactly as `semsearch index` does beside a running `semsearch serve`."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="bench-indexer-lite-")
        self.uri = str(Path(self.base) / "milvus.db")
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> str:
        self.process = subprocess.Popen([sys.executable, "-c", LITE_OWNER, self.uri], cwd=REPO, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the Milvus Lite process did not start")
        return self.uri

    def __exit__(self, *_: Any) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(60)
        shutil.rmtree(self.base, ignore_errors=True)


def encoder_for(model: str, batch_size: int) -> Any:
    from semsearch.encoders import TorchEncoder

    return TorchEncoder.from_ref(model, device="cpu", batch_size=batch_size)


def bare_encode(encoder: Any, texts: list[str], batch_chunks: int) -> float:
    """Seconds to encode `texts` in the indexer's batches, nothing else."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch_chunks):
        encoder.encode_documents(texts[start : start + batch_chunks])
    return time.perf_counter() - started


@contextlib.contextmanager
def warm_store(uri: str) -> Any:
    """One client for the whole benchmark, kept warm while the bare encoder runs: Milvus Lite's gRPC
    server drops a connection that idles under keepalive pings ("too many pings")."""
    from semsearch.store import MilvusStore

    store = MilvusStore(uri, timeout_s=120)
    stop = threading.Event()

    def ping() -> None:
        while not stop.wait(5.0):
            store.ping()

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    try:
        yield store
    finally:
        stop.set()
        pinger.join()
        store.close()


def index_once(source: Path, store: Any, collection: str, encoder: Any, state_dir: Path, batch_chunks: int,
               checkpoint_interval: float) -> Any:
    from indexer.job import IndexOptions, run_index
    from indexer.pipeline import PipelineConfig

    options = IndexOptions(
        inputs=[str(source)], state_dir=state_dir, progress="off",
        pipeline=PipelineConfig(batch_chunks=batch_chunks, checkpoint_interval_s=checkpoint_interval),
    )
    return run_index(options, encoder=encoder, store=store, collection=collection)


def throughput(args: argparse.Namespace, uri: str, work: Path) -> dict[str, Any] | None:
    with warm_store(uri) as store:
        return _throughput(args, store, work)


def _throughput(args: argparse.Namespace, store: Any, work: Path) -> dict[str, Any] | None:
    from indexer.pipeline import token_counter
    from semsearch.chunking import Chunker

    if not all((args.data_dir / name).exists() for name in CMRC_FILES):
        print(f"CMRC2018 not found in {args.data_dir}: throughput benchmark skipped", file=sys.stderr)
        return None
    passages = cmrc_passages(args.data_dir)[: args.max_passages or None]
    source = write_jsonl(work / "cmrc.jsonl", passages)
    encoder = encoder_for(args.model, args.encode_batch_size)
    chunker = Chunker(token_counter(encoder), encoder.manifest.max_tokens)
    # The indexer's texts exactly: the title field is prepended by the indexer only when mapped;
    # CMRC rows carry the title in metadata, so the text is the passage.
    texts = [chunk.text for passage in passages for chunk in chunker.chunk(passage["text"])]
    encoder.encode_documents(texts[:64])  # warm-up (first-call allocations)
    say(f"{len(passages)} passages, {len(texts)} chunks")
    # A shared machine's load drifts: alternate bare and indexer passes, and compare each indexer
    # pass with the mean of the bare passes just before and after it.
    bare_s: list[float] = []
    runs: list[Any] = []
    for round_index in range(args.rounds):
        bare_s.append(bare_encode(encoder, texts, args.batch_chunks))
        say(f"bare pass {round_index + 1}: {len(texts) / bare_s[-1]:.2f} chunks/s; indexing")
        runs.append(index_once(source, store, f"bench_cmrc_{int(time.time())}_{round_index}", encoder,
                               work / "state", args.batch_chunks, args.checkpoint_interval))
        result = runs[-1]
        say(f"indexer pass {round_index + 1}: {result.totals['chunks_written'] / result.elapsed_s:.2f} chunks/s")
    bare_s.append(bare_encode(encoder, texts, args.batch_chunks))
    say(f"bare pass {args.rounds + 1}: {len(texts) / bare_s[-1]:.2f} chunks/s; idempotent re-run")
    rerun = index_once(source, store, runs[-1].alias or "", encoder, work / "state", args.batch_chunks,
                       args.checkpoint_interval)
    passes = []
    for i, result in enumerate(runs):
        bare_cps = len(texts) / ((bare_s[i] + bare_s[i + 1]) / 2)
        index_cps = result.totals["chunks_written"] / result.elapsed_s
        passes.append({
            "bare_chunks_per_s": round(bare_cps, 2), "index_s": result.elapsed_s,
            "index_docs_per_s": round(result.totals["documents"] / result.elapsed_s, 2),
            "index_chunks_per_s": round(index_cps, 2), "ratio": round(index_cps / bare_cps, 3),
            "encoder_busy_share": round(result.busy_s.get("encode", 0.0) / result.elapsed_s, 3),
            "stage_busy_s": result.busy_s,
        })
    ratios = sorted(p["ratio"] for p in passes)
    return {
        "passages": len(passages), "chunks": len(texts), "chunks_written": runs[-1].totals["chunks_written"],
        "split_documents": runs[-1].totals.get("split_documents", 0),
        "bare_encode_s": [round(x, 2) for x in bare_s], "passes": passes,
        "ratio_median": round(statistics.median(ratios), 3),
        "rerun_s": rerun.elapsed_s, "rerun_written": rerun.totals.get("written", 0),
        "rerun_docs_per_s": round(rerun.totals["documents"] / rerun.elapsed_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def memory_child(args: argparse.Namespace) -> None:
    """Index `--memory-docs` synthetic documents and print one JSON line (runs in a fresh process)."""
    work = Path(tempfile.mkdtemp(prefix="bench-indexer-mem-"))
    try:
        source = write_jsonl(work / "synthetic.jsonl", synthetic(args.memory_docs))
        model = args.memory_model
        if model == "tiny":  # the tests' random-weight 2-layer BERT: same pipeline, cheap encoder
            from tests.tinymodel import build_tiny_bert

            model = str(build_tiny_bert(work / "tiny-bert", max_tokens=128))
        encoder = encoder_for(model, args.encode_batch_size)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with warm_store(args.milvus_uri) as store:
            result = index_once(source, store, f"bench_mem_{args.memory_docs}_{int(time.time())}", encoder,
                                work / "state", args.batch_chunks, args.checkpoint_interval)
        print(json.dumps({
            "documents": result.totals["documents"], "chunks": result.totals["chunks_written"],
            "seconds": result.elapsed_s, "docs_per_s": round(result.totals["documents"] / result.elapsed_s, 2),
            "rss_after_model_mib": round(rss_before / 1024, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "stage_busy_s": result.busy_s,
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def memory(args: argparse.Namespace, uri: str) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for n in args.memory_sizes:
        command = [sys.executable, __file__, "--memory-docs", str(n), "--milvus-uri", uri,
                   "--memory-model", args.memory_model,
                   "--model", args.model, "--batch-chunks", str(args.batch_chunks),
                   "--encode-batch-size", str(args.encode_batch_size),
                   "--checkpoint-interval", str(args.checkpoint_interval)]
        env = {**os.environ, "SEMSEARCH_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory run {n} failed:\n{done.stderr[-3000:]}")
        runs[str(n)] = json.loads(done.stdout.strip().splitlines()[-1])
        say(f"memory run {n}: {runs[str(n)]}")
    sizes = [str(n) for n in args.memory_sizes]
    if len(sizes) >= 2:
        small, large = runs[sizes[0]]["peak_rss_mib"], runs[sizes[-1]]["peak_rss_mib"]
        runs["growth"] = round(large / small - 1.0, 4)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--milvus-uri", default=None, help="use this Milvus instead of starting one")
    parser.add_argument("--backend", choices=["lite", "server"], default="lite",
                        help="what to start without --milvus-uri: Lite in its own process, or the real server")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--batch-chunks", type=int, default=512)
    parser.add_argument("--encode-batch-size", type=int, default=32)
    parser.add_argument("--checkpoint-interval", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2, help="indexer passes, each between two bare passes")
    parser.add_argument("--max-passages", type=int, default=0, help="index only the first N passages (0: all)")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[20_000, 200_000])
    parser.add_argument("--memory-model", default="tiny",
                        help="model of the memory runs: 'tiny' (random 2-layer BERT) or a model like --model")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--memory-docs", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from semsearch.logs import configure_logging

    configure_logging(os.environ.get("SEMSEARCH_LOG_LEVEL", "WARNING"), json_output=False)
    if args.memory_docs:
        memory_child(args)
        return
    import torch

    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "model": args.model, "batch_chunks": args.batch_chunks,
                               "load_avg_start": os.getloadavg()}
    work = Path(tempfile.mkdtemp(prefix="bench-indexer-"))
    try:
        if args.milvus_uri:
            backend: Any = contextlib.nullcontext(args.milvus_uri)
            results["milvus"] = args.milvus_uri
        elif args.backend == "server":
            backend = Server()
            results["milvus"] = "Milvus 2.3.5 standalone (local, separate processes)"
        else:
            backend = LiteProcess()
            results["milvus"] = "Milvus Lite 3.2 served by a separate process (loopback gRPC)"
        with backend as uri:
            if not args.skip_throughput:
                results["throughput"] = throughput(args, uri, work)
            if not args.skip_memory:
                results["memory"] = memory(args, uri)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_avg_end"] = os.getloadavg()
    text = json.dumps(results, ensure_ascii=False, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
