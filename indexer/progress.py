"""Progress for people and for logs: a rich bar on a terminal, periodic structured lines otherwise."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

log = structlog.get_logger(__name__)


class Rates:
    """documents/s and chunks/s over a sliding window (the last `window_s` seconds)."""

    def __init__(self, window_s: float = 20.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int, int, int]] = deque()

    def add(self, documents: int, chunks: int, done_bytes: int) -> tuple[float, float, float]:
        now = time.monotonic()
        self._samples.append((now, documents, chunks, done_bytes))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        t0, d0, c0, b0 = self._samples[0]
        elapsed = max(now - t0, 1e-9)
        if len(self._samples) < 2:
            return 0.0, 0.0, 0.0
        return (documents - d0) / elapsed, (chunks - c0) / elapsed, (done_bytes - b0) / elapsed


class ProgressReporter:
    """`mode`: "bar" (rich, on a terminal), "log" (a line every `log_every_s`) or "off"."""

    def __init__(self, mode: str, total_bytes: int | None, *, log_every_s: float = 10.0,
                 description: str = "indexing") -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.total_bytes = total_bytes or None
        self.log_every_s = log_every_s
        self._rates = Rates()
        self._last_log = time.monotonic()
        self._started = time.monotonic()
        self._bar: Progress | None = None
        self._task: Any = None
        if mode == "bar":
            self._bar = Progress(
                TextColumn(f"[bold]{description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[documents]:,} docs · {task.fields[dps]:,.0f} docs/s · "
                           "{task.fields[cps]:,.0f} chunks/s · {task.fields[rejected]:,} rejected"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=self.total_bytes, documents=0, dps=0.0, cps=0.0,
                                            rejected=0)

    def update(self, live: Mapping[str, int], done_bytes: int) -> None:
        documents = int(live.get("documents", 0))
        chunks = int(live.get("chunks_written", 0))
        dps, cps, bps = self._rates.add(documents, chunks, done_bytes)
        if self._bar is not None:
            self._bar.update(self._task, completed=done_bytes, documents=documents, dps=dps, cps=cps,
                             rejected=int(live.get("rejected", 0)))
            return
        if self.mode == "log" and time.monotonic() - self._last_log >= self.log_every_s:
            self._last_log = time.monotonic()
            fields: dict[str, Any] = {
                "documents": documents, "written": int(live.get("written", 0)),
                "skipped": int(live.get("skipped", 0)), "chunks": chunks,
                "rejected": int(live.get("rejected", 0)), "docs_per_s": round(dps, 1),
                "chunks_per_s": round(cps, 1), "elapsed_s": round(time.monotonic() - self._started, 1),
            }
            if self.total_bytes:
                fields["percent"] = round(100.0 * done_bytes / self.total_bytes, 1)
                if bps > 0:
                    fields["eta_s"] = round((self.total_bytes - done_bytes) / bps)
            log.info("index_progress", **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


SUMMARY_ROWS = [
    ("read", "records read"),
    ("other_shards", "records of other shards"),
    ("documents", "documents in this job"),
    ("skipped", "unchanged (skipped)"),
    ("written", "documents written"),
    ("split_documents", "documents chunked (>1 chunk)"),
    ("chunks_written", "chunks written"),
    ("stale_chunks_deleted", "stale chunks deleted"),
    ("pruned", "documents pruned"),
    ("rejected", "rejected / failed"),
]


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    totals: Mapping[str, int] = summary["totals"]
    table = Table(title=f"semsearch index: {summary['status']}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, label in SUMMARY_ROWS:
        if key == "other_shards" and not totals.get(key):
            continue
        table.add_row(label, f"{int(totals.get(key, 0)):,}")
    for kind, count in sorted(summary.get("reasons", {}).items(), key=lambda kv: -kv[1]):
        table.add_row(f"  {kind}", f"{count:,}")
    console.print(table)
    elapsed = max(float(summary.get("elapsed_s", 0.0)), 1e-9)
    console.print(
        f"collection {summary['collection']}"
        + (f" (alias {summary['alias']})" if summary.get("alias") else "")
        + f" · model {summary['model_version']} · {elapsed:.1f} s · "
        f"{summary.get('docs_per_s', 0):,.1f} docs/s · {summary.get('chunks_per_s', 0):,.1f} chunks/s"
    )
    if summary.get("reasons"):
        console.print(f"rejected rows: {summary['reject_file']}")
    for note in summary.get("notes", []):
        console.print(f"[yellow]{note}[/yellow]")
