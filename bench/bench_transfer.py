"""Moving a collection out of Milvus Lite: `semsearch export` then `semsearch import` into the real
Milvus 2.3.5 server, at 100k chunks, without re-encoding.

    .venv/bin/python bench/bench_transfer.py --n 100000

Builds a Lite collection through MilvusStore (the service's schema; synthetic clustered unit
vectors, dim 384, so that HNSW finds true neighbours as it does on real embeddings; short
synthetic texts), exports it, imports it into a fresh server, and reports: export and import
throughput, lost rows (count difference), and, for 100 queries (perturbed copies of stored
vectors), how many top-10 lists are identical through each engine's own HNSW search, plus each
engine's recall@10 against exact search over the exported vectors.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from semsearch.config import Settings
from semsearch.manifest import ModelManifest
from semsearch.store import ChunkRow, MilvusStore, versioned_name
from semsearch.testing import MilvusTestServer
from semsearch.transfer import export_collection, import_collection, read_export, target_store

NAME = "docs"


def clustered(n: int, dim: int, seed: int = 42) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_source(uri: str, X: np.ndarray, manifest: ModelManifest) -> tuple[MilvusStore, float]:
    store = MilvusStore(uri, timeout_s=600)
    physical = versioned_name(NAME, manifest.version)
    store.ensure_collection(physical, manifest)
    store.point_alias(NAME, physical)
    started = time.perf_counter()
    for lo in range(0, len(X), 1000):
        store.upsert(physical, [ChunkRow(doc_id=f"doc-{i}", chunk_index=0, text=f"第{i}段 退款 配送 发票",
                                         vector=X[i], metadata={"n": i}, content_hash=f"h{i}")
                                for i in range(lo, min(len(X), lo + 1000))])
    store.flush(physical)
    return store, time.perf_counter() - started


def top10(store: MilvusStore, Q: np.ndarray) -> list[list[str]]:
    return [[hit.doc_id for hit in hits] for q in Q for hits in store.search(NAME, q[None, :], top_k=10)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--tmp-dir", default=None)
    args = ap.parse_args()
    manifest = ModelManifest(name="bench", version="bench-v1", pooling="cls", dimension=args.dim, max_tokens=512)
    X = clustered(args.n, args.dim)
    rng = np.random.default_rng(7)
    Q = X[rng.choice(args.n, args.queries, replace=False)] + 0.05 * rng.standard_normal((args.queries, args.dim))
    Q = (Q / np.linalg.norm(Q, axis=1, keepdims=True)).astype(np.float32)
    exact = [[f"doc-{i}" for i in np.argsort(-(X @ q))[:10]] for q in Q]
    tmp = Path(tempfile.mkdtemp(prefix="bench_transfer_", dir=args.tmp_dir))
    started_utc = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    try:
        source, build_s = build_source(str(tmp / "lite.db"), X, manifest)
        before = top10(source, Q)
        t = time.perf_counter()
        export = export_collection(source, NAME, tmp / "export")
        export_s = time.perf_counter() - t
        source.close()
        with MilvusTestServer(tmp / "server") as server:
            target = target_store(Settings(milvus_timeout_s=600), server.uri, read_export(tmp / "export"))
            report = import_collection(target, tmp / "export")
            count = target.count(report.collection)
            after = top10(target, Q)
            stored = {str(r["id"]): r["vector"] for r in target.iter_rows(report.collection, ["id", "vector"])}
            target.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = sum(a == b for a, b in zip(before, after, strict=True))
    # Every vector read back from the server, bit for bit; then exact top-10 over them equals exact over the source.
    Y = np.stack([np.asarray(stored.get(f"doc-{i}#0", np.zeros(args.dim)), np.float32) for i in range(args.n)])
    identical_vectors = int(sum(np.array_equal(X[i], Y[i]) for i in range(args.n)))
    exact_after = [[f"doc-{i}" for i in np.argsort(-(Y @ q))[:10]] for q in Q]
    exact_same = sum(a == b for a, b in zip(exact, exact_after, strict=True))
    recall = {label: np.mean([len(set(r) & set(e)) / 10 for r, e in zip(lists, exact, strict=True)])
              for label, lists in (("lite", before), ("server", after))}
    print(f"# {started_utc} cpus={os.cpu_count()} loadavg start={tuple(round(x, 1) for x in load_start)} "
          f"end={tuple(round(x, 1) for x in os.getloadavg())} n={args.n} dim={args.dim} synthetic clustered vectors")
    print("| step | value |\n|---|---|")
    print(f"| Lite build (MilvusStore upserts + flush) | {build_s:.0f} s ({args.n / build_s:.0f} rows/s) |")
    print(f"| export ({len(export['shards'])} Parquet shards) | {export_s:.1f} s ({args.n / export_s:.0f} rows/s) |")
    print(f"| import incl. verify (server 2.3.5) | {report.seconds:.1f} s ({report.rows_per_s:.0f} rows/s written) |")
    print(f"| rows exported / in server / lost | {export['rows']} / {count} / {export['rows'] - count} |")
    print(f"| sampled vectors verified bit-identical | {report.verified_vectors} |")
    print(f"| vectors read back from the server bit-identical | {identical_vectors} / {args.n} |")
    print(f"| identical exact top-10 (source vectors vs server's), {args.queries} queries | {exact_same} |")
    print(f"| identical top-10 through each engine's HNSW search, Lite vs server | {same} |")
    print(f"| recall@10 vs exact: Lite / server | {recall['lite']:.3f} / {recall['server']:.3f} |")


if __name__ == "__main__":
    main()
