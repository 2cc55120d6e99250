"""`evaluate`: offline retrieval metrics for one or more models, side by side.

Two pools:
- test pool: the test rows' own candidates (their pos and neg texts) — the held-out intents alone;
- global pool: every candidate (test + training rows + an optional corpus) — what production sees,
  where a model must also not pull in near-duplicates from other intents.
Each query's own text is removed from the pool (with paraphrase data the query is also a candidate
of other queries); its relevant items are its positives. Also the mean similarity of positives minus
negatives per query, and the distributions of both as a PNG. Encoding goes through the serving
encoder, instruction on queries from the model's manifest.

`retrieval` other than dense alone: each pool also goes into a temporary Milvus Lite collection
made by the serving store (BM25 field computed by Milvus with the `lexical_analyzer` setting), and
every mode is searched through `MilvusStore.search` and `semsearch.fusion.fuse`, the calls the
service makes, one hit per document: these are the service's numbers, not a separate BM25.

Question -> passage retrieval (SQuAD files, chunked passages): trainer/passages.py, ranked by
`rank_in_milvus` below and reported under `passages`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from semsearch.config import Settings
from semsearch.fusion import METHODS, MODES, Fusion, fuse, hybrid_candidates, tuning_candidates
from semsearch.manifest import MANIFEST_FILENAME, ModelManifest
from semsearch.store import ChunkRow, Hit, MilvusStore
from semsearch.tuning import choose
from trainer.encoding import ExactIndex, encode_texts, open_encoder
from trainer.metrics import mean_metrics, query_metrics, similarity_gap
from trainer.rows import TrainRow, candidate_texts, distinct_texts, normalize_text
from trainer.score import Scorer

log = structlog.get_logger(__name__)

TABLE_COLUMNS = ("recall@1", "recall@5", "recall@10", "hit@1", "hit@10", "mrr@10", "ndcg@10")


@dataclass
class ModelScores:
    """One model's raw similarity distributions, for the plot, and its global-pool top-1 misses."""

    label: str
    positives: list[float] = field(default_factory=list)
    negatives: list[float] = field(default_factory=list)
    misses: list[dict[str, Any]] = field(default_factory=list)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'LABEL=REF' or 'REF' (label = last path part)."""
    if "=" in spec:
        label, ref = spec.split("=", 1)
        return label.strip(), ref.strip()
    return spec.rstrip("/").rsplit("/", 1)[-1], spec


def _pool_metrics(
    query_vectors: np.ndarray,
    doc_vectors: np.ndarray,
    pool: Sequence[int],
    query_keys: Sequence[str],
    relevant_keys: Sequence[set[str]],
    keys: Sequence[str],
    *,
    rerank: Scorer | None = None,
    rerank_top: int = 50,
    query_texts: Sequence[str] = (),
    texts: Sequence[str] = (),
    misses: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Metrics of the dense ranking of `pool`; with `rerank`, of the top `rerank_top` reordered by it.
    `misses`: appended with each query whose first candidate is not a labelled positive, and the first
    positive in its top 10 (indices in the global numbering of the texts)."""
    pool_list = list(pool)
    local = {keys[g]: i for i, g in enumerate(pool_list)}
    index = ExactIndex(doc_vectors[pool_list])
    exclude = [[local[q]] if q in local else [] for q in query_keys]
    relevant = [
        {local[k] for k in rel if k in local and k != q} for rel, q in zip(relevant_keys, query_keys, strict=True)
    ]
    kept = [i for i, rel in enumerate(relevant) if rel]
    depth = max(rerank_top, 10) if rerank is not None else 10
    ids, _ = index.search(query_vectors[kept], depth, exclude=[exclude[i] for i in kept])
    rankings = [[int(x) for x in ids[j]] for j in range(len(kept))]
    if rerank is not None:
        pairs = [(query_texts[i], texts[pool_list[c]]) for j, i in enumerate(kept) for c in rankings[j][:rerank_top]]
        scores = rerank(pairs)
        at = 0
        for j, ranking in enumerate(rankings):
            head, tail = ranking[:rerank_top], ranking[rerank_top:]
            own = scores[at : at + len(head)]
            at += len(head)
            # Stable: ties keep the dense order. Fewer candidates than 10: the rest keep the dense order.
            rankings[j] = [c for _, c in sorted(zip(own, head, strict=True), key=lambda t: -t[0])] + tail
    per_query = [query_metrics(rankings[j][:10], relevant[i]) for j, i in enumerate(kept)]
    if misses is not None:
        for j, i in enumerate(kept):
            if rankings[j][0] not in relevant[i]:
                first = next(((rank, c) for rank, c in enumerate(rankings[j][:10], 1) if c in relevant[i]), None)
                misses.append({"query": i, "top1": pool_list[rankings[j][0]],
                               "first_relevant": pool_list[first[1]] if first else None,
                               "first_relevant_rank": first[0] if first else None})
    return {
        "candidates": len(pool),
        "queries": len(kept),
        "skipped_queries": len(query_keys) - len(kept),
        "metrics": mean_metrics(per_query),
    }


