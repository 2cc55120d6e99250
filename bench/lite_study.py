"""Why is Milvus Lite 3.2.2 search slow, and what fixes it?  (see STORE_NOTES.md)

Walks ONE Lite collection through the states a MilvusClient user can put it in and
measures single-query latency in each, on the same data / same machine load:

  S0  no index, tail still in the memtable        (plain create + insert)
  S1  HNSW on sealed segment(s), tail in memtable (create_index without flush)
  S2  HNSW everywhere, memtable empty             (flush -> release -> load)
  S3  brute force everywhere, memtable empty      (drop_index; flushed)
plus: nq=N batched search in state S2 (per-query amortized cost), and the engine-side
cost split for one query (cProfile), to show where the time goes.

    .venv/bin/python bench/lite_study.py --n 100000 --queries 200
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import tempfile
import time

import numpy as np
from pymilvus import DataType, MilvusClient

DIM = 384
COL = "study"


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def lat(fn, Q):
    out = []
    for q in Q:
        t = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - t) * 1000)
    a = np.array(out)
    return round(float(np.percentile(a, 50)), 1), round(float(np.percentile(a, 99)), 1)


def engine_collection(path):
    """Reach the in-process engine (for introspection/profiling only)."""
    from milvus_lite.server_manager import server_manager_instance as sm
    _srv, db, _port = sm._servers[os.path.abspath(path)]
    return db.get_collection(COL)


def layout(col):
    return {"segments": [[s.num_rows, sorted(s.indexes)] for s in col._segments_snapshot()],
            "memtable_rows": col._memtable.size()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()

    rng = np.random.default_rng(42)
    X = unit(rng, a.n, DIM)
    Q = unit(np.random.default_rng(7), a.queries, DIM)
    tmp = tempfile.mkdtemp(prefix="lite_study_", dir="/tmp")
    path = os.path.join(tmp, "study.db")
    res = {"n": a.n, "queries": a.queries, "loadavg_start": os.getloadavg()}
    try:
        c = MilvusClient(path)
        s = c.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        s.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        s.add_field("text", DataType.VARCHAR, max_length=65535)
        s.add_field("metadata", DataType.JSON)
        c.create_collection(COL, schema=s)
        t = time.time()
        for i in range(0, a.n, a.batch):
            c.insert(COL, [{"id": f"doc-{j}", "vector": X[j], "text": f"text {j}",
                            "metadata": {"category": ("refund", "shipping", "other")[j % 3], "price": j % 7}}
                           for j in range(i, min(a.n, i + a.batch))])
        res["insert_s"] = round(time.time() - t, 1)
        col = engine_collection(path)

        def search(q):
            c.search(COL, data=[q.tolist()], limit=10)

        res["S0_layout"] = layout(col)
        res["S0_noindex_memtable"] = lat(search, Q)

        ip = c.prepare_index_params()
        ip.add_index("vector", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200})
        t = time.time()
        c.create_index(COL, ip)           # loaded collection: builds HNSW inline for sealed segments
        res["create_index_s"] = round(time.time() - t, 1)
        res["S1_layout"] = layout(col)
        res["S1_hnsw_memtable"] = lat(search, Q)

        t = time.time()
        c.flush(COL)                      # memtable -> sealed segment (bg worker starts HNSW build)
        c.release_collection(COL)
        c.load_collection(COL)            # builds/loads every missing segment index synchronously
        res["flush_release_load_s"] = round(time.time() - t, 1)
        col._wait_for_bg()
        res["S2_layout"] = layout(col)
        res["S2_hnsw_flushed"] = lat(search, Q)
        res["S2_engine_only_no_grpc"] = lat(lambda q: col.search([q.tolist()], top_k=10), Q)
        segs = col._segments_snapshot()
        res["S2_faiss_only"] = lat(lambda q: [sg.indexes["vector"].search(q[None, :], 10, valid_mask=None, params=None)
                                              for sg in segs], Q)
        for nq in (10, 50):
            t = time.perf_counter()
            reps = max(1, a.queries // nq)
            for r in range(reps):
                c.search(COL, data=Q[(r * nq) % a.queries:(r * nq) % a.queries + nq].tolist(), limit=10)
            res[f"S2_batched_nq{nq}_ms_per_query"] = round((time.perf_counter() - t) * 1000 / (reps * nq), 2)
        if a.profile:
            pr = cProfile.Profile()
            pr.enable()
            for k in range(10):
                col.search([Q[k].tolist()], top_k=10)
            pr.disable()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(8)
            res["S2_profile_top"] = buf.getvalue()

        c.release_collection(COL)
        c.drop_index(COL, "vector")
        c.load_collection(COL)
        res["S3_layout"] = layout(col)
        res["S3_bruteforce_flushed"] = lat(search, Q)
        res["loadavg_end"] = os.getloadavg()
        c.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prof = res.pop("S2_profile_top", None)
    print(json.dumps(res, indent=1))
    if prof:
        print(prof)


if __name__ == "__main__":
    main()
