"""Charts of the bench/RESULTS.md tables that run over a parameter (concurrency, rate, size, minutes).

The numbers are read from RESULTS.md itself, so a chart never disagrees with its table: each chart
names its section (a heading substring), the table in it, the parameter column and the measured
columns, optionally a column that splits rows into series (format, mode, request kind), or, for a
table whose parameter runs across its columns ("c=1 req/s", "c=8 req/s"), those columns.

    .venv/bin/python bench/charts.py                 # writes bench/charts/*.png
    .venv/bin/python bench/charts.py --markdown M.md # also the image links, each under its heading
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclass
class Table:
    heading: str  # the "##" heading above it
    subheading: str  # the "###" heading above it, "" when none
    line: int  # 1-based line of its header row
    columns: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> int:
        try:
            return self.columns.index(name)
        except ValueError:
            raise KeyError(f"RESULTS.md line {self.line}: no column {name!r} in {self.columns}") from None


@dataclass
class Chart:
    name: str  # the PNG's file stem
    title: str
    heading: str  # substring of the "##" heading
    x: str  # the parameter column (or the x axis label of a wide table)
    ys: list[str] = field(default_factory=list)
    subheading: str = ""  # substring of the "###" heading
    index: int = 0  # which table of that section
    series: str | None = None  # column whose values split the rows into lines
    wide: dict[str, float] = field(default_factory=dict)  # column -> x, for parameters across columns
    ylabel: str = ""
    xlabel: str = ""  # default: the column `x`
    log_y: bool = False
    log_x: bool = False


CHARTS = [
    Chart("remote-encoder-throughput", "Remote encoder client: requests/s over concurrency",
          "Remote encoder (sglang backend)", "concurrent requests", ["requests/s"],
          subheading="Throughput", series="format", ylabel="requests/s", log_x=True),
    Chart("load-rate", "Load: latency over the offered rate", "Load: highest fixed rate", "rate",
          ["p50 ms", "p99 ms", "srv p99 ms"], ylabel="ms", xlabel="offered rate (requests/s)"),
    Chart("load-soak", "Soak at half the best rate: latency per minute", "Load: highest fixed rate", "minute",
          ["p50 ms", "p99 ms"], index=1, ylabel="ms", log_y=True),
    Chart("indexer-memory", "Indexer: memory over corpus size", "Batch indexer", "documents",
          ["peak RSS (ru_maxrss)", "RSS after loading the model"], index=1, ylabel="MiB", log_x=True),
    Chart("hybrid-latency", "Service p50 per mode over concurrency", "Hybrid retrieval", "concurrency",
          ["p50 ms (median of rounds)"], subheading="hybrid fetching only the rows", series="mode", ylabel="p50 ms"),
    Chart("rerank-latency", "Rerank: p50 over concurrency (quiet machine)", "Rerank stage", "concurrency",
          ["p50 ms"], subheading="Quiet machine", series="request", ylabel="p50 ms", log_y=True),
    Chart("use-service-throughput", "Service throughput over concurrency: MiniLM vs USE", "USE-Multilingual v3",
          "concurrency", index=1, series="model", ylabel="requests/s",
          wide={"c=1 req/s": 1, "c=8 req/s": 8, "c=32 req/s": 32}, log_x=True),
]


def read_tables(text: str) -> list[Table]:
    tables: list[Table] = []
    heading = subheading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading, subheading = line[3:].strip(), ""
        elif line.startswith("### "):
            subheading = line[4:].strip()
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            columns = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append(Table(heading, subheading, i - len(rows) - 1, columns, rows))
            continue
        i += 1
    return tables


def number(cell: str) -> float | None:
    """The first number of a cell ("**1.35x**" -> 1.35, "561.9 MiB" -> 561.9, "20,000" -> 20000)."""
    match = NUMBER.search(cell.replace("**", ""))
    return float(match.group().replace(",", "")) if match else None


def find_table(tables: list[Table], chart: Chart) -> Table:
    found = [t for t in tables if chart.heading in t.heading and chart.subheading in t.subheading]
    if len(found) <= chart.index:
        raise KeyError(f"chart {chart.name}: no table {chart.index} under a heading with {chart.heading!r}"
                       + (f" / {chart.subheading!r}" if chart.subheading else ""))
    return found[chart.index]


def series_points(table: Table, chart: Chart) -> dict[str, list[tuple[float, float]]]:
    """Line label -> (x, y) points, in table order."""
    lines: dict[str, list[tuple[float, float]]] = {}
    split = table.column(chart.series) if chart.series else None
    for row in table.rows:
        prefix = row[split] if split is not None else ""
        if chart.wide:
            for column, wide_x in chart.wide.items():
                y = number(row[table.column(column)])
                if y is not None:
                    lines.setdefault(prefix, []).append((wide_x, y))
            continue
        x = number(row[table.column(chart.x)])
        for column in chart.ys:
            y = number(row[table.column(column)])
            if x is not None and y is not None:
                label = " · ".join(part for part in (prefix, column if len(chart.ys) > 1 else "") if part)
                lines.setdefault(label or column, []).append((x, y))
    return lines


def plot(chart: Chart, table: Table, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs: set[float] = set()
    for label, points in series_points(table, chart).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        xs.update(p[0] for p in points)
    ax.set_xlabel(chart.xlabel or chart.x)
    ax.set_ylabel(chart.ylabel or ", ".join(chart.ys))
    if chart.log_y:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)  # a linear axis from zero: differences look as large as they are
    if chart.log_x:
        ax.set_xscale("log")
        ax.set_xticks(sorted(xs))  # the measured values, written plainly (1, 8, 32), not 10^n
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(chart.title, fontsize=10)
    ax.grid(alpha=.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{chart.name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--out-dir", type=Path, default=HERE / "charts")
    parser.add_argument("--markdown", type=Path, help="write the image links for RESULTS.md here")
    args = parser.parse_args()
    tables = read_tables(args.results.read_text(encoding="utf-8"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    notes = ["# Charts for bench/RESULTS.md (made by `bench/charts.py` from the tables themselves)", ""]
    for chart in CHARTS:
        table = find_table(tables, chart)
        path = plot(chart, table, args.out_dir)
        link = path.relative_to(args.results.parent) if path.is_relative_to(args.results.parent) else path
        where = f'"## {table.heading}"' + (f' / "### {table.subheading}"' if table.subheading else "")
        first_columns = " | ".join(table.columns[:3])
        notes += [f"Under {where}, right after the table at line {table.line} (`| {first_columns} |…`):",
                  "", f"![{chart.title}]({link.as_posix()})", ""]
        print(f"{path}  <- RESULTS.md line {table.line}")
    if args.markdown:
        args.markdown.write_text("\n".join(notes), encoding="utf-8")


if __name__ == "__main__":
    main()