def parse_retrieval(spec: str) -> tuple[str, ...]:
    """'dense,lexical,hybrid' -> the modes in that order; an unknown one is an error naming it."""
    modes = tuple(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--retrieval: unknown mode {mode!r} (expected {', '.join(MODES)})")
    if not modes:
        raise ValueError("--retrieval: give at least one of " + ", ".join(MODES))
    return modes


def milvus_pool_metrics(
    store: MilvusStore,
    collection: str,
    manifest: ModelManifest,
    *,
    doc_texts: Sequence[str],
    doc_vectors: np.ndarray,
    query_texts: Sequence[str],
    query_vectors: np.ndarray,
    exclude: Sequence[int | None],
    relevant: Sequence[set[int]],
    modes: Sequence[str],
    fusion: Fusion,
    k: int = 10,
    batch: int = 64,
    dense_cache: dict[int, list[Any]] | None = None,
    more_fusions: dict[str, Fusion] | None = None,
) -> dict[str, dict[str, Any]]:
    """Index one pool (document id = position, one chunk each) and rank it in each mode exactly as
    serving does (`rank_in_milvus`)."""
    store.create_collection(collection, manifest)
    rows = [ChunkRow(doc_id=str(i), chunk_index=0, text=text, vector=vector)
            for i, (text, vector) in enumerate(zip(doc_texts, doc_vectors, strict=True))]
    for start in range(0, len(rows), 1000):
        store.upsert(collection, rows[start : start + 1000])
    store.flush(collection)  # Milvus Lite indexes flushed rows only
    return rank_in_milvus(store, collection, documents=len(doc_texts), query_texts=query_texts,
                          query_vectors=query_vectors, exclude=exclude, relevant=relevant, modes=modes,
                          fusion=fusion, k=k, batch=batch, dense_cache=dense_cache, more_fusions=more_fusions)


def service_order(hits: Sequence[Hit]) -> list[Hit]:
    """The order the service returns: score, then document id, then chunk (service/engine.py `_search`):
    RRF gives equal scores to documents ranked at the same place by one retriever each."""
    return sorted(hits, key=lambda h: (-h.score, h.doc_id, h.chunk_index))


def rank_in_milvus(
    store: MilvusStore,
    collection: str,
    *,
    documents: int,
    query_texts: Sequence[str],
    query_vectors: np.ndarray,
    exclude: Sequence[int | None],
    relevant: Sequence[set[int]],
    modes: Sequence[str],
    fusion: Fusion,
    k: int = 10,
    batch: int = 64,
    dense_cache: dict[int, list[Any]] | None = None,
    more_fusions: dict[str, Fusion] | None = None,
    doc_index: Callable[[str], int] = int,
) -> dict[str, dict[str, Any]]:
    """Metrics of an indexed collection (document ids -> integers by `doc_index`) searched through `MilvusStore.search`
    and `semsearch.fusion.fuse` as the service searches it: one hit per document (its best chunk).

    Each query's own candidate (`exclude`) is dropped from its ranking; queries without relevant
    candidates are skipped. Lexical and hybrid need a backend with BM25 (Milvus Lite here).
    `dense_cache` (query index -> dense hits) lets runs that differ only in the lexical analysis
    search the unchanged dense side once. `more_fusions` ranks extra hybrids from the same two
    searches (reported under their names), to compare fusions in one run.
    """
    more_fusions = more_fusions or {}
    if any(mode != "dense" for mode in modes) and not store.collection_info(collection).lexical:
        raise ValueError(f"this Milvus ({store.capabilities().server_version}) has no BM25: evaluate dense only")
    kept = [i for i, rel in enumerate(relevant) if rel]
    # One more when a query's own text may be among them; otherwise exactly the service's top_k.
    fetch = k + 1 if any(e is not None for e in exclude) else k
    candidates = hybrid_candidates(fetch)  # what serving fetches per retriever for hybrid
    enough = fetch if "hybrid" in modes else None  # as serving: `fetch` documents suffice
    limit = fetch if "hybrid" not in modes else candidates
    ranked: dict[str, list[list[int]]] = {mode: [] for mode in [*modes, *more_fusions]}
    for start in range(0, len(kept), batch):
        part = kept[start : start + batch]
        found: dict[str, list[list[Any]]] = {}
        if "dense" in modes or "hybrid" in modes:
            if dense_cache is not None and all(i in dense_cache for i in part):
                found["dense"] = [dense_cache[i] for i in part]
            else:
                found["dense"] = store.search(collection, query_vectors[part], top_k=limit, output_fields=(),
                                              per_document=True, enough=enough)
                if dense_cache is not None:
                    dense_cache.update(zip(part, found["dense"], strict=True))
        if "lexical" in modes or "hybrid" in modes:
            found["lexical"] = store.search(collection, top_k=limit, output_fields=(), per_document=True,
                                            texts=[query_texts[i] for i in part], enough=enough)
        for row, i in enumerate(part):
            for mode in [*modes, *(more_fusions if "hybrid" in modes else ())]:
                if mode == "hybrid" or mode in more_fusions:
                    hits = fuse({r: found[r][row] for r in ("dense", "lexical")},
                                more_fusions.get(mode, fusion), fetch)
                else:
                    hits = found[mode][row][:fetch]
                ids = [doc_index(hit.doc_id) for hit in service_order(hits) if doc_index(hit.doc_id) != exclude[i]]
                ranked[mode].append(ids[:k])
    return {
        mode: {
            "candidates": documents,
            "queries": len(kept),
            "skipped_queries": len(relevant) - len(kept),
            "metrics": mean_metrics(query_metrics(ids, relevant[i]) for ids, i in zip(ranked[mode], kept, strict=True)),
        }
        for mode in [*modes, *(more_fusions if "hybrid" in modes else ())]
    }


def _retrieval_metrics(
    settings: Settings,
    manifest: ModelManifest,
    all_texts: Sequence[str],
    doc_vectors: np.ndarray,
    test_rows: Sequence[TrainRow],
    query_vectors: np.ndarray,
    pools: dict[str, Sequence[int]],
    query_keys: Sequence[str],
    relevant_keys: Sequence[set[str]],
    keys: Sequence[str],
    modes: Sequence[str],
    more_fusions: dict[str, Fusion] | None = None,
) -> dict[str, dict[str, Any]]:
    """{mode: {pool: metrics}} through a temporary Milvus Lite store built like serving's (with
    `more_fusions`, one more "mode" per extra hybrid)."""
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="semsearch-eval-") as tmp:
        store = MilvusStore(str(Path(tmp) / "eval.db"), timeout_s=600.0,
                            lexical_analyzer=settings.lexical_analyzer, lexical_user_dict=settings.lexical_user_dict)
        try:
            for pool_name, pool in pools.items():
                local = {keys[g]: i for i, g in enumerate(pool)}
                results = milvus_pool_metrics(
                    store, f"eval_{pool_name}", manifest,
                    doc_texts=[all_texts[g] for g in pool], doc_vectors=doc_vectors[list(pool)],
                    query_texts=[r.query for r in test_rows], query_vectors=query_vectors,
                    exclude=[local.get(q) for q in query_keys],
                    relevant=[{local[k] for k in rel if k in local and k != q}
                              for rel, q in zip(relevant_keys, query_keys, strict=True)],
                    modes=modes, fusion=Fusion.from_settings(settings), more_fusions=more_fusions,
                )
                for mode, result in results.items():
                    out.setdefault(mode, {})[pool_name] = result
        finally:
            store.close()
    return out


