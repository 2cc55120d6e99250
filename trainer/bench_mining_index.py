"""Which index should `mine` search: the project's store (Milvus Lite, HNSW) or an exact in-memory one?

Times both on the same vectors (random unit vectors of a training pool's shape, or a saved .npy of
real ones) and measures how many of the exact top-k the HNSW search returns. Run:

    python -m trainer.bench_mining_index --pool 4338 --queries 3168 --dim 384 --k 210
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from semsearch.manifest import ModelManifest
from semsearch.store import ChunkRow, MilvusStore
from trainer.encoding import ExactIndex


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def run(pool: np.ndarray, queries: np.ndarray, k: int, search_batch: int = 256) -> dict[str, float]:
    started = time.perf_counter()
    exact_ids, _ = ExactIndex(pool).search(queries, k)
    exact_s = time.perf_counter() - started

    manifest = ModelManifest(name="bench", version="bench-1", pooling="mean", dimension=pool.shape[1], max_tokens=8)
    with tempfile.TemporaryDirectory(prefix="bench-mining-") as tmp:
        started = time.perf_counter()
        store = MilvusStore(str(Path(tmp) / "milvus.db"), timeout_s=120)
        try:
            store.create_collection("pool", manifest)
            rows = [ChunkRow(doc_id=str(i), chunk_index=0, text="", vector=v) for i, v in enumerate(pool)]
            for start in range(0, len(rows), 1000):
                store.upsert("pool", rows[start : start + 1000])
            store.flush("pool")
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            hnsw_ids: list[list[int]] = []
            for start in range(0, len(queries), search_batch):
                hits = store.search("pool", queries[start : start + search_batch], top_k=k, output_fields=())
                hnsw_ids += [[int(h.doc_id) for h in per_query] for per_query in hits]
            search_s = time.perf_counter() - started
        finally:
            store.close()
    overlap = np.mean([len(set(h) & set(e.tolist())) / k for h, e in zip(hnsw_ids, exact_ids, strict=True)])
    return {
        "pool": len(pool),
        "queries": len(queries),
        "k": k,
        "exact_search_s": round(exact_s, 3),
        "milvus_lite_load_s": round(load_s, 2),
        "milvus_lite_search_s": round(search_s, 2),
        "milvus_lite_total_s": round(load_s + search_s, 2),
        "hnsw_overlap_with_exact_top_k": round(float(overlap), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=4338)
    parser.add_argument("--queries", type=int, default=3168)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=210)
    parser.add_argument("--vectors", type=Path, help=".npy of real pool vectors (queries are drawn from it)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.vectors:
        pool = np.load(args.vectors).astype(np.float32)
        queries = pool[rng.choice(len(pool), size=min(args.queries, len(pool)), replace=False)]
    else:
        pool, queries = _unit(rng, args.pool, args.dim), _unit(rng, args.queries, args.dim)
    print(json.dumps(run(pool, queries, args.k), indent=2))


if __name__ == "__main__":
    main()
