"""Two replicas writing one Milvus: document wholeness under races, and what settling costs.

    .venv/bin/python bench/bench_replicas.py --rounds 40 --backends lite,server [--legacy]

Per backend (Milvus Lite through its endpoint, the Milvus 2.3.5 test server):
  race        two service instances on one collection (each with its own Milvus client and
              per-document locks, as two pods), `--rounds` rounds of upsert vs delete and of
              upsert vs upsert of one id, both calls released at once; then get, the dry-run delete
              count and search in every mode the backend has are checked: fragments (a document
              neither absent nor one whole version) and ghosts (search hits of a document
              GetDocument calls missing) are counted.
  throughput  UpsertDocuments of --docs documents (3 chunks each) in batches of --batch, one
              client: documents/s, the best of --repeats.
`--legacy` runs the write path this change replaced (upsert, then one tail delete; delete by
filter once), patched in, as the baseline; run both in one sitting on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def legacy_write_documents(self: Any, name: str, rows: Sequence[Any]) -> int:
    """The write path before version settling (commit d58d9c9): upsert, then drop stale tails."""
    from semsearch.store import check_doc_id

    for row in rows:
        check_doc_id(row.doc_id)
    written_at = int(time.time() * 1000)
    written = int(self.upsert(name, rows, written_at=written_at))
    self._delete_tails(name, rows, written_at)  # the old path stopped here: no read-back, no repair
    return written


def legacy_delete_documents(self: Any, name: str, doc_ids: Sequence[str], tenant: str = "", *,
                            dry_run: bool = False) -> int:
    from semsearch.filters import render_filters, render_string_in

    if not doc_ids:
        return 0
    where = render_filters(self.tenant_condition(name, tenant))
    by_id = render_string_in("doc_id", list(doc_ids)) + (f" and {where}" if where else "")
    existing = self._query(collection_name=name, filter=by_id + " and chunk_index == 0", output_fields=["doc_id"])
    if not dry_run:
        self._delete_where(name, by_id)
    return len({str(row["doc_id"]) for row in existing})


def throughput(service: Any, docs: int, batch: int, repeats: int) -> float:
    from semsearch.v1 import search_pb2 as pb
    from tests.replica_race import SENTENCE

    best = 0.0
    for repeat in range(repeats):
        started = time.perf_counter()
        for first in range(0, docs, batch):
            service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
                pb.Document(id=f"tp-{repeat}-{n}", text=SENTENCE * 12 + str(n))
                for n in range(first, min(docs, first + batch))]), timeout=300)
        best = max(best, docs / (time.perf_counter() - started))
    return best


def run_backend(uri: str, args: argparse.Namespace, encoder: Any) -> dict[str, Any]:
    from semsearch.config import Settings
    from semsearch.v1 import search_pb2 as pb
    from tests.conftest import LiveService
    from tests.replica_race import chunk_counts, race

    settings = Settings(milvus_uri=uri, port=0, metrics_port=0, collection=f"bench_replicas_{os.getpid()}",
                        max_document_chars=200_000, use_registry=False)
    replicas = (LiveService(settings, encoder), LiveService(settings, encoder))
    try:
        counts = chunk_counts(replicas[0])
        lexical = replicas[0].running.servicer.engine.pair.collection.lexical  # type: ignore[union-attr]
        modes = [pb.RETRIEVAL_MODE_DENSE] + ([pb.RETRIEVAL_MODE_LEXICAL, pb.RETRIEVAL_MODE_HYBRID] if lexical else [])
        started = time.perf_counter()
        report = race(replicas, args.rounds, counts, modes, prefix="bench")
        race_s = time.perf_counter() - started
        docs_per_s = throughput(replicas[0], args.docs, args.batch, args.repeats)
    finally:
        for replica in replicas:
            replica.stop()
    return {"rounds": report.rounds, "fragments": len(report.fragments), "ghosts": len(report.ghosts),
            "examples": (report.fragments + report.ghosts)[:5], "race_s": round(race_s, 1),
            "upsert_docs_per_s": round(docs_per_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--backends", default="lite,server")
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--legacy", action="store_true", help="the write path before settling (baseline)")
    args = parser.parse_args()

    import structlog

    from semsearch.encoders import TorchEncoder
    from semsearch.store import MilvusStore
    from tests.tinymodel import build_tiny_bert

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    if args.legacy:
        MilvusStore.write_documents = legacy_write_documents  # type: ignore[method-assign]
        MilvusStore.delete_documents = legacy_delete_documents  # type: ignore[method-assign]
    base = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    encoder = TorchEncoder.from_ref(str(build_tiny_bert(base / "tiny")), device="cpu", batch_size=8)
    results: dict[str, Any] = {"write_path": "legacy" if args.legacy else "settled"}
    for backend in args.backends.split(","):
        if backend == "lite":
            results["lite"] = run_backend(str(base / "milvus.db"), args, encoder)
        elif backend == "server":
            from semsearch.testing import MilvusTestServer

            with MilvusTestServer(base / "milvus-server") as server:
                results["server"] = run_backend(server.uri, args, encoder)
        print(json.dumps({backend: results[backend]}, ensure_ascii=False), flush=True)
    print(json.dumps(results, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
