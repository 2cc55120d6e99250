"""Question -> passage retrieval on reading-comprehension sets (SQuAD JSON: CMRC2018), ranked as served.

A benchmark whose labels hold: every question was written about one passage, so its passage is the
right answer (unlike linked paraphrase pairs, where many "misses" are unlinked paraphrases). Passages
are long, so each model's passages go in as a service upsert puts them: normalised by the collection's
text rules and chunked to the encoder's token limit (`semsearch.ingest.Planner`: `Chunker`,
`encoder.count_tokens`, `manifest.max_tokens`), embedded, written with `MilvusStore.write_documents`.
Queries are normalised the same way and searched in each mode through `trainer.evaluate.rank_in_milvus`
(the service's search and fusion calls): one hit per passage, its best chunk, so a passage is found at
the rank of its best chunk.
"""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from semsearch.config import Settings
from semsearch.encoders.base import Encoder
from semsearch.errors import InvalidInputError
from semsearch.fusion import Fusion
from semsearch.ingest import Planner, chunk_texts, rows_of, rules_of
from semsearch.store import MilvusStore
from semsearch.tuning import choose
from trainer.encoding import encode_texts, open_encoder
from trainer.evaluate import rank_in_milvus
from trainer.prepare import read_squad
from trainer.rows import normalize_text

log = structlog.get_logger(__name__)

WRITE_DOCUMENTS = 200  # documents per write (all chunks of a document in one write, as an upsert)


@dataclass
class PassageSet:
    """Distinct passages (document id = position) and distinct questions with the passages they were
    asked about (one, unless the very same question was asked about several)."""

    files: list[str]
    passages: list[str]
    questions: list[str]
    relevant: list[set[int]]
    total_questions: int  # before sampling
    seed: int | None = None  # of the sample, when one was drawn


def load_passages(paths: Sequence[Path], *, max_questions: int | None = None, seed: int = 42) -> PassageSet:
    """Read SQuAD files through `trainer.prepare.read_squad`; a file without a usable question and
    passage stops with `file: reason`. `max_questions`: a seeded sample of the questions (every
    passage stays in the pool)."""
    if max_questions is not None and max_questions < 1:
        raise InvalidInputError(f"--max-questions must be at least 1, got {max_questions}")
    passages: list[str] = []
    passage_at: dict[str, int] = {}
    questions: list[str] = []
    question_at: dict[str, int] = {}
    relevant: list[set[int]] = []
    for path in paths:
        read = read_squad(path)
        if not any(asked for _, asked in read):
            raise InvalidInputError(f"{path}: no question with a passage (SQuAD data[].paragraphs[].qas[].question)")
        for context, asked in read:  # a passage nobody asked about is still a candidate
            key = normalize_text(context)
            if key not in passage_at:
                passage_at[key] = len(passages)
                passages.append(context)
            for question in asked:
                q = normalize_text(question)
                if q not in question_at:
                    question_at[q] = len(questions)
                    questions.append(question)
                    relevant.append(set())
                relevant[question_at[q]].add(passage_at[key])
    total = len(questions)
    chosen = list(range(total))
    if max_questions is not None and max_questions < total:
        chosen = sorted(random.Random(seed).sample(chosen, max_questions))
    return PassageSet(files=[str(p) for p in paths], passages=passages, questions=[questions[i] for i in chosen],
                      relevant=[relevant[i] for i in chosen], total_questions=total,
                      seed=seed if len(chosen) < total else None)


