"""The Milvus store: one schema, model version recorded on every collection, typed filters only.

`MilvusStore` (milvus.py) is built from one layer per concern:

| module | holds |
|---|---|
| `connection.py` | the connection: `_call` (typed errors, reconnect, reload), capabilities, ping, load state |
| `errors.py` | Milvus errors translated to semsearch's, the tenant and lexical refusals |
| `schema.py` | collections: schema, model record, lexical analyzer, versioned names, aliases, tenant field |
| `rows.py` | chunk rows and their primary keys (`chunk_row_id`), stored chunks, hits, collection info |
| `reads.py` | bookkeeping reads (Strong): counts, scans, chunk listings, lookups by primary key |
| `search.py` | dense and BM25 search, one hit per document by grouping or oversampling |
| `writes.py` | document writes that settle beside concurrent writers, deletes, Lite flushing |
| `records.py` | `RecordTable`, the key -> text table of the model registry |

Every name other modules import is re-exported here: `from semsearch.store import X` as before.
"""

from semsearch.store.connection import ADMIN_TIMEOUT_S, RECONNECT_INTERVAL_S, Capabilities, capabilities_of
from semsearch.store.errors import (
    LexicalUnavailableError,
    TenantsUnavailableError,
    is_connection_failure,
    no_tenants_reason,
    translate_milvus_error,
)
from semsearch.store.milvus import MilvusStore
from semsearch.store.reads import BOOKKEEPING_CONSISTENCY
from semsearch.store.records import RECORD_KEY_FIELD, RecordTable
from semsearch.store.rows import (
    MAX_ID_BYTES,
    MAX_TENANT_BYTES,
    OUTPUT_FIELDS,
    ChunkRow,
    CollectionInfo,
    Hit,
    RetrieverScore,
    StoredChunk,
    check_doc_id,
    chunk_row_id,
)
from semsearch.store.schema import (
    BM25_FUNCTION,
    LEXICAL_PROPERTY,
    LEXICAL_STOP_WORDS,
    MAX_TEXT_CHARS,
    RECORD_TAG,
    SPARSE_FIELD,
    TEXT_RULES_PROPERTY,
    check_same_model,
    has_bm25_field,
    has_tenant_field,
    lexical_analyzer_params,
    model_record,
    read_model_record,
    versioned_name,
    warm_jieba,
)
from semsearch.store.search import (
    MAX_SEARCH_LIMIT,
    PER_DOCUMENT_OVERSAMPLE,
    SEARCH_CONSISTENCY,
    best_chunk_per_document,
)
from semsearch.store.writes import LITE_FLUSH_ROWS, SETTLE_ROUNDS, IdleFlusher

__all__ = [
    "ADMIN_TIMEOUT_S",
    "BM25_FUNCTION",
    "BOOKKEEPING_CONSISTENCY",
    "LEXICAL_PROPERTY",
    "LEXICAL_STOP_WORDS",
    "LITE_FLUSH_ROWS",
    "MAX_ID_BYTES",
    "MAX_SEARCH_LIMIT",
    "MAX_TENANT_BYTES",
    "MAX_TEXT_CHARS",
    "OUTPUT_FIELDS",
    "PER_DOCUMENT_OVERSAMPLE",
    "RECONNECT_INTERVAL_S",
    "RECORD_KEY_FIELD",
    "RECORD_TAG",
    "SEARCH_CONSISTENCY",
    "SETTLE_ROUNDS",
    "SPARSE_FIELD",
    "TEXT_RULES_PROPERTY",
    "Capabilities",
    "ChunkRow",
    "CollectionInfo",
    "Hit",
    "IdleFlusher",
    "LexicalUnavailableError",
    "MilvusStore",
    "RecordTable",
    "RetrieverScore",
    "StoredChunk",
    "TenantsUnavailableError",
    "best_chunk_per_document",
    "capabilities_of",
    "check_doc_id",
    "check_same_model",
    "chunk_row_id",
    "has_bm25_field",
    "has_tenant_field",
    "is_connection_failure",
    "lexical_analyzer_params",
    "model_record",
    "no_tenants_reason",
    "read_model_record",
    "translate_milvus_error",
    "versioned_name",
    "warm_jieba",
]
