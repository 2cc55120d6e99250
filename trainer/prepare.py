"""`prepare`: common inputs -> FlagEmbedding rows, split train/test by intent group.

Inputs, any mix:
- query/answer pairs: TSV `query<TAB>answer` or JSONL `{query, answer | pos (str or list), group?}`;
- labelled question pairs: TSV `q1<TAB>q2<TAB>label` (BQ, LCQMC): label 1 joins two questions' intents,
  label 0 makes each the other's (human-labelled, hence hard) negative;
- triplets: JSONL `{query, title | pos, neg_title | neg}` (SimCLUE);
- reading-comprehension sets in SQuAD JSON (CMRC2018): each question -> its passage.

Intent groups are the connected components of the positive links (plus explicit `group` fields).
A question from labelled pairs is a query whose positives are all other members of its group, since
paraphrase is transitive; a pair/triplet query's positives are its own answers. The split puts whole
groups on one side, and a negative is kept only if it is on its query's side, so no text of a test
intent is ever seen in training.

Sources can be marked train-only (`holdout=False`: extra data such as SimCLUE beside BQ): only groups
that hold a text of a held-out source are split; the rest always train. Sources are read in the order
given and group ids follow first appearance, so adding train-only sources after the held-out ones
leaves the held-out split as it was without them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from semsearch.errors import InvalidInputError
from trainer.rows import RowError, TrainRow, iter_jsonl, normalize_text

log = structlog.get_logger(__name__)


@dataclass
class _Graph:
    surface: dict[str, str] = field(default_factory=dict)  # normalized key -> first surface form
    parent: dict[str, str] = field(default_factory=dict)
    pos_links: dict[str, list[str]] = field(default_factory=dict)
    neg_links: dict[str, list[str]] = field(default_factory=dict)
    symmetric: set[str] = field(default_factory=set)  # questions from labelled pairs
    explicit_group: dict[str, str] = field(default_factory=dict)  # group label -> a member key
    holdout_keys: set[str] = field(default_factory=set)  # texts of sources a test split may take
    collect_holdout: bool = True  # whether keys made now belong to a held-out source

    def key(self, text: str) -> str:
        k = normalize_text(text)
        if k not in self.surface:
            self.surface[k] = text.strip()
            self.parent[k] = k
        if self.collect_holdout:
            self.holdout_keys.add(k)
        return k

    def find(self, k: str) -> str:
        root = k
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[k] != root:  # path compression
            self.parent[k], k = root, self.parent[k]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def link(self, query: str, positive: str) -> None:
        q, p = self.key(query), self.key(positive)
        if q == p:
            return
        self.pos_links.setdefault(q, [])
        if p not in self.pos_links[q]:
            self.pos_links[q].append(p)
        self.union(q, p)

    def unlink(self, query: str, negative: str) -> None:
        q, n = self.key(query), self.key(negative)
        if q != n and n not in self.neg_links.setdefault(q, []):
            self.neg_links[q].append(n)

    def group(self, text: str, label: str) -> None:
        k = self.key(text)
        if label in self.explicit_group:
            self.union(self.explicit_group[label], k)
        else:
            self.explicit_group[label] = k


@dataclass
class PrepareResult:
    train: list[TrainRow]
    test: list[TrainRow]
    stats: dict[str, Any]


def _split_line(path: Path, number: int, line: str, columns: int, problems: list[tuple[int, str]]) -> list[str] | None:
    parts = line.split("\t")
    if len(parts) != columns:
        problems.append((number, f"expected {columns} tab-separated columns, got {len(parts)}"))
        return None
    if any(not p.strip() for p in parts):
        problems.append((number, "empty column"))
        return None
    return parts


def _json_object(number: int, line: str, problems: list[tuple[int, str]]) -> dict[str, Any] | None:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        problems.append((number, f"not JSON ({exc.msg})"))
        return None
    if not isinstance(data, dict):
        problems.append((number, "not a JSON object"))
        return None
    return data


def _texts(value: Any) -> list[str] | None:
    """A string or a list of strings, non-blank; None if anything else."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) and t.strip() for t in items):
        return None
    return list(items)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.exists():
        raise InvalidInputError(f"input not found: {path}")
    yield from iter_jsonl(path)


def add_pairs(graph: _Graph, path: Path, max_rows: int | None = None) -> int:
    problems: list[tuple[int, str]] = []
    count = 0
    is_json = path.suffix in (".jsonl", ".json")
    for number, line in _lines(path):
        if is_json:
            data = _json_object(number, line, problems)
            if data is None:
                continue
            query = data.get("query")
            answers = _texts(data.get("answer", data.get("pos")))
            if not isinstance(query, str) or not query.strip() or answers is None:
                problems.append((number, "needs a non-empty `query` and `answer` (or `pos`)"))
                continue
            if max_rows is not None and count >= max_rows:
                continue  # past the cap: still validated, not used
            for answer in answers:
                graph.link(query, answer)
            if isinstance(data.get("group"), str | int):
                graph.group(query, str(data["group"]))
        else:
            parts = _split_line(path, number, line, 2, problems)
            if parts is None:
                continue
            query, answer = parts
            if max_rows is not None and count >= max_rows:
                continue
            graph.link(query, answer)
        count += 1
    if problems:
        raise RowError(path, problems)
    return count


