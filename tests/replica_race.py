"""Two replicas (two service instances, each with its own Milvus client and per-document locks) racing
on one document id: upsert vs delete and upsert vs upsert, then every read path is checked.

Used by tests/test_resilience.py (a few rounds) and bench/bench_replicas.py (40 rounds, throughput).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import grpc

from semsearch.filters import render_string_in
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService

SENTENCE = "退款申请提交后，系统会在一到三个工作日内审核并原路退回款项。"
# 2 to 5 chunks with the tiny test model (128 tokens a chunk); different lengths, different versions.
TEXTS = [SENTENCE * n for n in (9, 14, 19, 24)]


@dataclass
class RaceReport:
    rounds: int = 0
    fragments: list[str] = field(default_factory=list)  # documents left neither absent nor one whole version
    ghosts: list[str] = field(default_factory=list)  # search hits of documents GetDocument calls missing

    @property
    def clean(self) -> bool:
        return not self.fragments and not self.ghosts


def stored_rows(service: LiveService, doc_id: str) -> list[tuple[int, str]]:
    """(chunk index, content hash) of every stored row of the document, from Milvus (Strong)."""
    collection = service.running.servicer.engine.pair.collection.name  # type: ignore[union-attr]
    rows = service.running.store.client.query(
        collection_name=collection, filter=render_string_in("doc_id", [doc_id]),
        output_fields=["chunk_index", "content_hash"], consistency_level="Strong")
    return sorted((int(row["chunk_index"]), str(row["content_hash"])) for row in rows)


def chunk_counts(service: LiveService) -> dict[str, int]:
    """How many chunks each text makes, written once without a race."""
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
        pb.Document(id=f"ref-{i}", text=text) for i, text in enumerate(TEXTS)]), timeout=120)
    return {text: len(stored_rows(service, f"ref-{i}")) for i, text in enumerate(TEXTS)}


def check_document(service: LiveService, doc_id: str, counts: dict[str, int], modes: Sequence[int],
                   report: RaceReport) -> None:
    """Absent from every read path, or one whole version of a text a client sent."""
    rows = stored_rows(service, doc_id)
    try:
        text = service.stub.GetDocument(pb.GetDocumentRequest(id=doc_id), timeout=30).document.text
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        text = None
    counted = service.stub.DeleteDocuments(pb.DeleteDocumentsRequest(ids=[doc_id], dry_run=True),
                                           timeout=30).deleted_count
    whole = text in counts and [index for index, _ in rows] == list(range(counts[text])) \
        and len({digest for _, digest in rows}) == 1
    if not (rows == [] and text is None and counted == 0) and not (whole and counted == 1):
        report.fragments.append(f"{doc_id}: chunks {[index for index, _ in rows]}, versions "
                                f"{len({d for _, d in rows})}, get {len(text or '')} chars, counted {counted}")
    for mode in modes:
        hits = service.stub.SearchDocuments(pb.SearchDocumentsRequest(
            query=SENTENCE, top_k=100, mode=mode), timeout=30).hits  # type: ignore[arg-type]  # every document
        if text is None and any(hit.id == doc_id for hit in hits):
            report.ghosts.append(f"{doc_id} (mode {mode})")


def race(replicas: tuple[LiveService, LiveService], rounds: int, counts: dict[str, int],
         modes: Sequence[int], prefix: str = "race") -> RaceReport:
    """`rounds` rounds of each race, both calls released at once; each round on a fresh id."""
    report = RaceReport()
    first, second = replicas
    start = threading.Barrier(2)

    def at_once(call: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            start.wait(30)
            return call()
        return run

    with ThreadPoolExecutor(max_workers=2) as pool:
        for round_ in range(rounds):
            for kind in ("delete", "upsert"):
                doc_id = f"{prefix}-{kind}-{round_}"
                text_a, text_b = TEXTS[round_ % len(TEXTS)], TEXTS[(round_ + 1 + round_ // 4) % len(TEXTS)]
                first.stub.UpsertDocuments(pb.UpsertDocumentsRequest(
                    documents=[pb.Document(id=doc_id, text=text_b)]), timeout=120)
                a = pool.submit(at_once(partial(first.stub.UpsertDocuments, pb.UpsertDocumentsRequest(
                    documents=[pb.Document(id=doc_id, text=text_a)]), timeout=120)))
                if kind == "delete":
                    b = pool.submit(at_once(partial(second.stub.DeleteDocuments,
                                                    pb.DeleteDocumentsRequest(ids=[doc_id]), timeout=120)))
                else:
                    other = TEXTS[(round_ + 2) % len(TEXTS)]
                    b = pool.submit(at_once(partial(second.stub.UpsertDocuments, pb.UpsertDocumentsRequest(
                        documents=[pb.Document(id=doc_id, text=other)]), timeout=120)))
                a.result(180)
                b.result(180)
                check_document(first, doc_id, counts, modes, report)
            report.rounds += 1
    return report
