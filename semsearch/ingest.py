"""What happens to a document on its way into a collection, for the service and the indexer alike.

    check_id / check_text / check_query / check_metadata    refuse what cannot be stored, with a reason
    rules_of(collection)                                    the collection's text rules (semsearch/text.py)
    Planner.plan                                            normalise, chunk, hash: a PlannedDocument
    PlannedDocument.rows                                    chunks + vectors -> the rows Milvus stores

Refusals are `IngestError`s: an InvalidInputError (INVALID_ARGUMENT in the API) with a short `kind`
the indexer reports per row. Checks look at the text as given; normalisation is part of planning,
because it follows the rules of the collection the text goes to.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from semsearch.chunking import Chunk, Chunker, CountTokens, content_hash
from semsearch.errors import InvalidInputError, ModelMismatchError
from semsearch.store import ChunkRow, CollectionInfo, check_doc_id
from semsearch.text import KNOWN_TEXT_RULES, LEGACY_TEXT_RULES, TEXT_RULES, TextRules, normalize

log = structlog.get_logger(__name__)

MAX_METADATA_DEPTH = 8


class IngestError(InvalidInputError):
    """A document (or query) that will not be stored (searched); `kind` names the rule it breaks."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# ---------------------------------------------------------------------------------------- checks
def _check_unicode(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # only lone surrogates fail: they are not text
        raise IngestError("not_utf8", f"{what} contains invalid Unicode (lone surrogates)") from exc


def check_id(doc_id: str, where: str = "id") -> str:
    """A document id the store can hold (see `semsearch.store.check_doc_id`); ids are never normalised."""
    try:
        return check_doc_id(doc_id, where)
    except InvalidInputError as exc:
        raise IngestError("bad_id", str(exc)) from exc


def _check_text(text: str, max_chars: int, where: str) -> str:
    _check_unicode(text, where)
    if not normalize(text).strip():  # nothing left once invisible characters are removed
        raise IngestError("missing_text", f"{where} is empty")
    if len(text) > max_chars:
        raise IngestError("text_too_long", f"{where} is {len(text)} characters; the limit is {max_chars}")
    return text


def check_text(text: str, max_chars: int, where: str = "text") -> str:
    """A document's text: valid Unicode, something visible, at most `max_chars` characters."""
    return _check_text(text, max_chars, where)


def check_query(text: str, max_chars: int, where: str = "query") -> str:
    """A query: the same rules as a document's text (control and zero-width characters are removed
    by normalisation, not refused)."""
    return _check_text(text, max_chars, where)


def metadata_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((metadata_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((metadata_depth(v) for v in value), default=0)
    return 0


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def check_metadata(value: Any, max_bytes: int, where: str = "metadata") -> dict[str, Any]:
    """A JSON object of finite numbers, valid Unicode, at most MAX_METADATA_DEPTH levels and
    `max_bytes` as UTF-8 JSON; values that are not JSON types (dates, decimals) become strings."""
    if not isinstance(value, dict):
        raise IngestError("bad_metadata", f"{where} is not a JSON object")
    if metadata_depth(value) > MAX_METADATA_DEPTH:
        raise IngestError("bad_metadata", f"{where} is nested deeper than {MAX_METADATA_DEPTH} levels")
    if not _finite(value):  # NaN/Infinity are not JSON and Milvus refuses them
        raise IngestError("bad_metadata", f"{where} contains NaN or infinite numbers")
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False, default=str)
    except (ValueError, TypeError) as exc:
        raise IngestError("bad_metadata", f"{where} is not valid JSON ({exc})") from exc
    _check_unicode(encoded, where)
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        raise IngestError("metadata_too_large", f"{where} is {size} bytes as JSON; the limit is {max_bytes}")
    result: dict[str, Any] = json.loads(encoded)
    return result


# ---------------------------------------------------------------------------------------- rules
def rules_of(collection: CollectionInfo) -> TextRules:
    """The text rules a collection was written with: documents and queries for it follow them.

    A collection made before rules were recorded keeps the legacy rules (text as given, the old
    sentence splitter): it works as before, and is never mixed with the current rules."""
    rules = KNOWN_TEXT_RULES.get(collection.text_rules)
    if rules is None:
        raise ModelMismatchError(
            f"collection {collection.name!r} was written with text rules version {collection.text_rules!r}, "
            f"which this semsearch does not know (it knows {sorted(KNOWN_TEXT_RULES)}): upgrade semsearch."
        )
    if rules is LEGACY_TEXT_RULES:
        log.warning("legacy_text_rules", collection=collection.name, current=TEXT_RULES.version,
                    note="no text normalisation and the old sentence splitter for this collection; "
                         "re-index into a new collection to use the current rules")
    return rules


# ---------------------------------------------------------------------------------------- planning
@dataclass
class PlannedDocument:
    """A document normalised and chunked, ready to embed."""

    doc_id: str
    text: str  # normalised: what is stored
    metadata: dict[str, Any]
    chunks: list[Chunk]
    content_hash: str
    chunk_metadata: list[dict[str, Any]] = field(default_factory=list)  # per chunk, over `metadata` (PDF pages)

    def rows(self, vectors: np.ndarray) -> list[ChunkRow]:
        """Its rows, one per chunk, given one vector per chunk."""
        extra = self.chunk_metadata or [{}] * len(self.chunks)
        return [
            ChunkRow(doc_id=self.doc_id, chunk_index=chunk.index, text=chunk.text, vector=vector,
                     metadata={**self.metadata, **more} if more else self.metadata,
                     content_hash=self.content_hash, char_offset=chunk.start)
            for chunk, vector, more in zip(self.chunks, vectors, extra, strict=True)
        ]


def chunk_texts(planned: Sequence[PlannedDocument]) -> list[str]:
    """Every chunk's text, in order: what one encode call embeds for these documents."""
    return [chunk.text for doc in planned for chunk in doc.chunks]


def rows_of(planned: Sequence[PlannedDocument], vectors: np.ndarray) -> list[list[ChunkRow]]:
    """Each document's rows, given the vectors of `chunk_texts(planned)`."""
    out: list[list[ChunkRow]] = []
    offset = 0
    for doc in planned:
        out.append(doc.rows(vectors[offset : offset + len(doc.chunks)]))
        offset += len(doc.chunks)
    if offset != len(vectors):
        raise ValueError(f"{len(vectors)} vectors for {offset} chunks")
    return out


def _page_span(chunk: Chunk, page_starts: list[int]) -> dict[str, int]:
    """The pages (1-based) of a chunk's first and last visible character."""
    first = chunk.start + len(chunk.text) - len(chunk.text.lstrip())
    last = chunk.start + len(chunk.text.rstrip()) - 1
    return {"page": max(1, bisect.bisect_right(page_starts, first)),
            "page_end": max(1, bisect.bisect_right(page_starts, max(first, last)))}


class Planner:
    """Text rules + chunker: turns checked documents into PlannedDocuments."""

    def __init__(self, rules: TextRules, count_tokens: CountTokens, max_tokens: int, overlap_tokens: int = 0) -> None:
        self.rules = rules
        self.chunker = Chunker(count_tokens, max_tokens, overlap_tokens, split=rules.split_sentences)

    def normalize(self, text: str) -> str:
        return self.rules.normalize(text)

    def plan(self, doc_id: str, text: str, metadata: dict[str, Any], page_starts: Sequence[int] = (),
             unhashed: Sequence[str] = ()) -> PlannedDocument:
        """`page_starts`: where each page starts in the (already normalised) text, for documents with
        pages (PDF): each chunk's metadata then carries `page` and `page_end` (1-based) for citing.
        `unhashed`: metadata keys left out of the content hash (a file's modification time: a file
        touched but unchanged is not rewritten)."""
        text = self.rules.normalize(text)
        if not text.strip():
            raise IngestError("missing_text", "text is empty")
        chunks = self.chunker.chunk(text)
        hashed = {key: value for key, value in metadata.items() if key not in unhashed} if unhashed else metadata
        if not page_starts:
            return PlannedDocument(doc_id=doc_id, text=text, metadata=metadata, chunks=chunks,
                                   content_hash=content_hash(text, hashed))
        starts = list(page_starts)
        pages = [_page_span(chunk, starts) for chunk in chunks]
        # Page breaks are part of the content: moved breaks must rewrite the chunks' pages.
        return PlannedDocument(doc_id=doc_id, text=text, metadata=metadata, chunks=chunks,
                               content_hash=content_hash(text, {"metadata": hashed, "page_starts": starts}),
                               chunk_metadata=pages)

    def embed(self, documents: Sequence[tuple[str, str, dict[str, Any]]],
              encode: Callable[[list[str]], np.ndarray]) -> list[ChunkRow]:
        """(doc_id, text, metadata) -> all their rows, chunks embedded in one `encode` call."""
        planned = [self.plan(doc_id, text, metadata) for doc_id, text, metadata in documents]
        return [row for rows in rows_of(planned, encode(chunk_texts(planned))) for row in rows]
