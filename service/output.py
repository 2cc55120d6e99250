"""How the CLI and the demo print search results (a module of its own: both use it, neither imports the other)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from semsearch.v1 import search_pb2 as pb

console = Console(stderr=False)


def print_hits(query: str, response: pb.SearchDocumentsResponse) -> None:
    table = Table(title=f"「{query}」", title_justify="left", show_lines=False)
    table.add_column("#", justify="right", no_wrap=True, min_width=2)
    table.add_column("score", justify="right", no_wrap=True, min_width=6)
    table.add_column("id", no_wrap=True, min_width=len(max((h.id for h in response.hits), key=len, default="")))
    table.add_column("text", overflow="ellipsis", no_wrap=True, max_width=48)
    for rank, hit in enumerate(response.hits, 1):
        table.add_row(str(rank), f"{hit.score:.4f}", hit.id, hit.text.replace("\n", " "))
    console.print(table)
    console.print(f"[dim]model {response.model_version} · collection {response.collection} · "
                  f"{response.timing.total_ms:.1f} ms[/dim]")
