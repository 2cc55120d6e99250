"""Vector-store benchmark: Milvus Lite 3.2.2 (embedded) vs the real Milvus 2.3.5 server.

Builds the same collection (id VARCHAR pk, vector FLOAT_VECTOR dim, text VARCHAR, metadata JSON)
in each backend through pymilvus.MilvusClient, applies the best practice found for that backend
(see bench/STORE_NOTES.md), and reports insert time, time until searches hit an index, single-query
p50/p99 latency, and recall@k against exact search.

    .venv/bin/python bench/bench_store.py --n 100000 --dim 384 --queries 200 --backends lite,server

Backends:
  lite        Milvus Lite, best practice: create WITHOUT an index, insert, flush(), then
              create_index(HNSW) (builds synchronously for all sealed segments) and load.
  lite-naive  Milvus Lite as most code uses it: index given at create_collection, insert, search
              right away (no flush): ~15% of 100k rows stay in the memtable and are brute-forced
              (after a per-row pyarrow->Python conversion) on every query.
  server      Real Milvus 2.3.5 standalone from the `milvus` PyPI package, started on free
              loopback ports in a temp dir and stopped at the end: insert, flush, create_index
              (HNSW; pymilvus waits for the build), load; searches use the default Bounded
              consistency (Strong adds ~400 ms per search on 2.3.5, see STORE_NOTES.md).

Query latency is measured after all backends are built, interleaved in rounds, so that load from
other processes on the (shared, 2-core) machine hits every backend alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time

import numpy as np

COLLECTION = "bench_store"
HNSW = {"M": 16, "efConstruction": 200}


# ── real Milvus server lifecycle ────────────────────────────────────────────

def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _loopback_server_config_cls():
    from milvus import MilvusServerConfig

    class LoopbackConfig(MilvusServerConfig):
        """Gives embedded etcd its own loopback client AND peer ports.

        Stock milvus 2.3.5 passes no etcd config, so embedded etcd always binds
        127.0.0.1:2379 (client) and :2380 (peer) whatever `etcd_port` says: a second
        server on the host dies with "listen tcp 127.0.0.1:2380: bind: address already
        in use" (and `etcd.endpoints` may point at someone else's etcd). We write an
        embed-etcd YAML and reference it via `etcd.config.path`.
        """

        def write_config(self):
            super().write_config()
            cfg_dir = os.path.join(self.base_data_dir, "configs")
            client = int(self.configurable_items["etcd_port"][1])
            peer = free_port()
            etcd_yaml = os.path.join(cfg_dir, "embedEtcd.yaml")
            with open(etcd_yaml, "w", encoding="utf-8") as f:
                f.write(
                    "name: default\n"
                    f"listen-client-urls: http://127.0.0.1:{client}\n"
                    f"advertise-client-urls: http://127.0.0.1:{client}\n"
                    f"listen-peer-urls: http://127.0.0.1:{peer}\n"
                    f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
                    f"initial-cluster: default=http://127.0.0.1:{peer}\n"
                )
            path = os.path.join(cfg_dir, "milvus.yaml")
            with open(path, encoding="utf-8") as f:
                text = f.read()
            text = text.replace(f"endpoints: localhost:{client}", f"endpoints: 127.0.0.1:{client}", 1)
            text = text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd_yaml}\n", 1)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)

    return LoopbackConfig


class MilvusServerHandle:
    """Start/stop the Milvus 2.3.5 standalone binary shipped in the `milvus` PyPI package.

    From milvus/__init__.py:
      * set_base_dir() before start(): binaries are unpacked (lzma, ~10 s the first time) to
        <base>/bin, config to <base>/configs/milvus.yaml, data to <base>/data, logs to <base>/logs.
      * `listen_port` is the *starting* proxy port: start() probes 127.0.0.1 upward from it and
        takes the first free one, so read listen_port back after start(). Same for every other
        *_port (rootCoord 53100, dataCoord 13333, ..., metrics 9091).
      * The Go gRPC servers listen on ":port" (all interfaces) in 2.3.x; there is no listen-ip
        setting. We set every component's advertised `ip` to 127.0.0.1 so all internal traffic and
        the client use loopback; etcd binds 127.0.0.1 only.
      * stop(): SIGTERM, 1 s grace, then SIGKILL.
    """

    COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord",
                  "indexNode", "dataCoord", "dataNode")

    def __init__(self, base_dir: str | None = None):
        from milvus import MilvusServer
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="milvus_srv_", dir="/tmp")
        self.server = MilvusServer(_loopback_server_config_cls()())
        self.port: int | None = None

    def start(self) -> str:
        self.server.set_base_dir(self.base_dir)
        self.server.listen_port = free_port()
        self.server.config.set("etcd_port", free_port())
        for comp in self.COMPONENTS:
            self.server.config.set(f"{comp}.ip", "127.0.0.1")
        try:
            self.server.start()
        except BaseException:
            self.server.stop()
            raise
        self.port = self.server.listen_port
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()


# ── data ────────────────────────────────────────────────────────────────────

def unit_vectors(seed: int, n: int, dim: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def rows(X: np.ndarray, lo: int, hi: int) -> list[dict]:
    cats = ("refund", "shipping", "account", "other")
    return [{"id": f"doc-{i}", "vector": X[i], "text": f"document {i}",
             "metadata": {"category": cats[i % 4], "price": i % 10}} for i in range(lo, hi)]


def make_schema(client, dim: int):
    from pymilvus import DataType
    s = client.create_schema(auto_id=False, enable_dynamic_field=False, description="bench_store")
    s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    s.add_field("text", DataType.VARCHAR, max_length=65535)
    s.add_field("metadata", DataType.JSON)
    return s


def hnsw_params(client):
    ip = client.prepare_index_params()
    ip.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE", params=dict(HNSW))
    return ip


# ── backends ────────────────────────────────────────────────────────────────

class Backend:
    name = "?"

    def __init__(self, args, X):
        self.args, self.X = args, X
        self.client = None
        self.info: dict = {"backend": self.name, "n": len(X)}

    def insert_all(self):
        t = time.perf_counter()
        for lo in range(0, len(self.X), self.args.batch):
            self.client.insert(COLLECTION, rows(self.X, lo, min(len(self.X), lo + self.args.batch)))
        self.info["insert_s"] = time.perf_counter() - t

    def search_once(self, q: np.ndarray, limit: int):
        return self.client.search(COLLECTION, data=[q.tolist()], limit=limit,
                                  search_params={"metric_type": "COSINE", "params": {"ef": self.args.ef}})

    def close(self):
        pass


class LiteBackend(Backend):
    name = "lite"

    def build(self):
        from pymilvus import MilvusClient
        self.tmp = tempfile.mkdtemp(prefix="bench_lite_", dir=self.args.tmp_dir)
        self.path = os.path.join(self.tmp, "bench.db")       # a directory despite the suffix
        t = time.perf_counter()
        self.client = MilvusClient(self.path)                 # starts the in-process gRPC server
        self.info["startup_s"] = time.perf_counter() - t
        # No index yet: otherwise every auto-flushed segment (the memtable seals at 128 MiB,
        # ~85k rows of dim 384) gets an HNSW build in a background thread that competes with
        # the inserts, and there is no API to learn when it is done.
        self.client.create_collection(COLLECTION, schema=make_schema(self.client, self.args.dim))
        self.insert_all()
        t = time.perf_counter()
        # 1. flush: move the memtable tail into a sealed segment. Memtable rows are re-converted
        #    row by row (pyarrow .as_py()) and brute-forced on EVERY search.
        self.client.flush(COLLECTION)
        # 2. create_index on a loaded collection builds HNSW synchronously for every sealed
        #    segment inside the RPC, so when it returns every row is served by the index.
        try:
            self.client.create_index(COLLECTION, hnsw_params(self.client))
        except Exception as e:
            # Seen once under heavy load: the long CreateIndex RPC got retried by pymilvus and the
            # retry reports the index the first attempt created.
            if "already exists" not in str(e):
                raise
            self.info["note"] = "create_index retried by pymilvus; index existed"
        self.client.load_collection(COLLECTION)
        self.info["ready_s"] = time.perf_counter() - t

    def close(self):
        if self.client is not None:
            self.client.close()
        try:
            from milvus_lite.server_manager import server_manager_instance
            server_manager_instance.release_server(self.path)   # stop gRPC thread, release LOCK
        except Exception:
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)


class LiteNaiveBackend(LiteBackend):
    name = "lite-naive"

    def build(self):
        from pymilvus import MilvusClient
        self.tmp = tempfile.mkdtemp(prefix="bench_lite_naive_", dir=self.args.tmp_dir)
        self.path = os.path.join(self.tmp, "bench.db")
        t = time.perf_counter()
        self.client = MilvusClient(self.path)
        self.info["startup_s"] = time.perf_counter() - t
        self.client.create_collection(COLLECTION, schema=make_schema(self.client, self.args.dim),
                                      index_params=hnsw_params(self.client))
        self.insert_all()
        # The API says "ready" at once (DescribeIndex always reports Finished on Lite), but the
        # auto-flushed segment's HNSW is built by a background thread. To measure the steady
        # state rather than a moving target we wait for that thread via engine internals
        # (measurement aid only; a MilvusClient user has no such call).
        t = time.perf_counter()
        from milvus_lite.server_manager import server_manager_instance as sm
        _srv, db, _port = sm._servers[os.path.abspath(self.path)]
        col = db.get_collection(COLLECTION)
        col._wait_for_bg()
        self.info["ready_s"] = time.perf_counter() - t
        self.info["layout"] = {"segments": [[sg.num_rows, sorted(sg.indexes)] for sg in col._segments_snapshot()],
                               "memtable_rows": col._memtable.size()}


class ServerBackend(Backend):
    name = "server"

    def build(self):
        from pymilvus import MilvusClient
        self.handle = MilvusServerHandle(tempfile.mkdtemp(prefix="bench_milvus_", dir=self.args.tmp_dir))
        t = time.perf_counter()
        uri = self.handle.start()
        self.info["startup_s"] = time.perf_counter() - t
        self.info["uri"] = uri
        self.client = MilvusClient(uri)
        self.client.create_collection(COLLECTION, schema=make_schema(self.client, self.args.dim))
        self.insert_all()
        t = time.perf_counter()
        self.client.flush(COLLECTION)                          # seal growing segments
        self.client.create_index(COLLECTION, hnsw_params(self.client))   # waits for the build
        self.client.load_collection(COLLECTION)
        self.info["ready_s"] = time.perf_counter() - t
        d = self.client.describe_index(COLLECTION, "vector")
        self.info["indexed_rows"] = d.get("indexed_rows")

    def close(self):
        if self.client is not None:
            self.client.close()
        self.handle.stop()
        shutil.rmtree(self.handle.base_dir, ignore_errors=True)


BACKENDS = {"lite": LiteBackend, "lite-naive": LiteNaiveBackend, "server": ServerBackend}


# ── measurement ─────────────────────────────────────────────────────────────

def exact_topk(X: np.ndarray, Q: np.ndarray, k: int) -> list[set]:
    out = []
    for lo in range(0, len(Q), 50):
        s = Q[lo:lo + 50] @ X.T
        idx = np.argpartition(-s, k, axis=1)[:, :k]
        out.extend({f"doc-{i}" for i in row} for row in idx)
    return out


def measure(backends: list[Backend], Q: np.ndarray, truth: list[set], k: int, rounds: int, warmup: int):
    lat = {b.name: [] for b in backends}
    hits = {b.name: 0 for b in backends}
    for b in backends:
        for q in Q[:warmup]:
            b.search_once(q, k)
    chunks = np.array_split(np.arange(len(Q)), rounds)
    for chunk in chunks:                         # interleave backends round by round
        for b in backends:
            for i in chunk:
                t = time.perf_counter()
                res = b.search_once(Q[i], k)
                lat[b.name].append((time.perf_counter() - t) * 1000)
                hits[b.name] += len({h["id"] for h in res[0]} & truth[i])
    for b in backends:
        a = np.array(lat[b.name])
        b.info.update(p50_ms=float(np.percentile(a, 50)), p99_ms=float(np.percentile(a, 99)),
                      mean_ms=float(a.mean()), recall=hits[b.name] / (k * len(Q)))


def table(infos: list[dict]) -> str:
    server = next((i for i in infos if i["backend"] == "server"), None)
    hdr = ["backend", "n", "insert s", "index/ready s", "p50 ms", "p99 ms", f"recall@{ARGS.topk}",
           "p50 vs server", "p99 vs server"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for i in infos:
        r50 = r99 = "-"
        if server and i is not server:
            r50 = f"{i['p50_ms'] / server['p50_ms']:.1f}x"
            r99 = f"{i['p99_ms'] / server['p99_ms']:.1f}x"
        lines.append("| " + " | ".join([
            i["backend"], str(i["n"]), f"{i['insert_s']:.1f}", f"{i['ready_s']:.1f}",
            f"{i['p50_ms']:.1f}", f"{i['p99_ms']:.1f}", f"{i['recall']:.3f}", r50, r99]) + " |")
    return "\n".join(lines)


def main(argv=None):
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--backends", default="lite,server",
                    help="comma list of: " + ",".join(BACKENDS))
    ap.add_argument("--batch", type=int, default=1000, help="rows per insert call")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--ef", type=int, default=64, help="HNSW ef at search time")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4, help="interleaving rounds across backends")
    ap.add_argument("--tmp-dir", default=None, help="parent for temp data dirs (default: system tmp)")
    ap.add_argument("--json-out", default=None)
    args = ARGS = ap.parse_args(argv)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for nm in names:
        if nm not in BACKENDS:
            ap.error(f"unknown backend {nm!r}")
    logging.basicConfig(level=logging.ERROR)
    # pymilvus probes AllocTimestamp, which Lite does not implement; grpc logs that at ERROR.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)

    X = unit_vectors(42, args.n, args.dim)
    Q = unit_vectors(7, args.queries, args.dim)
    truth = exact_topk(X, Q, args.topk)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    backends: list[Backend] = []
    try:
        for nm in names:
            b = BACKENDS[nm](args, X)
            backends.append(b)
            print(f"[{nm}] building n={args.n} ...", file=sys.stderr, flush=True)
            b.build()
            print(f"[{nm}] insert {b.info['insert_s']:.1f}s ready {b.info['ready_s']:.1f}s",
                  file=sys.stderr, flush=True)
        measure(backends, Q, truth, args.topk, args.rounds, args.warmup)
    finally:
        for b in backends:
            try:
                b.close()
            except Exception as e:
                print(f"[{b.name}] close failed: {e}", file=sys.stderr)
    infos = [b.info for b in backends]
    meta = {"started_utc": started, "cpus": os.cpu_count(), "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(), "n": args.n, "dim": args.dim, "queries": args.queries,
            "batch": args.batch, "topk": args.topk, "ef": args.ef, "hnsw": HNSW}
    print(f"# {started}  cpus={meta['cpus']}  loadavg start={tuple(round(x, 1) for x in load_start)} "
          f"end={tuple(round(x, 1) for x in meta['loadavg_end'])}  n={args.n} dim={args.dim} "
          f"queries={args.queries} batch={args.batch} top{args.topk} ef={args.ef}")
    print(table(infos))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": infos}, f, indent=1, default=str)
    return infos


ARGS = None

if __name__ == "__main__":
    main()
