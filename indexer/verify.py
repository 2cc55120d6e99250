"""`semsearch index verify`: does the collection hold exactly the source, encoded by the current model?

1. Count parity, exactly: the set of valid source document ids against the set of stored document
   ids (both kept in a temporary SQLite file, so memory stays flat), with examples of each side.
2. A random sample of source documents (reservoir sampling, seeded): the stored chunks must be the
   ones the chunker makes from the source today (same texts, offsets, content hash), and
   re-encoding their texts with the current model must give the stored vectors (cosine).
"""

from __future__ import annotations

import json
import random
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from indexer.job import CHUNKING_PROPERTY
from indexer.sources import FieldMap, Limits, SourceDoc, SourceFile, read_all
from semsearch.encoders.base import Encoder
from semsearch.ingest import Planner, rules_of
from semsearch.store import OUTPUT_FIELDS, MilvusStore

log = structlog.get_logger(__name__)
EXAMPLES = 5


@dataclass
class VerifyReport:
    collection: str
    stored_model_version: str
    current_model_version: str
    source_documents: int = 0
    source_rejected: int = 0
    source_duplicates: int = 0
    stored_documents: int = 0
    stored_chunks: int = 0
    missing: int = 0
    missing_examples: list[str] = field(default_factory=list)
    extra: int = 0
    extra_examples: list[str] = field(default_factory=list)
    sampled: int = 0
    max_vector_deviation: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def run_verify(
    *, files: Sequence[SourceFile], fields: FieldMap, limits: Limits, encoder: Encoder, store: MilvusStore,
    collection: str, sample: int = 50, seed: int = 0, tolerance: float = 1e-3,
) -> VerifyReport:
    physical = store.resolve(collection)
    if not physical:
        report = VerifyReport(collection, "", encoder.manifest.version)
        report.problems.append(f"collection {collection!r} does not exist")
        return report
    store.load(physical)
    info = store.collection_info(physical)
    report = VerifyReport(physical, info.model_version, encoder.manifest.version)
    if info.model_version != encoder.manifest.version:
        report.problems.append(
            f"the collection holds vectors of model {info.model_version}; the current model is "
            f"{encoder.manifest.version}"
        )
    rng = random.Random(seed)
    reservoir: list[SourceDoc] = []
    with tempfile.TemporaryDirectory(prefix="semsearch-verify-") as tmp:
        db = sqlite3.connect(Path(tmp) / "ids.sqlite", isolation_level=None)
        db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                         "CREATE TABLE src (doc_id TEXT PRIMARY KEY) WITHOUT ROWID;"
                         "CREATE TABLE dst (doc_id TEXT PRIMARY KEY) WITHOUT ROWID;")
        db.execute("BEGIN")
        for record in read_all(files, fields, limits):
            if not isinstance(record, SourceDoc):
                report.source_rejected += 1
                continue
            if db.execute("INSERT OR IGNORE INTO src VALUES (?)", (record.doc_id,)).rowcount == 0:
                report.source_duplicates += 1  # the indexer keeps the first occurrence
                continue
            report.source_documents += 1
            # Reservoir sampling: every source document equally likely, one pass, k in memory.
            if len(reservoir) < sample:
                reservoir.append(record)
            elif (slot := rng.randrange(report.source_documents)) < sample:
                reservoir[slot] = record
        for row in store.iter_rows(physical, ["doc_id"]):
            report.stored_chunks += 1
            db.execute("INSERT OR IGNORE INTO dst VALUES (?)", (str(row["doc_id"]),))
        db.execute("COMMIT")
        report.stored_documents = int(db.execute("SELECT count(*) FROM dst").fetchone()[0])
        missing_sql = "FROM src LEFT JOIN dst USING (doc_id) WHERE dst.doc_id IS NULL"
        extra_sql = "FROM dst LEFT JOIN src USING (doc_id) WHERE src.doc_id IS NULL"
        report.missing = int(db.execute(f"SELECT count(*) {missing_sql}").fetchone()[0])
        report.missing_examples = [r[0] for r in db.execute(f"SELECT src.doc_id {missing_sql} LIMIT {EXAMPLES}")]
        report.extra = int(db.execute(f"SELECT count(*) {extra_sql}").fetchone()[0])
        report.extra_examples = [r[0] for r in db.execute(f"SELECT dst.doc_id {extra_sql} LIMIT {EXAMPLES}")]
        db.close()
    if report.missing:
        report.problems.append(f"{report.missing} source documents are not in the collection "
                               f"(e.g. {report.missing_examples})")
    if report.extra:
        report.problems.append(f"{report.extra} stored documents are not in the source "
                               f"(e.g. {report.extra_examples}; `semsearch index --prune` removes them)")
    _check_sample(report, reservoir, encoder, store, physical, tolerance)
    return report


def _check_sample(report: VerifyReport, sample: list[SourceDoc], encoder: Encoder, store: MilvusStore,
                  physical: str, tolerance: float) -> None:
    recorded = store.collection_properties(physical).get(CHUNKING_PROPERTY)
    chunking = json.loads(recorded) if recorded else {"max_tokens": encoder.manifest.max_tokens, "overlap_tokens": 0}
    planner = Planner(rules_of(store.collection_info(physical)), encoder.count_tokens, int(chunking["max_tokens"]),
                      int(chunking["overlap_tokens"]))
    texts: list[str] = []
    stored_vectors: list[list[float]] = []
    for doc in sample:
        rows = store.document_rows(physical, [doc.doc_id], [*OUTPUT_FIELDS, "vector"])
        if not rows:
            continue  # counted as missing already
        report.sampled += 1
        planned = planner.plan(doc.doc_id, doc.text, doc.metadata, doc.page_starts, doc.unhashed)
        expected = planned.chunks
        got = [(int(r["chunk_index"]), str(r["text"]), int(r["char_offset"])) for r in rows]
        if got != [(c.index, c.text, c.start) for c in expected]:
            report.problems.append(f"document {doc.doc_id!r}: stored chunks differ from the source's "
                                   f"({len(got)} stored, {len(expected)} expected); re-run the indexer")
        elif any(str(r["content_hash"]) != planned.content_hash for r in rows):
            report.problems.append(f"document {doc.doc_id!r}: stored content hash differs (metadata changed?)")
        texts += [str(r["text"]) for r in rows]
        stored_vectors += [list(r["vector"]) for r in rows]
    if not texts:
        return
    fresh = encoder.encode_documents(texts)
    stored = np.asarray(stored_vectors, dtype=np.float32)
    cosine = np.sum(fresh * stored, axis=1) / (
        np.linalg.norm(fresh, axis=1) * np.linalg.norm(stored, axis=1) + 1e-12
    )
    report.max_vector_deviation = float(np.max(1.0 - cosine))
    bad = int(np.sum(1.0 - cosine > tolerance))
    if bad:
        report.problems.append(
            f"{bad} of {len(texts)} sampled chunk vectors differ from the current model's "
            f"(max 1-cosine {report.max_vector_deviation:.4g} > {tolerance:g})"
        )
