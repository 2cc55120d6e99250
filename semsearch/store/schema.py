"""Collections: the one chunk schema, the model record every collection carries, and what a
collection's schema says it can do (BM25 field, tenant field).

`StoreCollections` creates, opens, describes and drops collections, keeps their properties and
aliases, and tells whether a collection is tenant-aware. The module functions build the lexical
analyzer, the versioned physical name and the model record, and check that a query's model matches
the collection's.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import structlog
from pymilvus import DataType, Function, FunctionType, MilvusClient

from semsearch.errors import InvalidInputError, ModelMismatchError, NotFoundError
from semsearch.filters import TENANT_FIELD, Condition, TenantFilter
from semsearch.manifest import ModelManifest
from semsearch.store.connection import ADMIN_TIMEOUT_S, StoreConnection
from semsearch.store.errors import TenantsUnavailableError, no_tenants_reason
from semsearch.store.rows import MAX_ID_BYTES, MAX_TENANT_BYTES, CollectionInfo
from semsearch.text import LEGACY_TEXT_RULES, TEXT_RULES

log = structlog.get_logger(__name__)

MAX_TEXT_CHARS = 65535 // 4  # VARCHAR max_length counts bytes: 4 per character at worst
RECORD_TAG = "semsearch"
TEXT_RULES_PROPERTY = f"{RECORD_TAG}.text_rules"
# Lexical retrieval: Milvus turns `text` into this BM25 sparse vector (a schema Function).
SPARSE_FIELD = "sparse"
BM25_FUNCTION = "text_bm25"
LEXICAL_PROPERTY = f"{RECORD_TAG}.lexical_analyzer"
# Punctuation and particles that carry no meaning for BM25: a query made only of them has no hits.
LEXICAL_STOP_WORDS = sorted(
    set("，。！？、；：“”‘’「」『』（）《》〈〉【】…—～·．,.!?;:'\"()[]{}<>-_/\\|@#$%^&*+=~`")
    | {"……", "——", "的", "了", "吗", "呢", "吧", "啊", "呀", "哦", "嘛", "么"}
)


def lexical_analyzer_params(analyzer: str, user_dict: Sequence[str] = ()) -> dict[str, Any] | None:
    """Milvus `analyzer_params` for the `lexical_analyzer` setting (None: no BM25 field).

    Milvus Lite 3.2 knows the `jieba` and `standard` tokenizers and the `stop` filter (it skips
    filters given by name); Milvus >= 2.5 also applies `cnalphanumonly`, which drops punctuation.
    """
    if analyzer == "none":
        return None
    stop = {"type": "stop", "stop_words": LEXICAL_STOP_WORDS}
    if analyzer == "standard":
        return {"tokenizer": "standard", "filter": ["lowercase", stop]}
    if analyzer in ("jieba", "jieba_exact"):
        tokenizer: dict[str, Any] = {"type": "jieba", "mode": "search" if analyzer == "jieba" else "exact"}
        if user_dict:
            tokenizer["dict"] = ["_default_", *user_dict]  # keep jieba's own dictionary too
        return {"tokenizer": tokenizer, "filter": ["cnalphanumonly", stop]}
    raise InvalidInputError(f"lexical_analyzer {analyzer!r}: expected jieba, jieba_exact, standard or none")


def warm_jieba() -> None:
    """Load jieba's dictionary now (1-15 s) in this process, where Milvus Lite's server runs.

    Lazily it would load inside the first write or lexical search, under that call's timeout.
    """
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # its progress lines are not ours to print
    jieba.initialize()


def versioned_name(name: str, model_version: str) -> str:
    """`{name}__{model version}`: the physical collection of one model's vectors, behind alias `name`."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", model_version).strip("_") or "model"
    full = f"{name}__{slug}"
    if len(full) > 255:  # Milvus' limit on collection names
        full = f"{full[:230]}_{hashlib.sha256(model_version.encode()).hexdigest()[:16]}"
    return full


def has_tenant_field(description: dict[str, Any]) -> bool:
    return any(f.get("name") == TENANT_FIELD for f in description.get("fields") or [])


