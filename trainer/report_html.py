"""The recipe report as one self-contained HTML page (`report.html` beside `report.md`).

Charts are drawn by matplotlib as SVG and inlined: the loss curve of every training step (fine-tuning
rounds, reranker, distillation), the metrics of every model, retrieval mode and reranker side by side
per pool, and the wall time of each step. Nothing is loaded from anywhere (no scripts, fonts or
stylesheets from the network); every string from the report is HTML-escaped.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.evaluate import PASSAGE_COLUMNS, TABLE_COLUMNS

# (model, variant, metrics): the variant is "" for the model alone, a retrieval mode, or a reranker.
Row = tuple[str, str, dict[str, float]]
RERANK_PREFIX = "→ "
VARIANTS_CAPTION = ("one panel per way of retrieving (the model alone, through Milvus per retrieval mode, "
                    "reranked), one bar per model; the table below has the numbers, the best of each column bold")

STYLE = """
body { font-family: system-ui, "Noto Sans CJK SC", sans-serif; color: #1d2330; margin: 2rem auto; max-width: 70rem;
       padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; } h3 { font-size: 1rem; }
.meta { color: #667085; font-size: .9rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1rem; }
th, td { border: 1px solid #d9dee8; padding: .2rem .5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.best { font-weight: 700; background: #ecfdf3; }
figure { margin: .5rem 0; } figure svg { max-width: 100%; height: auto; }
"""


def _svg(fig: Any) -> str:
    """The figure as an inline <svg> element (text kept as text, so any script the browser has renders)."""
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prologue and DOCTYPE: not allowed inside HTML


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "semsearch-report", "font.size": 9})
    return plt


def loss_chart(losses: dict[str, list[list[float]]]) -> str:
    """One panel per training step: their losses differ in kind and scale (InfoNCE, BCE, distillation)."""
    plt = _pyplot()
    columns = min(3, len(losses))
    rows = -(-len(losses) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, losses.items(), strict=False):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 60 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=.3)
    for ax in list(axes.flat)[len(losses):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _svg(fig)


def row_label(row: Row) -> str:
    model, variant, _ = row
    if not variant:
        return model
    return f"{model} {variant}" if variant.startswith(RERANK_PREFIX) else f"{model} · {variant}"


def metrics_chart(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """One panel per variant (the model alone, each retrieval mode, reranked), side by side; in each, one
    group of bars per metric with one bar per model (round): rounds and modes compare at a glance."""
    plt = _pyplot()
    variants = list(dict.fromkeys(variant for _, variant, _ in rows))
    models = list(dict.fromkeys(model for model, _, _ in rows))
    colors = {model: f"C{i % 10}" for i, model in enumerate(models)}
    ncols = min(2, len(variants))
    nrows = -(-len(variants) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 2.6 * nrows + 0.6), squeeze=False, sharey=True)
    for ax, variant in zip(axes.flat, variants, strict=False):
        present = [(model, metrics) for model, v, metrics in rows if v == variant]
        width = 0.8 / len(present)
        for i, (model, metrics) in enumerate(present):
            xs = [c + (i - (len(present) - 1) / 2) * width for c in range(len(columns))]
            ax.bar(xs, [float(metrics.get(c, 0.0)) for c in columns], width, color=colors[model])
        ax.set_xticks(range(len(columns)), list(columns), rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(variant or "model alone (in memory)")
        ax.grid(axis="y", alpha=.3)
    for ax in list(axes.flat)[len(variants):]:
        ax.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[model]) for model in models]
    fig.legend(handles, models, loc="upper center", ncol=min(len(models), 4), bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (2.6 * nrows + 0.6)))
    return _svg(fig)


def wall_chart(steps: Sequence[dict[str, Any]]) -> str:
    plt = _pyplot()
    colors = {"ran": "#2d6cdf", "resumed": "#f79009", "skipped": "#98a2b3"}
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(steps) + 1))
    names = [f"{s['step']} ({s['status']})" for s in steps]
    ax.barh(names, [float(s["wall_s"]) for s in steps], color=[colors.get(s["status"], "#667085") for s in steps])
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s); skipped steps: when they ran")
    ax.grid(axis="x", alpha=.3)
    fig.tight_layout()
    return _svg(fig)


def pool_rows(evaluation: dict[str, Any], pool: str) -> list[Row]:
    """The rows of report.md's table for one pool: each model, then it through Milvus per mode, then reranked."""
    rows: list[Row] = []
    for entry in evaluation.get("models") or []:
        rows.append((entry["label"], "", entry["pools"][pool]["metrics"]))
        for mode, pools in entry.get("retrieval", {}).items():
            rows.append((entry["label"], mode, pools[pool]["metrics"]))
        if "rerank" in entry:
            rr = entry["rerank"]
            variant = f"{RERANK_PREFIX}{rr['reranker']} (top {rr['top']})"
            rows.append((entry["label"], variant, rr["pools"][pool]["metrics"]))
    return rows


def passage_rows(passages: dict[str, Any]) -> list[Row]:
    return [(entry["label"], mode, result["metrics"])
            for entry in passages["models"] for mode, result in entry["retrieval"].items()]


def metrics_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    best = {c: max((float(m.get(c, float("-inf"))) for _, _, m in rows), default=None) for c in columns}
    head = "<tr><th>model</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    body = []
    for row in rows:
        metrics = row[2]
        cells = []
        for c in columns:
            value = metrics.get(c)
            mark = ' class="best"' if value is not None and float(value) == best[c] and len(rows) > 1 else ""
            cells.append(f"<td{mark}>{'' if value is None else f'{float(value):.3f}'}</td>")
        body.append(f"<tr><td>{html.escape(row_label(row))}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption class=\"meta\">{html.escape(caption)}</figcaption></figure>"


def evaluation_sections(evaluation: dict[str, Any]) -> list[str]:
    parts: list[str] = ["<h2>Evaluation</h2>"]
    for pool in ("test", "global") if evaluation.get("models") else ():
        rows = pool_rows(evaluation, pool)
        first = evaluation["models"][0]["pools"][pool]
        title = f"{pool} pool ({first['candidates']} candidates, {first['queries']} queries)"
        parts += [f"<h3>{html.escape(title)}</h3>", _figure(metrics_chart(rows, TABLE_COLUMNS), VARIANTS_CAPTION),
                  metrics_table(rows, TABLE_COLUMNS)]
    passages = evaluation.get("passages")
    if passages:
        rows = passage_rows(passages)
        title = f"question → passage ({passages['passages']} passages, {passages['questions']} questions)"
        parts += [f"<h3>{html.escape(title)}</h3>", _figure(metrics_chart(rows, PASSAGE_COLUMNS), VARIANTS_CAPTION),
                  metrics_table(rows, PASSAGE_COLUMNS)]
    return parts


def render_html(report: dict[str, Any]) -> str:
    name = report.get("name") or report.get("recipe") or "recipe"
    steps = report.get("steps") or []
    parts = [f"<h1>Recipe report: {html.escape(str(name))}</h1>",
             f"<p class=\"meta\">Finished {html.escape(str(report.get('finished_at', '')))}; "
             f"work directory <code>{html.escape(str(report.get('work_dir', '')))}</code>; this run took "
             f"{float(report.get('wall_s_this_run', 0)):.0f} s.</p>"]
    losses = report.get("losses") or {}
    if losses:
        parts += ["<h2>Loss curves</h2>",
                  _figure(loss_chart(losses), "training loss at every logging step of " + ", ".join(losses))]
    if report.get("evaluation"):
        parts += evaluation_sections(report["evaluation"])
    if steps:
        rows = "".join(f"<tr><td>{html.escape(s['step'])}</td><td>{html.escape(s['status'])}</td>"
                       f"<td>{float(s['wall_s']):.1f}</td></tr>" for s in steps)
        parts += ["<h2>Wall time per step</h2>", _figure(wall_chart(steps), "seconds per step"),
                  f"<table><tr><th>step</th><th>this run</th><th>wall (s)</th></tr>{rows}</table>"]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Recipe report: {html.escape(str(name))}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_html_report(report: dict[str, Any], path: Path) -> Path:
    path.write_text(render_html(report), encoding="utf-8")
    return path
