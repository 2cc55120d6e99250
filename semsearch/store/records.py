"""A small key -> text table in Milvus: what the model registry (semsearch/registry.py) keeps.

One VARCHAR primary key, one VARCHAR value; Milvus insists on a vector field, so a 2-d dummy.
Always Strong: these records decide what gets written.
"""

from __future__ import annotations

from collections.abc import Sequence

from pymilvus import DataType, MilvusClient

from semsearch.filters import render_literal, render_string_in
from semsearch.store.connection import ADMIN_TIMEOUT_S
from semsearch.store.reads import StoreReads

RECORD_KEY_FIELD = "name"


class RecordTable:
    """The record table `name` of `store`, read and written through the store's connection."""

    def __init__(self, store: StoreReads, name: str) -> None:
        self.store = store
        self.name = name

    def ensure(self) -> None:
        """Create the table unless it exists."""
        store = self.store
        if store.has_collection(self.name):
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(RECORD_KEY_FIELD, DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("record", DataType.VARCHAR, max_length=65535)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
        index = MilvusClient.prepare_index_params()
        index.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        store._call(store.client.create_collection, collection_name=self.name, schema=schema, index_params=index,
                    consistency_level="Strong", timeout=ADMIN_TIMEOUT_S)
        store._call(store.client.load_collection, collection_name=self.name, timeout=ADMIN_TIMEOUT_S)

    def read(self, keys: Sequence[str]) -> dict[str, str]:
        """The records of these keys that exist."""
        if not keys:
            return {}
        rows = self.store._query(collection_name=self.name, ids=list(keys),
                                 output_fields=[RECORD_KEY_FIELD, "record"], consistency_level="Strong")
        return {str(row[RECORD_KEY_FIELD]): str(row["record"]) for row in rows}

    def scan(self, prefix: str = "") -> dict[str, str]:
        """Every record whose key starts with `prefix`."""
        where = f"{RECORD_KEY_FIELD} like {render_literal(prefix + '%')}" if prefix else ""
        rows = self.store.iter_rows(self.name, [RECORD_KEY_FIELD, "record"], where)
        # `like` may treat `_` as a wildcard on some versions: the prefix is checked here exactly.
        return {str(row[RECORD_KEY_FIELD]): str(row["record"]) for row in rows
                if str(row[RECORD_KEY_FIELD]).startswith(prefix)}

    def write(self, key: str, value: str) -> None:
        store = self.store
        with store._write_lock:
            store._call(store.client.upsert, collection_name=self.name, data=[{
                RECORD_KEY_FIELD: key, "record": value, "vector": [0.0, 0.0]}])

    def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        store = self.store
        with store._write_lock:
            store._call(store.client.delete, collection_name=self.name,
                        filter=render_string_in(RECORD_KEY_FIELD, list(keys)))
