"""What the store writes and returns: chunk rows and their primary keys, stored chunks, hits, and
what a collection records about itself.

Rows are chunks of documents; a document of one chunk has one row. The primary key
(`chunk_row_id`) is `{doc_id}#{chunk_index}` for the default tenant ('') and
`{doc_id}#{chunk_index}@{tenant}` for any other tenant, so re-writing a document replaces its
rows instead of adding new ones, and two tenants may hold documents of the same id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from semsearch.errors import InvalidInputError
from semsearch.filters import TENANT_FIELD
from semsearch.text import LEGACY_TEXT_RULES

# Milvus' VARCHAR max_length counts UTF-8 bytes: "中" * 171 is 171 characters but 513 bytes.
MAX_ID_BYTES = 512
# The row ids of a tenant other than the default one end in `@{tenant}` (a tenant name has at most
# 63 characters, all ASCII); the tenant field holds the name itself.
MAX_TENANT_BYTES = 64
OUTPUT_FIELDS = ["doc_id", "chunk_index", "char_offset", "text", "metadata", "content_hash"]


def check_doc_id(doc_id: str, where: str = "document id") -> str:
    """An id the schema holds (1-512 UTF-8 bytes), valid Unicode, without control characters or
    surrounding space (ids end up inside filter literals)."""
    if not doc_id:
        raise InvalidInputError(f"{where} is empty")
    try:
        size = len(doc_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"{where} contains invalid Unicode (lone surrogates)") from None
    if size > MAX_ID_BYTES:
        raise InvalidInputError(f"{where} is longer than {MAX_ID_BYTES} bytes as UTF-8 ({size} bytes)")
    if doc_id != doc_id.strip() or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in doc_id):
        raise InvalidInputError(f"{where} has control characters or surrounding whitespace")
    return doc_id


def chunk_row_id(doc_id: str, chunk_index: int, tenant: str = "") -> str:
    """`{doc_id}#{chunk_index}`, and `@{tenant}` after it for a tenant other than the default one:
    ids are unique per tenant. Unambiguous: a default-tenant id ends in `#<digits>`, and tenant
    names hold no `#`."""
    return f"{doc_id}#{chunk_index}@{tenant}" if tenant else f"{doc_id}#{chunk_index}"


@dataclass
class ChunkRow:
    doc_id: str
    chunk_index: int
    text: str
    vector: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    char_offset: int = 0
    tenant: str = ""  # '' = the default tenant

    def to_entity(self, written_at: int | None = None, *, tenant_field: bool = False) -> dict[str, Any]:
        entity = {
            "id": chunk_row_id(self.doc_id, self.chunk_index, self.tenant),
            "doc_id": self.doc_id,
            "chunk_index": self.chunk_index,
            "text": self.text,
            "metadata": self.metadata,
            "content_hash": self.content_hash,
            "char_offset": self.char_offset,
            # When the row was written: promotion replays rows written during a re-embed.
            "updated_at": int(time.time() * 1000) if written_at is None else written_at,
            "vector": self.vector.astype(np.float32).tolist(),
        }
        if tenant_field:
            entity[TENANT_FIELD] = self.tenant
        return entity


class StoredChunk(NamedTuple):
    """What bookkeeping needs of a stored chunk (a tuple: unpacks as before)."""

    row_id: str
    doc_id: str
    chunk_index: int
    content_hash: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> StoredChunk:
        return cls(str(row["id"]), str(row["doc_id"]), int(row["chunk_index"]), str(row.get("content_hash", "")))


@dataclass(frozen=True)
class RetrieverScore:
    retriever: str  # "dense" or "lexical"
    score: float  # cosine similarity, or BM25 score
    rank: int  # 1-based, among that retriever's results


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_index: int
    score: float
    text: str
    metadata: dict[str, Any]
    retrievers: tuple[RetrieverScore, ...] = ()


@dataclass(frozen=True)
class CollectionInfo:
    name: str  # the physical collection, aliases resolved
    model_version: str
    dimension: int
    manifest: dict[str, Any]
    text_rules: str = LEGACY_TEXT_RULES.version  # semsearch/text.py; collections made before it: legacy
    lexical: bool = False  # has the BM25 sparse field (lexical and hybrid retrieval)
    tenants: bool = False  # has the tenant partition-key field (collections made before it: no)