def has_bm25_field(description: dict[str, Any]) -> bool:
    """Whether a collection computes the BM25 sparse field that lexical retrieval searches."""
    for function in description.get("functions") or []:
        kind = function.get("type")
        if (kind == FunctionType.BM25 or str(kind).upper().endswith("BM25")) and \
                SPARSE_FIELD in (function.get("output_field_names") or []):
            return True
    return False


def model_record(manifest: ModelManifest, text_rules: str = TEXT_RULES.version) -> dict[str, str]:
    """Collection properties that record which model made its vectors and which text rules
    (normalisation and sentence splitting, semsearch/text.py) made its chunks (strings only)."""
    return {
        f"{RECORD_TAG}.model_version": manifest.version,
        f"{RECORD_TAG}.dimension": str(manifest.dimension),
        f"{RECORD_TAG}.manifest": manifest.model_dump_json(exclude={"metrics"}),
        TEXT_RULES_PROPERTY: text_rules,
    }


def read_model_record(description: dict[str, Any]) -> dict[str, Any] | None:
    properties = description.get("properties") or {}
    version = properties.get(f"{RECORD_TAG}.model_version")
    if not version:
        return None
    manifest_json = properties.get(f"{RECORD_TAG}.manifest") or "{}"
    return {
        "model_version": version, "dimension": int(properties[f"{RECORD_TAG}.dimension"]),
        "manifest": json.loads(manifest_json),
        # Absent on collections made before text rules were recorded: they keep the legacy rules.
        "text_rules": properties.get(TEXT_RULES_PROPERTY) or LEGACY_TEXT_RULES.version,
    }


def check_same_model(info: CollectionInfo, manifest: ModelManifest) -> None:
    """The core invariant: a query vector only meets vectors of the same model version."""
    if info.model_version != manifest.version or info.dimension != manifest.dimension:
        raise ModelMismatchError(
            f"collection {info.name!r} holds vectors of model {info.model_version} (dim {info.dimension}); "
            f"the encoder is {manifest.version} (dim {manifest.dimension}). Re-index into a new collection "
            "and swap (model, collection) together."
        )


