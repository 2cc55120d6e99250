"""The evaluation gate of a promotion: the candidate must beat the current model on held-out rows.

The promotion itself (pending, re-embed, validate, swap, rollback, gc) is `semsearch.promotion`,
shared with the service; the trainer injects this gate, because only the trainer evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semsearch.config import Settings
from semsearch.errors import InvalidInputError
from semsearch.registry import PairRecord


@dataclass
class GateResult:
    passed: bool
    metric: str
    current: dict[str, float]
    candidate: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    forced: bool = False

    def table(self) -> str:
        names = sorted(set(self.current) | set(self.candidate))
        lines = ["| metric (global pool) | current | candidate | change |", "|---|---|---|---|"]
        for name in names:
            before, after = self.current.get(name, float("nan")), self.candidate.get(name, float("nan"))
            marker = " ←" if name == self.metric else ""
            lines.append(f"| {name}{marker} | {before:.4f} | {after:.4f} | {after - before:+.4f} |")
        return "\n".join(lines)

    def metrics(self) -> dict[str, Any]:
        """What the registry records with the candidate pair."""
        return {"gate": {"metric": self.metric, "forced": self.forced, "current": self.current,
                         "candidate": self.candidate}}


def gate(
    current: PairRecord,
    candidate_ref: str,
    eval_data: Path,
    settings: Settings,
    *,
    metric: str,
    min_improvement: float,
    guards: dict[str, float],
    pool: str = "global",
) -> GateResult:
    """Evaluate both models on the same held-out rows through the serving encoder code."""
    from trainer.evaluate import evaluate_models
    from trainer.rows import read_rows

    rows = read_rows(eval_data)
    report, _ = evaluate_models(
        rows,
        [("current", current.model_ref), ("candidate", candidate_ref)],
        settings.model_copy(update={"encoder_url": current.encoder_url}),
        show_progress=False,
    )
    before = report["models"][0]["pools"][pool]["metrics"]
    after = report["models"][1]["pools"][pool]["metrics"]
    return verdict(before, after, metric=metric, min_improvement=min_improvement, guards=guards)


def verdict(before: dict[str, float], after: dict[str, float], *, metric: str, min_improvement: float,
            guards: dict[str, float]) -> GateResult:
    """Pass when `metric` improves by at least `min_improvement` and no guard metric regresses by
    more than its tolerance (the same rule for embedders and rerankers)."""
    if metric not in before:
        raise InvalidInputError(f"unknown gate metric {metric!r}; known: {', '.join(sorted(before))}")
    reasons = []
    if after[metric] - before[metric] < min_improvement:
        reasons.append(f"{metric} {before[metric]:.4f} -> {after[metric]:.4f}: improvement below {min_improvement}")
    for name, tolerance in guards.items():
        if name not in before:
            raise InvalidInputError(f"unknown guard metric {name!r}")
        if before[name] - after[name] > tolerance:
            reasons.append(f"guard {name} regressed {before[name]:.4f} -> {after[name]:.4f} (tolerance {tolerance})")
    return GateResult(passed=not reasons, metric=metric, current=before, candidate=after, reasons=reasons)
