"""Embedded-engine size ladder: Milvus Lite 3.2.x (pure Python) vs Lite 2.5.x (C++) in one run window.

The two engines need different pymilvus majors (3.0 vs 2.5), so each runs in a worker process of
its own interpreter (a venv) and this driver interleaves the measurement rounds between them, so
that load from other processes on the shared machine hits both alike.

    .venv/bin/python bench/bench_engines.py --n 10000 \
        --engine lite32=.venv/bin/python --engine lite25=/tmp/lite25-venv/bin/python

Per engine and size: insert rate (rows/s, incl. BM25 tokenisation), flush, index build (FLAT,
then IVF_FLAT after drop_index), memory RSS of the worker and its children (Lite 2.5 runs a
C++ server subprocess), p50/p99 of single-query dense (FLAT and IVF_FLAT, recall@10 against
numpy exact search), lexical (BM25, jieba tokenizer) and hybrid (dense + BM25, RRF k=60).

Data is synthetic: seeded unit vectors (dim 384; `--vectors random`, the worst case for IVF, or
`clustered`, closer to real embeddings) and ~30-character "Chinese" texts of
words drawn Zipf-like from a fixed vocabulary of random 2-character CJK words; queries are
3 vocabulary words and fresh random vectors (random) or perturbed stored vectors (clustered).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

COLLECTION = "bench_engines"
DIM = 384
ANALYZER = {"tokenizer": "jieba"}


# ── data (identical in every worker: seeded) ────────────────────────────────

def unit_vectors(seed: int, n: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def corpus_vectors(kind: str, n: int) -> np.ndarray:
    """`random`: unit vectors without structure (the worst case for IVF/HNSW); `clustered`: n/50
    Gaussian clusters, closer to real embeddings, where approximate indexes find true neighbours."""
    if kind == "random":
        return unit_vectors(42, n)
    rng = np.random.default_rng(42)
    centers = rng.standard_normal((max(1, n // 50), DIM)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def query_vectors(kind: str, X: np.ndarray, count: int) -> np.ndarray:
    if kind == "random":
        return unit_vectors(7, count)
    # Perturbed copies of stored rows (a query near real content). Two generators: the first k
    # queries must not depend on `count` (workers ask for prefixes, the driver for all).
    rows = np.random.default_rng(7).integers(0, len(X), count)
    noise = np.random.default_rng(8).standard_normal((count, DIM)).astype(np.float32)
    q = X[rows] + 0.05 * noise
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def vocabulary(size: int = 3000) -> list[str]:
    rng = np.random.default_rng(5)
    chars = rng.integers(0x4E00, 0x9FA5, size=(size, 2))
    return ["".join(chr(int(c)) for c in pair) for pair in chars]


def texts(seed: int, n: int, words: int) -> list[str]:
    vocab = vocabulary()
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.3, size=(n, words)) - 1, len(vocab) - 1)
    return ["".join(vocab[r] for r in row) for row in ranks]


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants."""
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs) / 2**20


# ── worker: runs inside the engine's own interpreter ───────────────────────