def add_labelled_pairs(graph: _Graph, path: Path, max_rows: int | None = None) -> int:
    problems: list[tuple[int, str]] = []
    labelled: list[tuple[str, str, str]] = []
    for number, line in _lines(path):
        parts = _split_line(path, number, line, 3, problems)
        if parts is None:
            continue
        a, b, label = (p.strip() for p in parts)
        if label not in ("0", "1"):
            problems.append((number, f"label must be 0 or 1, got {label!r}"))
            continue
        labelled.append((a, b, label))
    if problems:
        raise RowError(path, problems)
    labelled = labelled[:max_rows] if max_rows is not None else labelled
    for a, b, label in labelled:
        graph.symmetric.update((graph.key(a), graph.key(b)))
        if label == "1":
            graph.link(a, b)
            graph.link(b, a)
        else:
            graph.unlink(a, b)
            graph.unlink(b, a)
    return len(labelled)


def add_triplets(graph: _Graph, path: Path, max_rows: int | None = None) -> int:
    problems: list[tuple[int, str]] = []
    count = 0
    for number, line in _lines(path):
        data = _json_object(number, line, problems)
        if data is None:
            continue
        query = data.get("query")
        positives = _texts(data.get("title", data.get("pos")))
        negatives = _texts(data.get("neg_title", data.get("neg"))) if ("neg_title" in data or "neg" in data) else []
        if not isinstance(query, str) or not query.strip() or positives is None or negatives is None:
            problems.append((number, "needs `query`, `title` (or `pos`) and `neg_title` (or `neg`) texts"))
            continue
        if max_rows is not None and count >= max_rows:
            continue
        for positive in positives:
            graph.link(query, positive)
        for negative in negatives:
            graph.unlink(query, negative)
        count += 1
    if problems:
        raise RowError(path, problems)
    return count


def read_squad(path: Path) -> list[tuple[str, list[str]]]:
    """(passage, its questions) of a SQuAD-format JSON file (CMRC2018), in file order; blank questions are
    skipped (logged). A broken structure raises InvalidInputError naming the file and the place."""
    if not path.exists():
        raise InvalidInputError(f"input not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not JSON ({exc})") from exc
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise InvalidInputError(f"{path}: expected SQuAD format: an object with a `data` list")
    problems: list[tuple[str, str]] = []
    passages: list[tuple[str, list[str]]] = []
    blank = 0
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            problems.append((f"data[{a}]", "needs a `paragraphs` list"))
            continue
        for p, paragraph in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip() or not isinstance(qas, list):
                problems.append((where, "needs a non-empty `context` and a `qas` list"))
                continue
            questions: list[str] = []
            for q, qa in enumerate(qas):
                question = qa.get("question") if isinstance(qa, dict) else None
                if not isinstance(question, str):
                    problems.append((f"{where}.qas[{q}]", "needs a `question` string"))
                elif question.strip():
                    questions.append(question)
                else:
                    # CMRC2018's trial set has a few blank questions: nothing to learn, not a broken file.
                    blank += 1
            passages.append((context, questions))
    if problems:
        lines = [f"{path}: {loc}: {reason}" for loc, reason in problems[:10]]
        raise InvalidInputError("\n".join(lines))
    if blank:
        log.warning("squad_blank_questions_skipped", path=str(path), count=blank)
    return passages


def add_squad(graph: _Graph, path: Path, max_rows: int | None = None) -> int:
    """SQuAD-format JSON (CMRC2018): every question is a query whose positive is its passage. Questions
    over one passage share its group, so the split never separates them."""
    count = 0
    for context, questions in read_squad(path):
        for question in questions:
            if max_rows is not None and count >= max_rows:
                return count
            graph.link(question, context)
            count += 1
    return count