def _encode_model(settings: Settings, label: str, ref: str, texts: Sequence[str], rows: Sequence[TrainRow],
                  show_progress: bool) -> tuple[Any, np.ndarray, np.ndarray]:
    """The model's manifest, the candidates' vectors and the queries' vectors."""
    encoder = open_encoder(settings, ref)
    try:
        doc_vectors = encode_texts(encoder.encode_documents, texts, desc=f"{label}: candidates", show=show_progress)
        query_vectors = encode_texts(encoder.encode_queries, [r.query for r in rows], desc=f"{label}: queries",
                                     show=show_progress)
        return encoder.manifest, doc_vectors, query_vectors
    finally:
        encoder.close()


def _miss(miss: dict[str, Any], rows: Sequence[TrainRow], texts: Sequence[str],
          in_test_pool: set[int]) -> dict[str, Any]:
    """A global-pool top 1 that is no labelled positive, by its texts."""
    first = miss["first_relevant"]
    return {
        "query": rows[miss["query"]].query,
        "top1": texts[miss["top1"]],
        "top1_pool": "test" if miss["top1"] in in_test_pool else "other",
        "first_relevant": texts[first] if first is not None else None,
        "first_relevant_rank": miss["first_relevant_rank"],
    }


def _tuned_per_pool(retrieval: dict[str, Any]) -> dict[str, Any]:
    """Per pool, the fusion tuning would choose from these modes' metrics (pools without a choice left out)."""
    return {pool: choice.as_dict() for pool in ("test", "global")
            if (choice := choose({mode: pools[pool]["metrics"] for mode, pools in retrieval.items()})) is not None}