class Worker:
    def __init__(self, n: int, tmp_dir: str, batch: int, vectors: str) -> None:
        from pymilvus import MilvusClient
        self.tmp = tempfile.mkdtemp(prefix="bench_engines_", dir=tmp_dir)
        self.path = os.path.join(self.tmp, "bench.db")
        self.client = MilvusClient(self.path)
        self.n, self.batch = n, batch
        self.X = corpus_vectors(vectors, n)
        self.vectors = vectors
        self.info: dict = {"python": sys.executable}
        try:
            import milvus_lite
            self.info["engine_version"] = getattr(milvus_lite, "__version__", "?")
        except Exception:
            pass

    def build(self) -> dict:
        from pymilvus import DataType, Function, FunctionType
        c = self.client
        s = c.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        s.add_field("text", DataType.VARCHAR, max_length=4096, enable_analyzer=True, analyzer_params=ANALYZER)
        s.add_field("metadata", DataType.JSON)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        s.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["text"],
                                output_field_names=["sparse"]))
        ip = c.prepare_index_params()
        ip.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        c.create_collection(COLLECTION, schema=s, index_params=ip)
        corpus = texts(1, self.n, 15)
        t = time.perf_counter()
        for lo in range(0, self.n, self.batch):
            hi = min(self.n, lo + self.batch)
            c.insert(COLLECTION, [{"id": f"doc-{i}", "text": corpus[i], "metadata": {"k": i % 10},
                                   "vector": self.X[i].tolist()} for i in range(lo, hi)])
        self.info["insert_s"] = time.perf_counter() - t
        t = time.perf_counter()
        c.flush(COLLECTION)
        self.info["flush_s"] = time.perf_counter() - t
        return self.info

    def index(self, kind: str) -> dict:
        c = self.client
        c.release_collection(COLLECTION)
        if "vector" in c.list_indexes(COLLECTION, field_name="vector"):
            c.drop_index(COLLECTION, "vector")
        params = {"nlist": max(16, int(4 * self.n ** 0.5))} if kind == "IVF_FLAT" else {}
        ip = c.prepare_index_params()
        ip.add_index(field_name="vector", index_name="vector", index_type=kind, metric_type="COSINE", params=params)
        t = time.perf_counter()
        c.create_index(COLLECTION, ip)
        c.load_collection(COLLECTION)
        out = {f"{kind}_index_s": time.perf_counter() - t, f"{kind}_rss_mib": rss_mib(os.getpid())}
        self.info.update(out)
        return out

    def search(self, kind: str, lo: int, hi: int, nprobe: int) -> dict:
        from pymilvus import AnnSearchRequest, RRFRanker
        c = self.client
        Q = query_vectors(self.vectors, self.X, hi)
        words = texts(9, hi, 3)
        lat, ids = [], []
        for i in range(lo, hi):
            t = time.perf_counter()
            if kind == "dense":
                res = c.search(COLLECTION, data=[Q[i].tolist()], anns_field="vector", limit=10,
                               search_params={"metric_type": "COSINE", "params": {"nprobe": nprobe}})
            elif kind == "lexical":
                res = c.search(COLLECTION, data=[words[i]], anns_field="sparse", limit=10,
                               search_params={"metric_type": "BM25"})
            else:
                reqs = [AnnSearchRequest(data=[Q[i].tolist()], anns_field="vector", limit=30,
                                         param={"metric_type": "COSINE", "params": {"nprobe": nprobe}}),
                        AnnSearchRequest(data=[words[i]], anns_field="sparse", limit=30,
                                         param={"metric_type": "BM25"})]
                res = c.hybrid_search(COLLECTION, reqs, ranker=RRFRanker(60), limit=10)
            lat.append((time.perf_counter() - t) * 1000)
            ids.append([h["id"] for h in res[0]])
        return {"lat": lat, "ids": ids}

    def close(self) -> dict:
        self.client.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return {}


def worker_main(args: argparse.Namespace) -> None:
    """Answer one JSON command per stdin line with one JSON line on stdout."""
    import logging
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    w = Worker(args.n, args.tmp_dir, args.batch, args.vectors)
    out = sys.stdout
    sys.stdout = sys.stderr  # engine chatter must not corrupt the protocol
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            result = getattr(w, cmd.pop("op"))(**cmd)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(result), file=out, flush=True)


# ── driver ──────────────────────────────────────────────────────────────────