def build_rows(graph: _Graph, test_ratio: float, seed: int) -> PrepareResult:
    if not 0.0 <= test_ratio < 1.0:
        raise InvalidInputError(f"test ratio must be in [0, 1), got {test_ratio}")
    # Stable group ids in order of first appearance.
    group_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for k in graph.surface:
        root = graph.find(k)
        if root not in group_of:
            group_of[root] = f"g{len(group_of)}"
        members.setdefault(group_of[root], []).append(k)
    gid = {k: group_of[graph.find(k)] for k in graph.surface}

    queries: list[str] = [k for k in graph.surface if k in graph.pos_links]
    # Only groups with a text of a held-out source are split; train-only sources' groups always train.
    splittable = {gid[k] for k in graph.holdout_keys}
    query_groups = [g for g in dict.fromkeys(gid[q] for q in queries) if g in splittable]
    other_groups = [g for g in members if g not in set(query_groups) and g in splittable]
    rng = random.Random(seed)
    test_groups: set[str] = set()
    for groups in (query_groups, other_groups):
        shuffled = sorted(groups, key=lambda g: int(g[1:]))
        rng.shuffle(shuffled)
        n_test = round(len(shuffled) * test_ratio)
        if test_ratio > 0 and len(groups) > 1:
            n_test = max(1, min(n_test, len(groups) - 1))
        test_groups.update(shuffled[:n_test])

    train: list[TrainRow] = []
    test: list[TrainRow] = []
    dropped_conflicting = dropped_cross_split = dropped_train_only_test = 0
    for q in queries:
        group = gid[q]
        if group in test_groups and q not in graph.holdout_keys:
            # A train-only source's question that joined a held-out intent: it may not train (its
            # intent is held out) and is not what the test measures.
            dropped_train_only_test += 1
            continue
        positives = list(graph.pos_links[q])
        if q in graph.symmetric:
            positives += [m for m in members[group] if m in graph.symmetric and m != q and m not in positives]
        negatives: list[str] = []
        for n in graph.neg_links.get(q, []):
            if gid[n] == group:
                dropped_conflicting += 1  # labelled "different" but linked through other pairs
            elif (gid[n] in test_groups) != (group in test_groups):
                dropped_cross_split += 1
            else:
                negatives.append(n)
        row = TrainRow(
            query=graph.surface[q],
            pos=[graph.surface[p] for p in positives],
            neg=[graph.surface[n] for n in negatives],
            group=group,
        )
        if q not in graph.holdout_keys:
            # Marked (an extra field TrainRow keeps), so evaluation pools can leave these rows out.
            row = row.model_copy(update={"source": "extra"})
        (test if group in test_groups else train).append(row)
    stats = {
        "texts": len(graph.surface),
        "groups": len(members),
        "query_groups": len(query_groups),
        "test_groups": len(test_groups & set(query_groups)),
        "train_rows": len(train),
        "test_rows": len(test),
        "rows_without_neg": sum(1 for r in (*train, *test) if not r.neg),
        "dropped_conflicting_neg": dropped_conflicting,
        "dropped_cross_split_neg": dropped_cross_split,
        "dropped_train_only_test_rows": dropped_train_only_test,
        "extra_train_rows": sum(1 for r in train if getattr(r, "source", None) == "extra"),
        "test_ratio": test_ratio,
        "seed": seed,
    }
    return PrepareResult(train, test, stats)


SOURCE_KINDS = ("labelled", "pairs", "triplets", "squad")


@dataclass(frozen=True)
class Source:
    """One input file: its kind (SOURCE_KINDS), whether the test split may take its intents, and an
    optional cap on the rows read from it (a reduced-size run)."""

    kind: str
    path: Path
    holdout: bool = True
    max_rows: int | None = None


def _add_source(graph: _Graph, source: Source) -> int:
    graph.collect_holdout = source.holdout
    try:
        readers = {"labelled": add_labelled_pairs, "pairs": add_pairs, "triplets": add_triplets, "squad": add_squad}
        return readers[source.kind](graph, source.path, source.max_rows)
    finally:
        graph.collect_holdout = True


def prepare(
    *,
    pairs: list[Path] | None = None,
    labelled: list[Path] | None = None,
    triplets: list[Path] | None = None,
    sources: list[Source] | None = None,
    test_ratio: float = 0.1,
    seed: int = 42,
) -> PrepareResult:
    """`sources` are read in their order, after pairs, labelled and triplets (all held out)."""
    graph = _Graph()
    counts: dict[str, int] = {}
    ordered = [
        *(Source("pairs", p) for p in pairs or []),
        *(Source("labelled", p) for p in labelled or []),
        *(Source("triplets", p) for p in triplets or []),
        *(sources or []),
    ]
    for source in ordered:
        if source.kind not in SOURCE_KINDS:
            raise InvalidInputError(f"unknown source kind {source.kind!r} (expected {', '.join(SOURCE_KINDS)})")
        counts[str(source.path)] = counts.get(str(source.path), 0) + _add_source(graph, source)
    if not counts:
        raise InvalidInputError("no input: give --pairs, --labelled, --triplets or --squad")
    result = build_rows(graph, test_ratio, seed)
    result.stats["inputs"] = counts
    log.info("prepared", **{k: v for k, v in result.stats.items() if k != "inputs"})
    return result
