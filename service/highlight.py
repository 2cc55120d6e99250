"""Highlights: where a query's words occur in a hit's text, as character spans and a rendered snippet.

The words are the query's jieba terms, cut as the collection's BM25 analyzer cuts them (search mode for
`jieba`, exact mode for `jieba_exact`, runs of letters and digits for `standard`), so a lexical hit
shows the words BM25 matched. Spans are found case-insensitively in the hit's own text (offsets into
the text as returned, in code points); overlapping or touching spans are merged.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

from semsearch.v1 import search_pb2 as pb

SNIPPET_CHARS = 160
ELLIPSIS = "…"
WORD = re.compile(r"\w+")


@lru_cache(maxsize=1)
def _jieba() -> object:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def query_terms(query: str, analyzer: str = "jieba") -> list[str]:
    """The query's terms, longest first, without punctuation-only or whitespace tokens."""
    if analyzer in ("jieba", "jieba_exact"):
        jieba = _jieba()
        cut = jieba.cut_for_search(query) if analyzer == "jieba" else jieba.cut(query)  # type: ignore[attr-defined]
        tokens: Iterable[str] = cut
    else:
        tokens = WORD.findall(query)
    terms = {token.strip() for token in tokens}
    return sorted((t for t in terms if WORD.search(t)), key=lambda t: (-len(t), t))


def spans(text: str, terms: Sequence[str]) -> list[tuple[int, int]]:
    """Where the terms occur in `text`, as sorted, merged [start, end) ranges."""
    if not terms or not text:
        return []
    found: list[tuple[int, int]] = []
    for term in terms:  # every occurrence of every term; overlaps are merged below
        found += [(m.start(), m.end()) for m in re.finditer(re.escape(term), text, re.IGNORECASE)]
    merged: list[tuple[int, int]] = []
    for start, end in sorted(found):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def snippet(text: str, ranges: Sequence[tuple[int, int]], width: int = SNIPPET_CHARS) -> str:
    """About `width` characters of `text` starting a little before its first span (the beginning when
    there is none), HTML-escaped, spans in <em>, "…" where cut."""
    begin = max(0, ranges[0][0] - width // 4) if ranges else 0
    end = min(len(text), begin + width)
    begin = max(0, min(begin, end - width))
    parts = [ELLIPSIS] if begin > 0 else []
    at = begin
    for start, stop in ranges:
        if stop <= begin or start >= end:
            continue
        start, stop = max(start, begin), min(stop, end)
        parts += [html.escape(text[at:start]), "<em>", html.escape(text[start:stop]), "</em>"]
        at = stop
    parts.append(html.escape(text[at:end]))
    if end < len(text):
        parts.append(ELLIPSIS)
    return "".join(parts)


def annotate(hits: Iterable[pb.SearchHit], query: str, analyzer: str = "jieba") -> None:
    """Fill `highlights` and `snippet` of every hit that carries its text (in place)."""
    hits = [hit for hit in hits if hit.text]
    if not hits:
        return
    terms = query_terms(query, analyzer)
    for hit in hits:
        ranges = spans(hit.text, terms)
        hit.highlights.extend(pb.TextSpan(start=s, end=e, text=hit.text[s:e]) for s, e in ranges)
        hit.snippet = snippet(hit.text, ranges)
