"""Does text normalisation change retrieval? BQ question retrieval with raw, v2-normalised and NFKC text.

The retrieval task (../shared/data/README.md): label-1 pairs of ../shared/data/bq/BQ.train.tsv link
questions of the same intent; the connected groups are intents; every grouped question is a query
whose relevant items are the other members of its group, over a pool of every distinct question
(the query itself excluded). Each variant normalises pool and queries alike:

    raw       the text as given (text rules v1)
    v2        semsearch.text.normalize: controls and invisible format characters removed (rules v2)
    v2+nfkc   v2, then Unicode NFKC (full-width ASCII and punctuation folded: `，` -> `,`, `Ｑ` -> `Q`)

Only texts a variant changes are re-encoded. `--pool 0 --queries 0` runs the whole set (slow on a
shared CPU). Also prints how many pool texts each variant changes at all, and how many of those
change the tokens the model sees. Prints recall@1/5/10, MRR@10 and nDCG@10 per variant,
each with its ratio to `raw` measured in the same run.

    .venv/bin/python bench/bench_normalization.py                    # MiniLM stand-in, pool 1500, 600 queries
    .venv/bin/python bench/bench_normalization.py --model tiny       # the tests' random tiny BERT
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from semsearch.encoders import STAND_IN_MODEL, TorchEncoder  # noqa: E402
from semsearch.text import normalize  # noqa: E402
from trainer.metrics import mean_metrics, query_metrics  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "bq" / "BQ.train.tsv"
VARIANTS: dict[str, Callable[[str], str]] = {
    "raw": lambda text: text,
    "v2": normalize,
    "v2+nfkc": lambda text: unicodedata.normalize("NFKC", normalize(text)),
}


def intents(path: Path) -> tuple[list[str], list[int]]:
    """Distinct questions and, for each, its intent group (-1: in no label-1 pair)."""
    parent: dict[str, str] = {}

    def find(q: str) -> str:
        parent.setdefault(q, q)
        while parent[q] != q:
            parent[q] = parent[parent[q]]
            q = parent[q]
        return q

    grouped: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        a, b, label = parts
        find(a), find(b)
        if label.strip() == "1" and a != b:
            parent[find(b)] = find(a)
            grouped.update((a, b))
    questions = sorted(parent)
    roots: dict[str, int] = {}
    groups = [roots.setdefault(find(q), len(roots)) if q in grouped else -1 for q in questions]
    return questions, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default="minilm", help="minilm (the packaged stand-in), tiny, or a model path")
    parser.add_argument("--pool", type=int, default=1500,
                        help="questions in the pool (0 = all): whole intents, half of it, then random distractors")
    parser.add_argument("--queries", type=int, default=600, help="queries sampled (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.data.exists():
        print(f"skipped: {args.data} not found (see ../shared/data/README.md)")
        return
    if args.model == "tiny":
        from tests.tinymodel import build_tiny_bert

        encoder = TorchEncoder.from_ref(str(build_tiny_bert(Path(tempfile.mkdtemp()))), device="cpu")
    else:
        encoder = TorchEncoder.from_ref(STAND_IN_MODEL if args.model == "minilm" else args.model, device="cpu")
    questions, groups = intents(args.data)
    if args.pool and args.pool < len(questions):  # a bounded run: whole intents plus distractors
        rng = random.Random(args.seed)
        by_group: dict[int, list[int]] = {}
        for i, group in enumerate(groups):
            by_group.setdefault(group, []).append(i)
        chosen: list[int] = []
        for group in rng.sample(sorted(g for g in by_group if g >= 0), len(by_group) - 1):
            if len(chosen) >= args.pool // 2:
                break
            chosen += by_group[group]
        rest = sorted(set(range(len(questions))) - set(chosen))
        keep = sorted(chosen + rng.sample(rest, max(0, args.pool - len(chosen))))
        questions, groups = [questions[i] for i in keep], [groups[i] for i in keep]
    members: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        if group >= 0:
            members.setdefault(group, []).append(i)
    queries = [i for i, group in enumerate(groups) if group >= 0 and len(members[group]) > 1]
    if args.queries and len(queries) > args.queries:
        queries = sorted(random.Random(args.seed).sample(queries, args.queries))
    print(f"pool {len(questions)} questions, {len(members)} intents, {len(queries)} queries; "
          f"model {encoder.manifest.version}")

    def encode_queries(texts: list[str], doc_vectors: np.ndarray, ids: list[int]) -> np.ndarray:
        if not encoder.manifest.query_instruction:  # queries embed exactly as documents
            return np.asarray(doc_vectors[ids])
        return encoder.encode_queries(texts)

    results: dict[str, dict[str, float]] = {}
    base_docs: np.ndarray | None = None
    base_queries: np.ndarray | None = None
    for name, rule in VARIANTS.items():
        began = time.perf_counter()
        texts = [rule(q) for q in questions]
        if base_docs is None or base_queries is None:
            docs = base_docs = encoder.encode_documents(texts)
            query_vectors = base_queries = encode_queries([texts[i] for i in queries], docs, queries)
            changed = len(texts)
        else:
            docs, query_vectors = base_docs.copy(), base_queries.copy()
            changed_ids = [i for i, text in enumerate(texts) if text != questions[i]]
            changed = len(changed_ids)
            if changed_ids:
                docs[changed_ids] = encoder.encode_documents([texts[i] for i in changed_ids])
                position = {q: j for j, q in enumerate(queries)}
                in_queries = [i for i in changed_ids if i in position]
                if in_queries:
                    query_vectors[[position[i] for i in in_queries]] = encode_queries(
                        [texts[i] for i in in_queries], docs, in_queries)
        tokens_changed = sum(
            1 for i, text in enumerate(texts) if name != "raw" and text != questions[i]
            and encoder.tokenizer(text)["input_ids"] != encoder.tokenizer(questions[i])["input_ids"])
        per_query = []
        for start in range(0, len(queries), 256):
            block = queries[start : start + 256]
            scores = query_vectors[start : start + len(block)] @ docs.T
            scores[np.arange(len(block)), block] = -np.inf  # the query itself is not a candidate
            top = np.argsort(-scores, axis=1)[:, :10]
            for row, q in zip(top, block, strict=True):
                relevant = {m for m in members[groups[q]] if m != q}
                per_query.append(query_metrics([int(x) for x in row], relevant))
        results[name] = mean_metrics(per_query)
        print(f"{name}: {changed} texts {'encoded' if name == 'raw' else 'changed'}, {tokens_changed} in tokens; "
              f"{time.perf_counter() - began:.1f} s", flush=True)

    metrics = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    print("\n| variant | " + " | ".join(metrics) + " | mrr@10 vs raw |")
    print("|---|" + "---|" * (len(metrics) + 1))
    for name, values in results.items():
        ratio = values["mrr@10"] / results["raw"]["mrr@10"] if results["raw"]["mrr@10"] else float("nan")
        print(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + f" | {ratio:.4f} |")


if __name__ == "__main__":
    main()
