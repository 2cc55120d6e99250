"""`semsearch train tune-fusion`: choose a collection's default retrieval on its owner's labelled queries.

Each labelled query is searched in the live collection with the model that serves it, through
`MilvusStore.search` and `semsearch.fusion.fuse` as the service searches (trainer/evaluate.py
`rank_in_milvus`): dense, lexical, and every fusion of `semsearch.fusion.tuning_candidates`. The best
hybrid (semsearch/tuning.py) becomes the default, unless it trails the better single retriever by
more than the tolerance: then that retriever does. The choice is written as a collection property
(read by the service when it loads the collection) and recorded with the serving pair in the registry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from semsearch.config import Settings
from semsearch.errors import InvalidInputError, SemsearchError
from semsearch.fusion import Fusion, tuning_candidates
from semsearch.registry import ModelRegistry
from semsearch.store import MilvusStore
from semsearch.tuning import MIN_TUNING_QUERIES, RETRIEVAL_PROPERTY, TunedRetrieval, choose, quality
from trainer.encoding import encode_texts, open_encoder
from trainer.evaluate import rank_in_milvus
from trainer.rows import iter_jsonl

log = structlog.get_logger(__name__)

# Stop when more than this share of the labelled ids are absent from the collection: the file
# belongs to another collection (or the ids were written differently), and tuning on it means nothing.
MAX_ABSENT_SHARE = 0.5
ID_BATCH = 512


class TuningRefusedError(SemsearchError):
    """Tuning declined to run on this input (too few queries, ids mostly absent); nothing was written."""


@dataclass(frozen=True)
class Labelled:
    query: str
    ids: frozenset[str]


def read_labelled(path: Path) -> list[Labelled]:
    """JSONL lines {"query": ..., "ids": [...]} (or "id": "..."), or a SQuAD JSON file (CMRC2018) whose
    paragraphs were indexed under their `id`: each question labels its paragraph. A bad line or entry
    is an error naming it."""
    if not path.exists():
        raise InvalidInputError(f"input not found: {path}")
    if path.suffix == ".json":
        return _read_squad_ids(path, path.read_text(encoding="utf-8"))
    labelled = []
    for number, line in iter_jsonl(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        ids = row.get("ids", [row["id"]] if "id" in row else None) if isinstance(row, dict) else None
        query = row.get("query") if isinstance(row, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError(f"{path}:{number}: needs a non-empty string `query`")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise InvalidInputError(f"{path}:{number}: needs `ids` (a non-empty list of document ids) or `id`")
        labelled.append(Labelled(query.strip(), frozenset(ids)))
    return labelled


def _read_squad_ids(path: Path, text: str) -> list[Labelled]:
    try:
        articles = json.loads(text)["data"]
        return [Labelled(qa["question"].strip(), frozenset([str(paragraph["id"])]))
                for article in articles for paragraph in article["paragraphs"] for qa in paragraph["qas"]
                if qa["question"].strip()]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidInputError(f"{path}: expected SQuAD JSON with paragraph `id`s and `qas` "
                                f"questions ({type(exc).__name__}: {exc})") from exc


def present_ids(store: MilvusStore, collection: str, ids: set[str]) -> set[str]:
    """Which of `ids` the collection holds (in any tenant)."""
    ordered = sorted(ids)
    found: set[str] = set()
    for start in range(0, len(ordered), ID_BATCH):
        rows = store.document_rows(collection, ordered[start : start + ID_BATCH], fields=("doc_id",), tenant=None)
        found.update(str(row["doc_id"]) for row in rows)
    return found


def usable_queries(store: MilvusStore, collection: str,
                   labelled: list[Labelled]) -> tuple[list[Labelled], dict[str, int]]:
    """The queries with at least one labelled id in the collection, and counts of what was absent.
    Refuses (TuningRefusedError) when most ids are absent or fewer than MIN_TUNING_QUERIES remain."""
    wanted = {i for row in labelled for i in row.ids}
    present = present_ids(store, collection, wanted)
    absent = len(wanted) - len(present)
    kept = [Labelled(row.query, row.ids & present) for row in labelled if row.ids & present]
    counts = {"queries": len(labelled), "usable_queries": len(kept), "ids": len(wanted), "absent_ids": absent,
              "queries_without_present_id": len(labelled) - len(kept)}
    if wanted and absent > MAX_ABSENT_SHARE * len(wanted):
        raise TuningRefusedError(
            f"{absent} of the {len(wanted)} labelled document ids are not in collection {collection!r}: "
            "the labels belong to another collection or name documents differently; nothing was tuned")
    if len(kept) < MIN_TUNING_QUERIES:
        raise TuningRefusedError(
            f"tuning needs at least {MIN_TUNING_QUERIES} labelled queries whose documents are in the collection; "
            f"got {len(kept)} ({absent} labelled ids absent): label {MIN_TUNING_QUERIES - len(kept)} more")
    return kept, counts


def measure(store: MilvusStore, collection: str, labelled: list[Labelled], settings: Settings,
            model: str, *, show_progress: bool = False) -> dict[str, dict[str, float]]:
    """{dense, lexical, hybrid <fusion>...: metrics} of the labelled queries in the live collection."""
    number = {doc_id: n for n, doc_id in enumerate(sorted({i for row in labelled for i in row.ids}))}
    encoder = open_encoder(settings, model)
    try:
        info = store.collection_info(collection)
        if encoder.manifest.version != info.model_version:
            raise InvalidInputError(f"collection {collection!r} holds vectors of {info.model_version}, but the "
                                    f"model is {encoder.manifest.version}: tune with the model that serves it")
        vectors = encode_texts(encoder.encode_queries, [row.query for row in labelled], desc="queries",
                               show=show_progress)
    finally:
        encoder.close()
    candidates = tuning_candidates()
    results = rank_in_milvus(store, collection, documents=len(number), query_texts=[row.query for row in labelled],
                             query_vectors=vectors, exclude=[None] * len(labelled),
                             relevant=[{number[i] for i in row.ids} for row in labelled],
                             modes=("dense", "lexical", "hybrid"), fusion=Fusion(), more_fusions=candidates,
                             doc_index=lambda doc_id: number.get(doc_id, -1))
    return {name: result["metrics"] for name, result in results.items()}


def decide(results: dict[str, dict[str, float]]) -> TunedRetrieval:
    """The best hybrid when it is within the tolerance of the better single retriever, else that one."""
    choice = choose({name: metrics for name, metrics in results.items() if name != "hybrid"})
    assert choice is not None  # the candidates always include hybrids
    fusions = tuning_candidates()
    singles = {name: results[name] for name in ("dense", "lexical")}
    summary = {name: {k: round(results[name][k], 4) for k in ("hit@1", "mrr@10", "ndcg@10")}
               for name in (*singles, choice.fusion)}
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if choice.meets_target:
        return TunedRetrieval("hybrid", fusions[choice.fusion], now, metrics=summary)
    best_single = max(singles, key=lambda name: quality(singles[name]))
    return TunedRetrieval(best_single, Fusion(), now, metrics=summary)


def record(store: MilvusStore, collection: str, tuned: TunedRetrieval, registry_name: str | None) -> str:
    """Write the tuned retrieval as the collection's property and, where the registry serves this
    collection under `registry_name`, with its current pair. Returns what was recorded where."""
    store.set_collection_properties(collection, {RETRIEVAL_PROPERTY: tuned.to_json()})
    where = f"collection {collection!r}"
    if registry_name is None:
        return where
    registry = ModelRegistry(store)
    entry = registry.get(registry_name)
    if entry is not None and entry.current is not None and entry.current.collection == collection:
        entry.current.retrieval = json.loads(tuned.to_json())
        entry.event("tune_fusion", collection=collection, retrieval=tuned.describe(), queries=tuned.queries)
        registry.put(entry)
        where += f" and the registry record {registry_name!r}"
    return where


def tune(settings: Settings, store: MilvusStore, collection: str, pairs: Path, *, model: str | None = None,
         dry_run: bool = False, show_progress: bool = False) -> dict[str, Any]:
    """Measure, decide and (unless dry_run) record; returns the report printed by the command."""
    physical = store.resolve(collection) or collection
    labelled, counts = usable_queries(store, physical, read_labelled(pairs))
    registry_name = collection if settings.use_registry else None
    serving = ModelRegistry(store).get(collection) if settings.use_registry else None
    ref = model or (serving.current.model_ref if serving is not None and serving.current is not None
                    else settings.model)
    results = measure(store, physical, labelled, settings, ref, show_progress=show_progress)
    tuned = dataclasses.replace(decide(results), queries=len(labelled))
    recorded = "nothing (--dry-run)" if dry_run else record(store, physical, tuned, registry_name)
    log.info("fusion_tuned", collection=physical, retrieval=tuned.describe(), queries=len(labelled))
    return {"collection": physical, "model": ref, **counts, "chosen": tuned.describe(),
            "fusion": dataclasses.asdict(tuned.fusion) if tuned.mode == "hybrid" else None, "recorded_in": recorded,
            "results": {name: {k: round(v, 4) for k, v in metrics.items() if k in ("hit@1", "mrr@10", "ndcg@10")}
                        for name, metrics in results.items()}}


def keep_previous(store: MilvusStore, name: str) -> dict[str, Any]:
    """After a promotion: keep the tuning of the pair it replaced (the registry's `previous`) for the
    current collection, without measuring. An explicit choice: the new model may want other weights."""
    entry = ModelRegistry(store).get(name)
    if entry is None or entry.current is None:
        raise InvalidInputError(f"no registry record serves {name!r}: nothing to keep; tune it with --pairs")
    if entry.previous is None or entry.previous.retrieval is None:
        raise InvalidInputError(f"the pair that served {name!r} before this one was never tuned (or there is none): "
                                "nothing to keep; tune it with --pairs")
    tuned = TunedRetrieval.from_json(json.dumps(entry.previous.retrieval))
    recorded = record(store, entry.current.collection, tuned, name)
    return {"collection": entry.current.collection, "kept_from": entry.previous.collection,
            "chosen": tuned.describe(), "tuned_at": tuned.tuned_at, "recorded_in": recorded}