def _rerank_pools(
    query_vectors: np.ndarray,
    doc_vectors: np.ndarray,
    pools: dict[str, Sequence[int]],
    query_keys: Sequence[str],
    relevant_keys: Sequence[set[str]],
    keys: Sequence[str],
    *,
    rerank: Scorer,
    rerank_top: int,
    query_texts: Sequence[str],
    texts: Sequence[str],
) -> dict[str, Any]:
    """Each pool's metrics of the dense top `rerank_top` reordered by the cross-encoder, and the seconds taken."""
    started = time.perf_counter()
    out: dict[str, Any] = {
        name: _pool_metrics(query_vectors, doc_vectors, pool, query_keys, relevant_keys, keys, rerank=rerank,
                            rerank_top=rerank_top, query_texts=query_texts, texts=texts)
        for name, pool in pools.items()
    }
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _pair_similarities(query_vectors: np.ndarray, doc_vectors: np.ndarray, rows: Sequence[TrainRow],
                       position: dict[str, int]) -> tuple[list[list[float]], list[list[float]]]:
    """Per row, its query's similarity to each of its positives, and to each of its negatives."""
    def similarities(i: int, texts: Sequence[str]) -> list[float]:
        return [float(query_vectors[i] @ doc_vectors[position[normalize_text(t)]]) for t in texts]

    return ([similarities(i, row.pos) for i, row in enumerate(rows)],
            [similarities(i, row.neg) for i, row in enumerate(rows)])