class Engine:
    def __init__(self, label: str, python: str, args: argparse.Namespace) -> None:
        self.label = label
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", "--n", str(args.n), "--batch", str(args.batch),
             "--tmp-dir", args.tmp_dir or tempfile.gettempdir(), "--vectors", args.vectors],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]
        self.info: dict = {"engine": label}

    def ask(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker died during {op}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.ask("close")
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def exact_top10(kind: str, n: int, queries: int) -> list[set[str]]:
    X = corpus_vectors(kind, n)
    Q = query_vectors(kind, X, queries)
    out = []
    for lo in range(0, queries, 50):
        s = Q[lo:lo + 50] @ X.T
        out.extend({f"doc-{i}" for i in np.argpartition(-s, 10, axis=1)[:, :10][r]} for r in range(len(s)))
    return out


def measure(engines: list[Engine], kind: str, label: str, args, truth) -> None:
    """Interleave engines round by round; record p50/p99 (and recall for dense) under `label`."""
    lat = {e.label: [] for e in engines}
    ids = {e.label: [] for e in engines}
    bounds = np.linspace(0, args.queries, args.rounds + 1, dtype=int)
    for e in engines:  # warm-up
        e.ask("search", kind=kind, lo=0, hi=min(5, args.queries), nprobe=args.nprobe)
    for lo, hi in itertools.pairwise(bounds):
        for e in engines:
            r = e.ask("search", kind=kind, lo=int(lo), hi=int(hi), nprobe=args.nprobe)
            if "error" in r:
                e.info[f"{label}_error"] = r["error"]
                continue
            lat[e.label] += r["lat"]
            ids[e.label] += r["ids"]
    for e in engines:
        if not lat[e.label]:
            continue
        a = np.array(lat[e.label])
        e.info[f"{label}_p50"] = float(np.percentile(a, 50))
        e.info[f"{label}_p99"] = float(np.percentile(a, 99))
        if kind == "dense":
            hit = sum(len(set(got) & truth[i]) for i, got in enumerate(ids[e.label]))
            e.info[f"{label}_recall"] = hit / (10 * len(ids[e.label]))


def table(engines: list[Engine], n: int) -> str:
    cols = [("insert rows/s", lambda i: f"{n / i['insert_s']:.0f}" if "insert_s" in i else "-"),
            ("flush s", lambda i: f"{i.get('flush_s', float('nan')):.1f}")]
    for kind in ("FLAT", "IVF_FLAT"):
        cols.append((f"{kind} index+load s",
                     lambda i, k=kind: f"{i[k + '_index_s']:.1f}" if k + "_index_s" in i else "-"))
        cols.append((f"RSS MiB ({kind})", lambda i, k=kind: f"{i[k + '_rss_mib']:.0f}" if k + "_rss_mib" in i else "-"))
        for m in ("dense", "lexical", "hybrid"):
            key = f"{kind}_{m}"
            cols.append((f"{key} p50/p99 ms", lambda i, k=key: f"{i[k + '_p50']:.1f} / {i[k + '_p99']:.1f}"
                         if k + "_p50" in i else i.get(k + "_error", "-")[:60]))
        cols.append((f"{kind} recall@10", lambda i, k=kind: f"{i[k + '_dense_recall']:.3f}"
                     if k + "_dense_recall" in i else "-"))
    lines = ["| metric | " + " | ".join(e.label for e in engines) + " |", "|---|" + "---|" * len(engines)]
    for name, fmt in cols:
        lines.append(f"| {name} | " + " | ".join(str(fmt(e.info)) for e in engines) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", action="append", default=[], help="LABEL=PYTHON (repeatable)")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--indexes", default="FLAT,IVF_FLAT")
    ap.add_argument("--vectors", choices=["random", "clustered"], default="random")
    ap.add_argument("--tmp-dir", default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    truth = exact_top10(args.vectors, args.n, args.queries)
    engines = [Engine(*spec.split("=", 1), args) for spec in args.engine]
    try:
        for e in engines:  # builds one after the other: each gets the machine to itself
            print(f"[{e.label}] build n={args.n}", file=sys.stderr, flush=True)
            e.info.update(e.ask("build"))
        for kind in args.indexes.split(","):
            for e in engines:
                r = e.ask("index", kind=kind)
                e.info.update(r if "error" not in r else {f"{kind}_index_error": r["error"]})
                print(f"[{e.label}] {kind}: {r}", file=sys.stderr, flush=True)
            for m in ("dense", "lexical", "hybrid"):
                measure(engines, m, f"{kind}_{m}", args, truth)
    finally:
        for e in engines:
            e.close()
    load_end = os.getloadavg()
    print(f"# {started} cpus={os.cpu_count()} loadavg start={tuple(round(x, 1) for x in load_start)} "
          f"end={tuple(round(x, 1) for x in load_end)} n={args.n} queries={args.queries} "
          f"nprobe={args.nprobe} synthetic {args.vectors} vectors")
    print(table(engines, args.n))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"started": started, "loadavg": [load_start, load_end], "args": vars(args),
                       "engines": [e.info for e in engines]}, f, indent=1)


if __name__ == "__main__":
    main()
