"""`semsearch index`: batch indexing (placeholder until the indexer lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