def evaluate_models(
    test_rows: Sequence[TrainRow],
    models: Sequence[tuple[str, str]],
    settings: Settings,
    *,
    pool_rows: Sequence[TrainRow] = (),
    corpus: Sequence[str] = (),
    show_progress: bool = True,
    retrieval: Sequence[str] = ("dense",),
    rerank: Scorer | None = None,
    rerank_label: str = "rerank",
    rerank_top: int = 50,
    rerank_models: Sequence[str] | None = None,
    misses: bool = False,
    more_fusions: dict[str, Fusion] | None = None,
) -> tuple[dict[str, Any], list[ModelScores]]:
    """`more_fusions`: extra hybrids ranked from the same searches as `hybrid` (and the best one chosen,
    `tuned`, as fusion tuning would). `rerank`: a cross-encoder scorer; each model in `rerank_models`
    (labels; None = all) gets a second set of pool metrics: its dense top `rerank_top` reordered by the
    scorer. `misses`: each ModelScores also lists the test queries whose global-pool top 1 is not a
    labelled positive (for a label audit: with intent labels from linked pairs, many such top-1s are
    unlinked paraphrases)."""
    test_texts = candidate_texts(test_rows)
    all_texts = distinct_texts([*test_texts, *candidate_texts(pool_rows), *corpus])
    keys = [normalize_text(t) for t in all_texts]
    position = {k: i for i, k in enumerate(keys)}
    test_pool = [position[normalize_text(t)] for t in test_texts]
    in_test_pool = set(test_pool)
    pool_ids: dict[str, Sequence[int]] = {"test": test_pool, "global": range(len(all_texts))}
    query_keys = [normalize_text(r.query) for r in test_rows]
    relevant_keys = [{normalize_text(p) for p in r.pos} for r in test_rows]

    report: dict[str, Any] = {"created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "queries": len(test_rows), "pools": {"test": len(test_pool), "global": len(all_texts)},
                              "models": []}
    distributions: list[ModelScores] = []
    for label, ref in models:
        started = time.perf_counter()
        manifest, doc_vectors, query_vectors = _encode_model(settings, label, ref, all_texts, test_rows, show_progress)
        encode_s = time.perf_counter() - started
        global_misses: list[dict[str, Any]] | None = [] if misses else None
        pools = {
            "test": _pool_metrics(query_vectors, doc_vectors, test_pool, query_keys, relevant_keys, keys),
            "global": _pool_metrics(query_vectors, doc_vectors, range(len(all_texts)), query_keys, relevant_keys, keys,
                                    misses=global_misses),
        }
        rerank_pools: dict[str, Any] = {}
        if rerank is not None and (rerank_models is None or label in rerank_models):
            rerank_pools = _rerank_pools(query_vectors, doc_vectors, pool_ids, query_keys, relevant_keys, keys,
                                         rerank=rerank, rerank_top=rerank_top,
                                         query_texts=[r.query for r in test_rows], texts=all_texts)
        pos_lists, neg_lists = _pair_similarities(query_vectors, doc_vectors, test_rows, position)
        distributions.append(ModelScores(
            label, positives=[s for pos in pos_lists for s in pos], negatives=[s for neg in neg_lists for s in neg],
            misses=[_miss(miss, test_rows, all_texts, in_test_pool) for miss in global_misses or []]))
        entry: dict[str, Any] = {
            "label": label, "model": ref, "version": manifest.version, "pooling": manifest.pooling,
            "query_instruction": manifest.query_instruction, "parent_model": manifest.parent_model,
            "pools": pools, "similarity": similarity_gap(pos_lists, neg_lists),
            "seconds": round(time.perf_counter() - started, 1), "encode_seconds": round(encode_s, 1),
        }
        if rerank_pools:
            entry["rerank"] = {"reranker": rerank_label, "top": rerank_top, "pools": rerank_pools}
        if tuple(retrieval) != ("dense",):
            phase = time.perf_counter()
            entry["retrieval"] = _retrieval_metrics(
                settings, manifest, all_texts, doc_vectors, test_rows, query_vectors,
                pool_ids, query_keys, relevant_keys, keys, retrieval, more_fusions,
            )
            entry.update(tuned=_tuned_per_pool(entry["retrieval"]), lexical_analyzer=settings.lexical_analyzer,
                         retrieval_seconds=round(time.perf_counter() - phase, 1))
        report["models"].append(entry)
        log.info("evaluated", model=label, version=manifest.version,
                 **{f"{p}_{m}": round(v["metrics"][m], 4) for p, v in pools.items() for m in ("hit@1", "ndcg@10")})
    return report, distributions


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


# Under the global pool's table: how far its labels can be trusted (trainer/RESULTS.md, the label audit).
GLOBAL_POOL_NOTE = ("Global pool: a lower bound where labels are linked pairs: in the BQ label audit "
                    "(trainer/RESULTS.md) 71% of the global top-1 misses were unlinked true paraphrases.")
