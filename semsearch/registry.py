"""The model registry: which (model, collection) pair serves each name, durably, in Milvus itself.

One row per serving name (the alias clients use) holds the current pair, the previous one (for
rollback), the pending one (a promotion in progress: services dual-write to it) and a short
history. Writing that row is the atomic pointer change; the Milvus alias follows it. Keeping the
record in Milvus means every replica of the service, on any machine, sees the same record.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from pymilvus import DataType, MilvusClient

from semsearch.config import Settings
from semsearch.encoders import Encoder, create_encoder
from semsearch.errors import ModelMismatchError
from semsearch.manifest import ModelManifest
from semsearch.store import ADMIN_TIMEOUT_S, BOOKKEEPING_CONSISTENCY, MilvusStore

REGISTRY_COLLECTION = "semsearch_registry"
HISTORY_LIMIT = 50


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class PairRecord(BaseModel):
    """The record of a model and the collection its vectors fill: always swapped together."""

    model_version: str
    manifest: dict[str, Any]
    collection: str
    encoder_url: str | None = None  # remote encoder servers for this model (blue/green), else in-process
    metrics: dict[str, Any] = Field(default_factory=dict)
    since: str = Field(default_factory=now_iso)

    @property
    def model_ref(self) -> str:
        return str(self.manifest.get("model_path") or self.manifest.get("name") or self.model_version)

    def model_manifest(self) -> ModelManifest:
        return ModelManifest.model_validate(self.manifest)

    def same_pair(self, other: PairRecord | None) -> bool:
        return other is not None and (self.model_version, self.collection) == (other.model_version, other.collection)


class RegistryRecord(BaseModel):
    name: str
    generation: int = 0
    current: PairRecord | None = None
    previous: PairRecord | None = None
    pending: PairRecord | None = None
    pending_since_ms: int | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)

    def event(self, kind: str, **details: Any) -> None:
        self.history.append({"at": now_iso(), "event": kind, **details})
        del self.history[:-HISTORY_LIMIT]

    def referenced_collections(self) -> set[str]:
        return {pair.collection for pair in (self.current, self.previous, self.pending) if pair is not None}


class ModelRegistry:
    def __init__(self, store: MilvusStore) -> None:
        self.store = store
        self._ready = False

    def _ensure(self) -> None:
        if self._ready:
            return
        if not self.store.has_collection(REGISTRY_COLLECTION):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=512)
            schema.add_field("record", DataType.VARCHAR, max_length=65535)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one; unused
            index = MilvusClient.prepare_index_params()
            index.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
            self.store._call(self.store.client.create_collection, collection_name=REGISTRY_COLLECTION,
                             schema=schema, index_params=index, consistency_level="Strong",
                             timeout=ADMIN_TIMEOUT_S)
            self.store._call(self.store.client.load_collection, collection_name=REGISTRY_COLLECTION,
                             timeout=ADMIN_TIMEOUT_S)
        self._ready = True

    def _exists(self) -> bool:
        if not self._ready:
            self._ready = self.store.has_collection(REGISTRY_COLLECTION)
        return self._ready

    def get(self, name: str) -> RegistryRecord | None:
        """Read-only: a missing registry reads as no record (nothing is created)."""
        if not self._exists():
            return None
        rows = self.store._call(
            self.store.client.get, collection_name=REGISTRY_COLLECTION, ids=[name], output_fields=["record"],
            consistency_level=BOOKKEEPING_CONSISTENCY,
        )
        if not rows:
            return None
        return RegistryRecord.model_validate_json(rows[0]["record"])

    def put(self, record: RegistryRecord) -> RegistryRecord:
        """Write the record (one row: atomic). Bumps the generation services watch."""
        self._ensure()
        record.generation += 1
        payload = record.model_dump_json()
        if len(payload.encode("utf-8")) > 65535:
            record.history = record.history[-5:]
            payload = record.model_dump_json()
        with self.store._write_lock:
            self.store._call(self.store.client.upsert, collection_name=REGISTRY_COLLECTION, data=[{
                "name": record.name, "record": payload, "vector": np.zeros(2, dtype=np.float32).tolist(),
            }])
        return record

    def names(self) -> list[str]:
        if not self._exists():
            return []
        rows = self.store._call(self.store.client.query, collection_name=REGISTRY_COLLECTION, filter="",
                                limit=16384, output_fields=["name"], consistency_level=BOOKKEEPING_CONSISTENCY)
        return sorted(str(row["name"]) for row in rows)

    def all_referenced_collections(self) -> set[str]:
        referenced: set[str] = set()
        for name in self.names():
            record = self.get(name)
            if record is not None:
                referenced |= record.referenced_collections()
        return referenced

    def bootstrap(self, name: str, manifest: ModelManifest, collection: str,
                  encoder_url: str | None = None, *, persist: bool = True) -> RegistryRecord:
        """The first record for a name: what is serving now becomes `current`."""
        record = self.get(name)
        if record is not None and record.current is not None:
            return record
        record = record or RegistryRecord(name=name)
        record.current = pair_for(manifest, collection, encoder_url)
        record.event("bootstrap", model_version=manifest.version, collection=collection)
        return self.put(record) if persist else record


def pair_for(manifest: ModelManifest, collection: str, encoder_url: str | None = None,
             metrics: dict[str, Any] | None = None) -> PairRecord:
    return PairRecord(model_version=manifest.version, manifest=json.loads(manifest.model_dump_json()),
                       collection=collection, encoder_url=encoder_url, metrics=metrics or {})


def open_pair_encoder(pair: PairRecord, settings: Settings) -> Encoder:
    """The encoder a registry pair names (its servers, else the configured ones), verified to be that version."""
    encoder_url = pair.encoder_url or settings.encoder_url
    encoder = create_encoder(settings.model_copy(update={"model": pair.model_ref, "encoder_url": encoder_url}))
    if encoder.manifest.version != pair.model_version:
        encoder.close()
        raise ModelMismatchError(
            f"registry pair wants model {pair.model_version} but {pair.model_ref} is {encoder.manifest.version}"
        )
    return encoder