def evaluate_passages(
    passage_set: PassageSet,
    models: Sequence[tuple[str, str]],
    settings: Settings,
    *,
    retrieval: Sequence[str] = ("dense",),
    more_fusions: dict[str, Fusion] | None = None,
    chunk_tokens: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """{files, passages, questions, models: [{label, chunks, retrieval: {mode: metrics}}]}: each model's
    passages indexed in a temporary Milvus Lite collection built like serving's. `more_fusions`: extra
    hybrids (named) fused from the same dense and lexical searches as `hybrid`; `chunk_tokens`: chunk to
    this many tokens instead of each model's `max_tokens` (a chunk-size study)."""
    fusion = Fusion.from_settings(settings)
    report: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": passage_set.files,
        "passages": len(passage_set.passages),
        "questions": len(passage_set.questions),
        "questions_total": passage_set.total_questions,
        "sample_seed": passage_set.seed,
        "fusion": asdict(fusion),
        "lexical_analyzer": settings.lexical_analyzer,
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="semsearch-eval-passages-") as tmp:
        store = MilvusStore(str(Path(tmp) / "eval.db"), timeout_s=600.0,
                            lexical_analyzer=settings.lexical_analyzer, lexical_user_dict=settings.lexical_user_dict)
        try:
            for number, (label, ref) in enumerate(models):
                collection = f"eval_passages_{number}"
                report["models"].append(_evaluate_model(store, collection, passage_set, label, ref, settings,
                                                        retrieval, fusion, more_fusions or {}, show_progress,
                                                        chunk_tokens))
                store.drop_collection(collection)
        finally:
            store.close()
    return report


def _index_passages(store: MilvusStore, collection: str, passages: Sequence[str], encoder: Encoder, *,
                    desc: str, show: bool, chunk_tokens: int | None = None) -> tuple[Planner, dict[str, int]]:
    """Chunk, embed and write the passages as a service upsert does; the planner also normalises queries."""
    store.create_collection(collection, encoder.manifest)
    max_tokens = chunk_tokens or encoder.manifest.max_tokens
    planner = Planner(rules_of(store.collection_info(collection)), encoder.count_tokens, max_tokens)
    planned = [planner.plan(str(i), text, {}) for i, text in enumerate(passages)]
    vectors = encode_texts(encoder.encode_documents, chunk_texts(planned), desc=desc, show=show)
    documents = rows_of(planned, vectors)
    for start in range(0, len(documents), WRITE_DOCUMENTS):
        store.write_documents(collection, [row for rows in documents[start : start + WRITE_DOCUMENTS] for row in rows])
    store.flush(collection)  # Milvus Lite indexes flushed rows only
    counts = [len(doc.chunks) for doc in planned]
    return planner, {"chunks": sum(counts), "chunked_passages": sum(1 for n in counts if n > 1),
                     "max_chunks": max(counts, default=0), "max_tokens": max_tokens}


def _evaluate_model(store: MilvusStore, collection: str, passage_set: PassageSet, label: str, ref: str,
                    settings: Settings, retrieval: Sequence[str], fusion: Fusion, more_fusions: dict[str, Fusion],
                    show_progress: bool, chunk_tokens: int | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    encoder = open_encoder(settings, ref)
    try:
        version = encoder.manifest.version
        planner, chunking = _index_passages(store, collection, passage_set.passages, encoder,
                                            desc=f"{label}: passage chunks", show=show_progress,
                                            chunk_tokens=chunk_tokens)
        queries = [planner.normalize(q) for q in passage_set.questions]
        query_vectors = encode_texts(encoder.encode_queries, queries, desc=f"{label}: questions", show=show_progress)
    finally:
        encoder.close()
    encode_s = time.perf_counter() - started
    results = rank_in_milvus(store, collection, documents=len(passage_set.passages), query_texts=queries,
                             query_vectors=query_vectors, exclude=[None] * len(queries),
                             relevant=passage_set.relevant, modes=retrieval, fusion=fusion, more_fusions=more_fusions)
    log.info("evaluated_passages", model=label, version=version,
             **{f"{mode}_mrr10": round(value["metrics"]["mrr@10"], 4) for mode, value in results.items()})
    choice = choose({mode: value["metrics"] for mode, value in results.items()})
    return {"label": label, "model": ref, "version": version, **chunking, "retrieval": results,
            "tuned": choice.as_dict() if choice is not None else None,
            "encode_seconds": round(encode_s, 1), "seconds": round(time.perf_counter() - started, 1)}