PASSAGE_COLUMNS = ("hit@1", "hit@10", "mrr@10", "ndcg@10")


def markdown_table(report: dict[str, Any]) -> str:
    """The test and global pools (paired data) and the passage benchmark, whichever the report holds."""
    lines: list[str] = []
    for pool in ("test", "global") if report.get("models") else ():
        first = report["models"][0]["pools"][pool]
        lines.append(f"**{pool} pool** ({first['candidates']} candidates, {first['queries']} queries)\n")
        lines.append("| model | " + " | ".join(TABLE_COLUMNS) + " | sim pos−neg |")
        lines.append("|---|" + "---:|" * (len(TABLE_COLUMNS) + 1))
        for entry in report["models"]:
            metrics = entry["pools"][pool]["metrics"]
            cells = [_fmt(metrics[c]) for c in TABLE_COLUMNS] + [_fmt(entry["similarity"]["gap"])]
            lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
            # The same model through Milvus, one row per retrieval mode (what the service returns).
            for mode, pools in entry.get("retrieval", {}).items():
                cells = [_fmt(pools[pool]["metrics"][c]) for c in TABLE_COLUMNS] + [""]
                lines.append(f"| {entry['label']} · {mode} (Milvus) | " + " | ".join(cells) + " |")
            if "rerank" in entry:
                rr = entry["rerank"]
                cells = [_fmt(rr["pools"][pool]["metrics"][c]) for c in TABLE_COLUMNS] + [""]
                lines.append(f"| {entry['label']} → {rr['reranker']} (top {rr['top']}) | " + " | ".join(cells) + " |")
        for entry in report["models"]:
            if pool in entry.get("tuned", {}):
                lines.append("\n" + tuned_line(entry["label"], entry["tuned"][pool]))
        if pool == "global":
            lines.append(f"\n{GLOBAL_POOL_NOTE}")
        lines.append("")
    if report.get("passages"):
        lines.append(passages_table(report["passages"]))
    return "\n".join(lines)