class StoreCollections(StoreConnection):
    """The collections layer of MilvusStore (semsearch/store/milvus.py sets its state)."""

    lexical_analyzer: str
    lexical_user_dict: tuple[str, ...]
    hnsw_m: int
    hnsw_ef_construction: int
    _tenant_aware: dict[str, bool]  # physical collection -> has the tenant field

    def collection_info(self, name: str) -> CollectionInfo:
        physical = self.resolve(name)
        if not physical:
            raise NotFoundError(f"collection {name!r} does not exist")
        description = self._call(self.client.describe_collection, collection_name=physical)
        record = read_model_record(description)
        if record is None:
            raise ModelMismatchError(f"collection {physical!r} was not created by semsearch (no model record)")
        return CollectionInfo(
            name=physical, model_version=record["model_version"], dimension=int(record["dimension"]),
            manifest=record.get("manifest", {}), text_rules=record["text_rules"],
            lexical=has_bm25_field(description), tenants=has_tenant_field(description),
        )

    def ensure_collection(self, name: str, manifest: ModelManifest, *, create: bool = True) -> CollectionInfo:
        """Open `name` for `manifest`'s model, creating it if allowed; refuse a model mismatch."""
        if self.resolve(name):
            info = self.collection_info(name)
            check_same_model(info, manifest)
            self.ensure_loaded(info.name)
            return info
        if not create:
            raise NotFoundError(f"collection {name!r} does not exist")
        self.create_collection(name, manifest)
        return self.collection_info(name)

    def create_collection(self, name: str, manifest: ModelManifest) -> None:
        # The BM25 field only where the backend computes it (Milvus 2.3 has no Functions); the
        # collection's schema then records whether lexical retrieval is possible.
        analyzer = lexical_analyzer_params(self.lexical_analyzer, self.lexical_user_dict)
        if analyzer is not None and not self.capabilities().bm25:
            log.warning("lexical_unsupported", server_version=self.capabilities().server_version,
                        reason="BM25 needs Milvus Lite or Milvus >= 2.5; the collection serves dense only")
            analyzer = None
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        # The primary key is chunk_row_id's `{doc_id}#{chunk_index}`, `@{tenant}` after it for a tenant
        # other than the default one: room for the id, the `#` and index, and the suffix.
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES + 16 + MAX_TENANT_BYTES)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
        # One collection serves many tenants: Milvus hashes this field to partitions, and a search
        # filtered on one tenant reads only its partition (a plain field where upsert mis-routes keys).
        schema.add_field(TENANT_FIELD, DataType.VARCHAR, max_length=MAX_TENANT_BYTES,
                         is_partition_key=self.capabilities().partition_key)
        schema.add_field("chunk_index", DataType.INT64)
        if analyzer is None:
            schema.add_field("text", DataType.VARCHAR, max_length=65535)
        else:
            schema.add_field("text", DataType.VARCHAR, max_length=65535, enable_analyzer=True,
                             analyzer_params=analyzer)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("char_offset", DataType.INT64)
        schema.add_field("updated_at", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=manifest.dimension)
        index_params = MilvusClient.prepare_index_params()
        index_params.add_index(
            field_name="vector", index_type="HNSW", metric_type="COSINE",
            params={"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction},
        )
        properties = model_record(manifest)
        if analyzer is not None:
            schema.add_field(SPARSE_FIELD, DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(
                name=BM25_FUNCTION, function_type=FunctionType.BM25, input_field_names=["text"],
                output_field_names=[SPARSE_FIELD],
            ))
            index_params.add_index(field_name=SPARSE_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            properties[LEXICAL_PROPERTY] = json.dumps(analyzer, ensure_ascii=False, sort_keys=True)
        self._call(
            self.client.create_collection, collection_name=name, schema=schema, index_params=index_params,
            description=f"{RECORD_TAG} model {manifest.version}", properties=properties,
            # Session: a client reads its own writes; others see them within the bounded staleness.
            consistency_level="Session", timeout=ADMIN_TIMEOUT_S,
        )
        self._call(self.client.load_collection, collection_name=name, timeout=ADMIN_TIMEOUT_S)
        log.info("collection_created", collection=name, model_version=manifest.version, lexical=analyzer is not None)

    def drop_collection(self, name: str) -> None:
        self._call(self.client.drop_collection, collection_name=name)

    def list_collections(self) -> list[str]:
        return [str(name) for name in self._call(self.client.list_collections)]

    def collection_properties(self, name: str) -> dict[str, str]:
        description = self._call(self.client.describe_collection, collection_name=self.resolve(name) or name)
        return {str(k): str(v) for k, v in (description.get("properties") or {}).items()}

    def set_collection_properties(self, name: str, properties: dict[str, str]) -> None:
        """Add or replace these collection properties (others are kept)."""
        with self._write_lock:
            self._call(self.client.alter_collection_properties, collection_name=name, properties=properties)

    # ------------------------------------------------------------------ aliases
    def list_aliases(self) -> list[str]:
        return [str(alias) for alias in self._call(self.client.list_aliases).get("aliases", [])]

    def point_alias(self, alias: str, collection: str) -> None:
        """Create or move `alias` to `collection` in one step."""
        if alias in self._call(self.client.list_aliases).get("aliases", []):
            self._call(self.client.alter_alias, collection_name=collection, alias=alias)
        else:
            self._call(self.client.create_alias, collection_name=collection, alias=alias)

    # ------------------------------------------------------------------ tenants
    def tenant_aware(self, name: str) -> bool:
        """Whether `name` (a collection or alias) has the tenant field; physical names are cached."""
        cached = self._tenant_aware.get(name)
        if cached is not None:
            return cached
        description = self._call(self.client.describe_collection, collection_name=name)
        aware = has_tenant_field(description)
        if description.get("collection_name") == name:  # an alias may move to another schema
            self._tenant_aware[name] = aware
        return aware

    def tenant_condition(self, name: str, tenant: str | None) -> list[Condition]:
        """The condition that keeps a read or delete inside `tenant` (None: every tenant)."""
        if tenant is None:
            return []
        if self.tenant_aware(name):
            return [TenantFilter(tenant)]
        if tenant:
            raise TenantsUnavailableError(no_tenants_reason(name))
        return []  # a collection without tenants holds only the default tenant
