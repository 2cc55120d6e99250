"""How the CLI and the demo print search results (a module of its own: both use it, neither imports the other)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from semsearch.v1 import search_pb2 as pb

console = Console(stderr=False)


MODE_NAMES = {pb.RETRIEVAL_MODE_DENSE: "dense", pb.RETRIEVAL_MODE_LEXICAL: "lexical",
              pb.RETRIEVAL_MODE_HYBRID: "hybrid"}


def print_hits(query: str, response: pb.SearchDocumentsResponse, batch_size: int = 1) -> None:
    """One response as a table; `batch_size`: it came from a batch of that many (the time is the batch's)."""
    table = Table(title=f"「{query}」", title_justify="left", show_lines=False)
    table.add_column("#", justify="right", no_wrap=True, min_width=2)
    table.add_column("score", justify="right", no_wrap=True, min_width=6)
    table.add_column("id", no_wrap=True, min_width=len(max((h.id for h in response.hits), key=len, default="")))
    hybrid = response.mode == pb.RETRIEVAL_MODE_HYBRID
    if hybrid:  # which retriever ranked it where
        table.add_column("found by", no_wrap=True)
    table.add_column("text", overflow="ellipsis", no_wrap=True, max_width=48)
    for rank, hit in enumerate(response.hits, 1):
        found = [" ".join(f"{MODE_NAMES.get(r.retriever, '?')}#{r.rank}" for r in hit.retrievers)] if hybrid else []
        table.add_row(str(rank), f"{hit.score:.4f}", hit.id, *found, _shown_text(hit))
    console.print(table)
    console.print(f"[dim]{MODE_NAMES.get(response.mode, 'dense')} · model {response.model_version} · "
                  f"collection {response.collection} · {response.timing.total_ms:.1f} ms"
                  f"{f' for the batch of {batch_size}' if batch_size > 1 else ''}[/dim]")


def _shown_text(hit: pb.SearchHit, width: int = 48) -> Text:
    """The hit's text on one line; with highlights, a window from just before the first one, spans in bold."""
    text = Text(hit.text.replace("\n", " "))
    for span in hit.highlights:
        text.stylize("bold reverse", span.start, span.end)
    if hit.highlights and hit.highlights[0].start > width // 6:  # Chinese is two cells wide: ~24 characters show
        text = Text("…") + text[hit.highlights[0].start - width // 12:]
    return text