def passages_table(section: dict[str, Any]) -> str:
    """Question -> passage retrieval (trainer/passages.py): one row per model and mode."""
    sample = (f", a sample (seed {section['sample_seed']}) of {section['questions_total']}"
              if section.get("sample_seed") is not None else "")
    fusion = section["fusion"]
    lines = [f"**question → passage** ({', '.join(Path(f).name for f in section['files'])}: "
             f"{section['passages']} passages, {section['questions']} questions{sample}; through Milvus, "
             f"one hit per passage; hybrid = {fusion['method']}"
             + (f" k={fusion['rrf_k']}" if fusion["method"] == "rrf"
                else f" {fusion['dense_weight']}/{fusion['lexical_weight']}") + ")\n",
             "| model | chunks (max tokens) | " + " | ".join(PASSAGE_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(PASSAGE_COLUMNS)]
    for entry in section["models"]:
        chunks = f"{entry['chunks']} ({entry['max_tokens']})"
        for mode, result in entry["retrieval"].items():
            cells = [_fmt(result["metrics"][c]) for c in PASSAGE_COLUMNS]
            lines.append(f"| {entry['label']} · {mode} | {chunks} | " + " | ".join(cells) + " |")
    for entry in section["models"]:
        if entry.get("tuned"):
            lines.append("\n" + tuned_line(entry["label"], entry["tuned"]))
    lines.append("\nA passage is found at the rank of its best chunk; every question has its own passage "
                 "(no label gaps): hit@10 = recall@10.\n")
    return "\n".join(lines)


def tuned_line(label: str, tuned: dict[str, Any]) -> str:
    """What fusion tuning would choose from these rows (semsearch/tuning.py), and the target check."""
    verdict = "meets" if tuned["meets_target"] else "misses"
    return (f"{label}: best hybrid **{tuned['fusion']}**, against the better single retriever "
            f"({tuned['best_single']}): MRR@10 {tuned['mrr@10_margin']:+.4f}, hit@1 {tuned['hit@1_margin']:+.4f} "
            f"({verdict} hybrid >= max(dense, lexical) - {tuned['tolerance']}; chosen on these same questions).")


def parse_fusions(spec: str) -> dict[str, Fusion]:
    """'rrf:20,rrf:10:0.2:0.8,minmax:0.3:0.7' -> extra hybrids named 'hybrid rrf k=20', 'hybrid rrf k=10
    0.2/0.8', 'hybrid minmax 0.3/0.7'; 'grid' adds every fusion tuning measures
    (`semsearch.fusion.tuning_candidates`). A bad item is an error naming it."""
    fusions: dict[str, Fusion] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        fusions.update(tuning_candidates() if item == "grid" else dict([_fusion_item(item)]))
    return fusions


def _fusion_item(item: str) -> tuple[str, Fusion]:
    method, *values = item.split(":")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    weights = numbers[-2:] if len(numbers) >= 2 else []
    if any(not (0 <= w <= 1) for w in weights):
        numbers = []
    if method == "rrf" and len(numbers) in (1, 3) and values[0].isdigit() and int(values[0]) >= 1:
        k = int(values[0])
        if len(numbers) == 1:
            return f"hybrid rrf k={k}", Fusion(rrf_k=k)
        return f"hybrid rrf k={k} {weights[0]}/{weights[1]}", Fusion("rrf", k, weights[0], weights[1])
    if method in METHODS and method != "rrf" and len(numbers) == 2:
        return f"hybrid {method} {weights[0]}/{weights[1]}", Fusion(method, 60, weights[0], weights[1])
    raise ValueError(f"--fusions: {item!r}: expected rrf:K or rrf:K:DENSE:LEXICAL (K >= 1), weighted:DENSE:LEXICAL, "
                     "minmax:DENSE:LEXICAL, dbsf:DENSE:LEXICAL (weights in [0, 1]) or grid")


def plot_distributions(distributions: Sequence[ModelScores], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt

    n = max(1, len(distributions))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=False)
    # One x-range for all models, fitted to the data: cosines of a trained model crowd into a narrow band.
    values = [v for d in distributions for v in (*d.positives, *d.negatives)]
    low, high = (min(values), max(values)) if values else (-1.0, 1.0)
    bins = np.linspace(low, high + 1e-6, 61)
    for ax, scores in zip(axes[0], distributions, strict=False):
        if scores.negatives:
            ax.hist(scores.negatives, bins=bins, alpha=0.6, density=True, label="negatives", color="tab:red")
        if scores.positives:
            ax.hist(scores.positives, bins=bins, alpha=0.6, density=True, label="positives", color="tab:green")
        ax.set_title(scores.label, fontsize=9)
        ax.set_xlabel("cosine(query, candidate)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], distributions: Sequence[ModelScores], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "plot": out_dir / "scores.png",
    }
    paths["json"].write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    paths["markdown"].write_text(markdown_table(report), encoding="utf-8")
    if distributions:  # a passages-only run has no labelled positives and negatives to plot
        plot_distributions(distributions, paths["plot"])
    else:
        del paths["plot"]
    for number, scores in enumerate(distributions, 1):
        if scores.misses:
            # Numbered, not named by label: labels are free text ("minilm-zh (untrained)").
            paths[f"misses{number}"] = out_dir / f"misses-{number}.jsonl"
            paths[f"misses{number}"].write_text(
                "".join(json.dumps({"model": scores.label, **m}, ensure_ascii=False) + "\n" for m in scores.misses),
                encoding="utf-8",
            )
    return paths


def record_metrics(model_dir: Path, entry: dict[str, Any], name: str = "eval") -> bool:
    """Store an evaluation in the model's own manifest (metrics never change vectors or version)."""
    manifest_path = Path(model_dir) / MANIFEST_FILENAME
    if not manifest_path.exists():
        return False
    manifest = ModelManifest.load(manifest_path)
    metrics = dict(manifest.metrics)
    metrics[name] = {
        pool: data["metrics"] | {"candidates": data["candidates"], "queries": data["queries"]}
        for pool, data in entry["pools"].items()
    } | {"similarity": entry["similarity"]}
    manifest.model_copy(update={"metrics": metrics}).save(model_dir)
    return True
