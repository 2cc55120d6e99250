"""Choosing the fusion from measurements on the user's own labelled queries.

A candidate's quality is the mean of its MRR@10 and hit@1 (the top hit is what a RAG prompt reads
first, MRR@10 the rest of the page). The best hybrid is chosen; it is checked against the better
single retriever, which it must not trail by more than TOLERANCE on either metric.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from semsearch.fusion import MODES, Fusion

TOLERANCE = 0.01
SINGLE_MODES = ("dense", "lexical")
# The collection property holding its tuned retrieval (JSON): written by tuning, read by the service.
RETRIEVAL_PROPERTY = "semsearch.retrieval"
MIN_TUNING_QUERIES = 20


@dataclass(frozen=True)
class TunedRetrieval:
    """A collection's default retrieval, chosen on its owner's labelled queries."""

    mode: str
    fusion: Fusion
    tuned_at: str = ""
    queries: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # the chosen mode's and the singles' numbers

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TunedRetrieval:
        data = json.loads(text)
        if data.get("mode") not in MODES:
            raise ValueError(f"unknown mode {data.get('mode')!r}")
        return cls(mode=data["mode"], fusion=Fusion(**data["fusion"]), tuned_at=str(data.get("tuned_at", "")),
                   queries=int(data.get("queries", 0)), metrics=dict(data.get("metrics") or {}))

    def describe(self) -> str:
        return f"hybrid {self.fusion.describe()}" if self.mode == "hybrid" else self.mode


def tuned_retrieval(properties: Mapping[str, str]) -> TunedRetrieval | None:
    """The tuned retrieval recorded in a collection's properties; None when never tuned."""
    text = properties.get(RETRIEVAL_PROPERTY)
    return TunedRetrieval.from_json(text) if text else None


def quality(metrics: Mapping[str, float]) -> float:
    return (metrics["mrr@10"] + metrics["hit@1"]) / 2.0


@dataclass(frozen=True)
class Choice:
    fusion: str  # the best hybrid's name
    best_single: str  # the better single retriever ("" when none was measured)
    mrr_margin: float  # chosen hybrid minus the better single retriever (0 without one)
    hit1_margin: float

    @property
    def meets_target(self) -> bool:
        """Hybrid >= max(dense, lexical) - TOLERANCE on MRR@10 and hit@1."""
        return self.mrr_margin >= -TOLERANCE and self.hit1_margin >= -TOLERANCE

    def as_dict(self) -> dict[str, Any]:
        return {"fusion": self.fusion, "best_single": self.best_single, "mrr@10_margin": round(self.mrr_margin, 4),
                "hit@1_margin": round(self.hit1_margin, 4), "meets_target": self.meets_target,
                "tolerance": TOLERANCE}


def choose(results: Mapping[str, Mapping[str, float]]) -> Choice | None:
    """The best hybrid of `results` ({name: metrics}; hybrids are named 'hybrid...'), against the
    better single retriever on MRR@10 and on hit@1 separately (max(dense, lexical) per metric);
    None when no hybrid was measured."""
    hybrids = {name: metrics for name, metrics in results.items() if name.startswith("hybrid")}
    if not hybrids:
        return None
    best = max(hybrids, key=lambda name: (quality(hybrids[name]), name == "hybrid"))
    singles = {name: results[name] for name in SINGLE_MODES if name in results}
    if not singles:
        return Choice(best, "", 0.0, 0.0)
    best_single = max(singles, key=lambda name: quality(singles[name]))
    return Choice(
        fusion=best, best_single=best_single,
        mrr_margin=hybrids[best]["mrr@10"] - max(m["mrr@10"] for m in singles.values()),
        hit1_margin=hybrids[best]["hit@1"] - max(m["hit@1"] for m in singles.values()),
    )
