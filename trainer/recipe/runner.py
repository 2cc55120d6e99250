"""Running a recipe: every step of `PIPELINE` in order (or up to `until`), then the report."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.recipe.cache import Run, StepRecord, Stop
from trainer.recipe.schema import Recipe
from trainer.recipe.steps import PIPELINE, State


def run_recipe(recipe: Recipe, *, stream_output: bool = True, echo: Callable[[str], None] = print,
               until: str | None = None) -> dict[str, Any]:
    """Run (or resume) every step, or up to the step named `until`; returns the report (also written to
    <work_dir>/report-<name>/)."""
    run = Run(recipe, stream_output=stream_output, echo=echo, until=until)
    run.work.mkdir(parents=True, exist_ok=True)
    state = State(run, models=[("base", recipe.model)], model=recipe.model)
    try:
        for step in PIPELINE:
            step(state)
    except Stop:
        return _finish(run, state.models, None)
    return _finish(run, state.models, state.evaluation)


def _finish(run: Run, models: list[tuple[str, str]], evaluation: dict[str, Any] | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "recipe": str(run.recipe.source_file),
        "name": run.recipe.name,
        "work_dir": str(run.work),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_s_this_run": round(time.perf_counter() - run.started, 1),
        "steps": [{"step": r.name, "key": r.key, "status": r.status, "wall_s": r.wall_s, "dir": str(r.dir)}
                  for r in run.records],
        "models": [{"label": label, "model": ref} for label, ref in models],
        "losses": {r.name: r.result.get("train", {}).get("losses", []) for r in run.records
                   if r.result.get("train", {}).get("losses")},
        "evaluation": evaluation,
    }
    # One report per recipe: recipes sharing a work_dir share their identical steps, not their report.
    out = run.work / f"report-{run.recipe.name or run.recipe.source_file.stem}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str), "utf-8")
    (out / "report.md").write_text(report_markdown(report, run.records), encoding="utf-8")
    if report["losses"]:
        _plot_losses(report["losses"], out / "losses.png")
    from trainer.report_html import write_html_report  # matplotlib: imported only when a run finishes

    write_html_report(report, out / "report.html")
    run.echo(f"report: {out / 'report.md'} (charts: {out / 'report.html'})")
    return report | {"report": str(out / "report.md")}


def report_markdown(report: dict[str, Any], records: list[StepRecord]) -> str:
    from trainer.evaluate import markdown_table

    lines = [f"# Recipe report: {report['name'] or report['recipe']}", "",
             f"Finished {report['finished_at']}; work directory `{report['work_dir']}`.", "",
             "## Steps", "", "| step | key | this run | wall (s) | notes |", "|---|---|---|---:|---|"]
    for r in records:
        train = r.result.get("train", {})
        note = ""
        if train:
            note = (f"steps {train.get('steps')}, loss {train.get('first_loss')} → {train.get('last_loss')}"
                    + (f", resumed from step {train['resumed_from_step']}" if train.get("resumed_from_step") else ""))
        lines.append(f"| {r.name} | `{r.key}` | {r.status} | {r.wall_s:.1f} | {note} |")
    total = sum(r.wall_s for r in records)
    lines += ["", f"Total wall time of the steps (when each ran): {total:.0f} s.", ""]
    if report["losses"]:
        lines += ["## Loss curves", "", "![losses](losses.png)", "",
                  "| step | loss every logging step |", "|---|---|"]
        for name, losses in report["losses"].items():
            lines.append(f"| {name} | " + ", ".join(f"{s}:{loss:.3f}" for s, loss in losses) + " |")
        lines.append("")
    if report["evaluation"]:
        title = "held-out intents" + ("; question → passage" if report["evaluation"].get("passages") else "")
        lines += [f"## Evaluation ({title})", "", markdown_table(report["evaluation"])]
    return "\n".join(lines) + "\n"


def _plot_losses(losses: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in losses.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
