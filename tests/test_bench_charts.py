"""bench/charts.py reads its numbers from bench/RESULTS.md: every chart still finds its table and its
columns there (an edited table fails here, not when the charts are next redrawn)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "charts.py"


def _load() -> Any:
    # bench/ holds scripts, not a package: load the file itself.
    spec = importlib.util.spec_from_file_location("bench_charts", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


charts = _load()
TABLES = charts.read_tables((SCRIPT.parent / "RESULTS.md").read_text(encoding="utf-8"))


@pytest.mark.parametrize("chart", charts.CHARTS, ids=[chart.name for chart in charts.CHARTS])
def test_every_chart_finds_its_table_and_numbers(chart: Any) -> None:
    lines = charts.series_points(charts.find_table(TABLES, chart), chart)
    assert lines and all(len(points) >= 2 for points in lines.values()), lines


def test_cells_read_as_their_first_number() -> None:
    assert [charts.number(cell) for cell in ("**1.35x**", "561.9 MiB", "20,000", "−", "0.72x / 1.21x")] == \
        [1.35, 561.9, 20000.0, None, 0.72]
